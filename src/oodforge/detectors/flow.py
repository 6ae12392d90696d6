"""Feature-density detector: a Glow-style normalizing flow (normflows) on L2-normalized features."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import normflows as nf
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import exporting, row_slices
from oodforge.util.errors import ConfigError, MissingPathError

NONFINITE_SCORE = -1e30
"""Score given to a sample whose log-likelihood is NaN or infinite: below every finite score."""

SCORE_CHUNK = 8192
FILE_FORMAT = "oodforge.flow"
FILE_VERSION = 1


def build_glow_flow(dim: int, blocks: int = 10, hidden_layers: int = 1) -> nf.NormalizingFlow:
    """A ``blocks``-deep Glow flow for (N, ``dim``) vectors over a fixed standard normal base.

    Each block, from the data side: ``ActNorm`` (data-dependent init on the first batch),
    ``InvertibleAffine`` (the 1-D invertible 1x1 convolution, LU-parametrized: a learned
    permutation/mixing), ``AffineCouplingBlock`` (channel split, Glow's sigmoid scale) whose
    shift/scale net is ``MLP([ceil(dim/2)] + hidden_layers * [dim] + [2 * floor(dim/2)])`` with a
    zero-initialized last layer. normflows lists flows from the base side, hence the order below.
    """
    if dim < 2:
        raise ConfigError(f"the flow needs features with at least 2 dimensions, got {dim}")
    layers = [(dim + 1) // 2, *([dim] * hidden_layers), 2 * (dim // 2)]
    flows = []
    for _ in range(blocks):
        param_map = nf.nets.MLP(layers, init_zeros=True)
        flows.append(nf.flows.AffineCouplingBlock(param_map, scale=True, scale_map="sigmoid"))
        flows.append(nf.flows.InvertibleAffine(dim, use_lu=True))
        flows.append(nf.flows.ActNorm((dim,)))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)


@DETECTORS.register("flow")
class FlowDensity(Detector):
    """Log-density of the (L2-normalized) penultimate features under a Glow flow fit on ID features.

    Score = log p(h / ||h||) in nats (``normalize=False``: log p(h)). The flow is
    :func:`build_glow_flow` trained by maximum likelihood with Adam for ``epochs`` passes (one by
    default, as in the paper: a deliberately short fit). ``val_fraction`` > 0 holds out that share of
    the ID features and records their mean log-likelihood after each epoch in ``history_``
    (``train_log_likelihood`` is always recorded). ``threads`` sets torch's CPU thread count during
    fit and score (``None``: leave it). A NaN or infinite log-likelihood scores ``NONFINITE_SCORE``
    (-1e30), a constant below any finite score, so a sample scores the same whatever else is in the
    call (per-batch scoring stays consistent); a warning gives the count. Non-finite training
    features are dropped with a warning.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train")
    search_space: ClassVar[dict[str, list]] = {"epochs": [1, 5, 20]}
    save_with_run: ClassVar[bool] = True

    def __init__(
        self,
        blocks: int = 10,
        hidden_layers: int = 1,
        normalize: bool = True,
        lr: float = 1e-5,
        batch_size: int = 250,
        epochs: int = 1,
        val_fraction: float = 0.0,
        seed: int = 0,
        device: str = "auto",
        threads: int | None = 1,
        quiet: bool = False,
    ) -> None:
        self.blocks = blocks
        self.hidden_layers = hidden_layers
        self.normalize = normalize
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.threads = threads
        self.quiet = quiet

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as saved by :meth:`save`."""
        names = ("blocks", "hidden_layers", "normalize", "lr", "batch_size", "epochs", "val_fraction")
        return {name: getattr(self, name) for name in (*names, "seed", "device", "threads", "quiet")}

    def _fit(self, train: ModelOutputs) -> None:
        self._check_config()
        features = _drop_nonfinite(self._prepare(train.features))
        generator = torch.Generator().manual_seed(self.seed)
        train_x, val_x = _split(features, self.val_fraction, generator)
        if len(train_x) < 2:
            raise ConfigError(f"flow needs at least 2 finite training features, got {len(train_x)}")
        self.device_ = _resolve_device(self.device)
        self.feature_dim_ = features.shape[1]
        self.flow_ = self._new_flow(self.feature_dim_).to(self.device_)
        with _torch_threads(self.threads):
            self.history_ = self._train(train_x, val_x, generator)
        self.flow_.eval()

    def _train(self, train_x: Tensor, val_x: Tensor, generator: torch.Generator) -> list[dict[str, float]]:
        """Adam on the negative log-likelihood for ``epochs`` passes; one history record per epoch."""
        optimizer = torch.optim.Adam(self.flow_.parameters(), lr=self.lr)
        history = []
        steps_per_epoch = math.ceil(len(train_x) / self.batch_size)
        with _progress(self.quiet) as progress:
            task = progress.add_task("flow", total=self.epochs * steps_per_epoch)
            for epoch in range(1, self.epochs + 1):
                progress.update(task, description=f"flow epoch {epoch}/{self.epochs}")
                train_ll = self._train_epoch(train_x, optimizer, generator, lambda: progress.advance(task))
                record = {"epoch": epoch, "train_log_likelihood": train_ll}
                if len(val_x):
                    record["val_log_likelihood"] = self._log_likelihood(val_x).mean().item()
                history.append(record)
        return history

    def _train_epoch(self, train_x: Tensor, optimizer, generator: torch.Generator, step_done) -> float:
        """One shuffled pass of maximum-likelihood steps; the mean batch log-likelihood seen."""
        self.flow_.train()
        total, count, skipped = 0.0, 0, 0
        order = torch.randperm(len(train_x), generator=generator)
        for batch in train_x[order].split(self.batch_size):
            loss = self.flow_.forward_kld(batch.to(self.device_))
            if torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total - loss.item() * len(batch), count + len(batch)
            else:
                skipped += 1
            step_done()
        if skipped:
            warnings.warn(
                f"flow: skipped {skipped} batches with a non-finite loss", RuntimeWarning, stacklevel=5
            )
        return total / count if count else float("nan")

    def _log_likelihood(self, features: Tensor) -> Tensor:
        """log p of prepared (N, D) features, on the CPU, in chunks, without gradients."""
        self.flow_.eval()
        log_prob = partial(_traceable_log_prob, self.flow_) if exporting() else self.flow_.log_prob
        with torch.no_grad():
            parts = [
                log_prob(features[rows].to(self.device_)).cpu()
                for rows in row_slices(features.shape[0], features.shape[1], SCORE_CHUNK)
            ]
        return torch.cat(parts) if parts else features.new_zeros(0)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        with _torch_threads(self.threads):
            scores = self._log_likelihood(self._prepare(outputs.features, self.feature_dim_))
        bad = ~torch.isfinite(scores)
        if not exporting() and bad.any():
            warnings.warn(
                f"flow: {int(bad.sum())} of {len(scores)} log-likelihoods were NaN or infinite; "
                f"they score {NONFINITE_SCORE:g} (lowest)",
                RuntimeWarning,
                stacklevel=3,
            )
        return torch.where(bad, NONFINITE_SCORE, scores).to(outputs.features.device)

    def _prepare(self, features: Tensor, expected: int | None = None) -> Tensor:
        """Float32 (N, D) features on the CPU (D = ``expected`` if given), L2-normalized if ``normalize``."""
        features = features.detach().to("cpu", torch.float32)
        if features.ndim != 2 or (expected is not None and features.shape[1] != expected):
            want = f"(N, {expected})" if expected is not None else "(N, D)"
            raise ConfigError(f"flow features must have shape {want}, got {tuple(features.shape)}")
        return torch.nn.functional.normalize(features, dim=1) if self.normalize else features

    def _new_flow(self, dim: int) -> nf.NormalizingFlow:
        """A freshly initialized flow, seeded by ``seed`` without touching the global RNG."""
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.lu is deprecated")
            torch.manual_seed(self.seed)
            return build_glow_flow(dim, self.blocks, self.hidden_layers)

    def _check(self) -> None:
        self._check_config()

    def _check_config(self) -> None:
        for name in ("blocks", "hidden_layers", "batch_size", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"flow option {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"flow option threads must be None or an integer >= 1, got {self.threads!r}")
        if not self.lr > 0:
            raise ConfigError(f"flow option lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"flow option val_fraction must be in [0, 1), got {self.val_fraction!r}")

    def get_state(self) -> dict:
        """Feature size, training history and the flow's weights (``save`` writes them)."""
        return {"feature_dim_": self.feature_dim_, "history_": list(self.history_),
                "flow_state": {key: value.detach().cpu() for key, value in self.flow_.state_dict().items()}}

    def set_state(self, state: dict) -> None:
        """Rebuild the flow from ``get_state``'s output."""
        self.feature_dim_ = int(state["feature_dim_"])
        flow = self._new_flow(self.feature_dim_)
        flow.load_state_dict(state["flow_state"])
        self.device_ = _resolve_device(self.device)
        self.flow_ = flow.to(self.device_).eval()
        self.history_ = list(state.get("history_", []))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, device: str | None = None) -> FlowDensity:
        """A fitted flow from a file written by ``save`` (or by oodforge before 2026-11-24);
        ``device`` overrides the saved one."""
        path = Path(path)
        payload = _read_payload(path)
        legacy = payload.get("format") == FILE_FORMAT
        try:
            config = dict(payload["config"] if legacy else payload["params"])
            if device is not None:
                config["device"] = device
            detector = cls(**config).validate()
            detector.set_state({"feature_dim_": payload["feature_dim"], "history_": payload.get("history", []),
                                "flow_state": payload["state_dict"]} if legacy else payload["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{path} is not a valid flow detector file: {exc}") from exc
        detector.model_ = model
        detector.fitted_ = True
        return detector


def _traceable_log_prob(flow: nf.NormalizingFlow, x: Tensor) -> Tensor:
    """``flow.log_prob(x)`` of a fitted flow, in a form a traced graph keeps for any batch size: normflows sizes
    its sum with ``len(x)``, and its ``ActNorm`` asks whether it is initialized (a fitted one is)."""
    log_q, z = x.new_zeros(x.shape[0]), x
    for layer in reversed(flow.flows):
        inverse = nf.flows.AffineConstFlow.inverse if isinstance(layer, nf.flows.ActNorm) else type(layer).inverse
        z, log_det = inverse(layer, z)
        log_q = log_q + log_det
    return log_q + flow.q0.log_prob(z)


def _read_payload(path: Path) -> dict[str, Any]:
    """The dict saved at ``path``; errors name the file."""
    if not path.is_file():
        raise MissingPathError(f"no flow detector file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or truncated file
        raise ConfigError(
            f"cannot read flow detector file {path} (corrupt or not a torch file): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") not in (FILE_FORMAT, "oodforge-detector"):
        raise ConfigError(f"{path} is not an oodforge flow detector file (format tag missing)")
    if payload.get("format") == FILE_FORMAT and payload.get("version") != FILE_VERSION:
        raise ConfigError(f"{path} has flow file version {payload.get('version')!r}; expected {FILE_VERSION}")
    return payload


def _drop_nonfinite(features: Tensor) -> Tensor:
    """The rows of ``features`` without NaN or infinity; a warning counts the rows dropped."""
    finite = torch.isfinite(features).all(dim=1)
    dropped = int((~finite).sum())
    if dropped:
        warnings.warn(
            f"flow: dropped {dropped} of {len(features)} training features that are NaN or infinite",
            RuntimeWarning,
            stacklevel=4,
        )
    return features[finite]


def _split(features: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A seeded random (train, validation) split; the validation part holds ``val_fraction`` of rows."""
    n_val = math.ceil(len(features) * val_fraction) if val_fraction > 0 else 0
    order = torch.randperm(len(features), generator=generator)
    return features[order[n_val:]], features[order[:n_val]]


def _resolve_device(device: str) -> torch.device:
    """``"auto"`` means CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the old count after.

    The flow's matrices are small (batch 250 x D <= a few hundred): one thread is faster than two
    on a small CPU, and far faster when other processes compete for the cores.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress(quiet: bool) -> Progress:
    """A rich progress bar for the fit, disabled when ``quiet``."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=quiet,
        transient=True,
    )

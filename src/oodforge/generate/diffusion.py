"""Class-conditional diffusion (diffusers ``UNet2DModel``): DDPM training, DDIM sampling, label interpolation.

How class conditioning works here: ``UNet2DModel`` adds ``class_embedding(class_labels)`` to its
timestep embedding. We build the UNet with ``class_embed_type="identity"`` and keep the class
embedding table (``num_classes + 1`` rows; the last row is the "null" class used for classifier-free
guidance) in the ``ConditionalUNet`` wrapper. The wrapper looks labels up itself and hands the UNet
the embedding *vectors*, so any vector can condition the UNet -- in particular an interpolated
embedding ``a*e_i + (1-a)*e_j`` (``interpolate_embeddings``). For integer labels this is the same
network as ``UNet2DModel(num_class_embeds=num_classes + 1)``, with no hooks or monkeypatching.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from oodforge.data.imageset import ImageSet
from oodforge.data.synthetic import SyntheticSet
from oodforge.generate.sample_chunks import SampleChunks, job_key
from oodforge.models.classifier import CheckpointError, file_hash, read_checkpoint
from oodforge.util.atomic import atomic_torch_save
from oodforge.util.errors import ConfigError
from oodforge.util.precision import cpu_has_native_bf16

CHECKPOINT_NAME = "diffusion.ckpt"
FORMAT = "oodforge-diffusion"
RESUMABLE_FIELDS = ("epochs",)


@dataclass
class DiffusionConfig:
    """Architecture, noise schedule and training settings of a class-conditional diffusion model."""

    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention in every down/up block below full resolution
    mid_attention: bool = True  # self-attention in the UNet's middle block
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    random_flip: bool = False
    bf16: bool = False  # bfloat16 autocast for training and sampling (CPU with AVX512-BF16, or GPU)
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % factor:
            raise ConfigError(f"image_size {self.image_size} must be divisible by {factor} for "
                             f"{len(self.block_out_channels)} UNet levels (block_out_channels)")
        if self.num_classes < 1 or self.channels < 1:
            raise ConfigError(f"num_classes and channels must be >= 1, got {self.num_classes}, "
                             f"{self.channels}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")

    @property
    def null_class(self) -> int:
        """Index of the "null" (unconditional) row of the class embedding table."""
        return self.num_classes

    @property
    def embedding_dim(self) -> int:
        """Width of the timestep and class embeddings (diffusers' default: 4 x first block width)."""
        return self.block_out_channels[0] * 4


PRESETS = ("auto", "cpu", "gpu")


def preset_for(image_size: int, channels: int, num_classes: int, preset: str = "auto",
               on_gpu: bool = True) -> DiffusionConfig:
    """Default config: ``cpu`` (sized for a few CPU cores) or ``gpu``; ``auto`` is ``cpu`` without a GPU
    (``on_gpu`` False) or for grayscale images up to 32 px, and ``gpu`` otherwise.

    The grayscale CPU preset makes 2 passes over Fashion-MNIST (1874 steps of 64 images). Measured on 2
    AVX512-BF16 CPU cores (``benchmarks/diffusion_fmnist.py``): 200-280 images/s when idle (about 10
    minutes), 30-40 images/s when shared with 2-3 other jobs (about an hour). The RGB CPU preset (4.6M
    parameters: 64/128/128 channels, attention in the middle block only) makes 12 passes over a
    50,000-image set in batches of 64: measured 47-50 images/s in bf16 on one such core beside a one-thread
    training job: 207.8 minutes of one core for CIFAR-10. bfloat16 autocast is on
    where the CPU runs it natively. The GPU preset (41M parameters) is the usual 32x32 DDPM size.
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if preset == "auto":
        preset = "cpu" if not on_gpu or (channels == 1 and image_size <= 32) else "gpu"
    if preset == "cpu" and channels == 1 and image_size <= 32:
        return DiffusionConfig(
            image_size=image_size, channels=channels, num_classes=num_classes,
            block_out_channels=(32, 64, 64), layers_per_block=1, attention=False, mid_attention=True,
            epochs=2, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, bf16=cpu_has_native_bf16(),
        )
    if preset == "cpu":
        return DiffusionConfig(
            image_size=image_size, channels=channels, num_classes=num_classes,
            block_out_channels=(64, 128, 128), layers_per_block=1, attention=False, mid_attention=True,
            epochs=12, batch_size=64, lr=5e-4, warmup_steps=500, ema_decay=0.999, random_flip=True,
            bf16=cpu_has_native_bf16(),
        )
    return DiffusionConfig(
        image_size=image_size, channels=channels, num_classes=num_classes,
        block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention=True, mid_attention=True,
        dropout=0.1, epochs=200, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
        random_flip=True, bf16=True,
    )


class ConditionalUNet(nn.Module):
    """``UNet2DModel`` conditioned on class-embedding *vectors* looked up in ``label_embedding``."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        levels = len(config.block_out_channels)
        down = ["DownBlock2D"] + ["AttnDownBlock2D" if config.attention else "DownBlock2D"] * (levels - 1)
        up = [name.replace("Down", "Up") for name in reversed(down)]
        self.unet = UNet2DModel(
            sample_size=config.image_size,
            in_channels=config.channels,
            out_channels=config.channels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            add_attention=config.mid_attention,
            dropout=config.dropout,
            norm_num_groups=min(32, math.gcd(*config.block_out_channels)),
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
        )
        self.label_embedding = nn.Embedding(config.num_classes + 1, config.embedding_dim)

    def embed(self, labels: Tensor) -> Tensor:
        """Class embedding vectors (N, D) of integer ``labels`` (``num_classes`` = null class)."""
        return self.label_embedding(labels)

    def forward(self, sample: Tensor, timesteps: Tensor, embeddings: Tensor) -> Tensor:
        """Predicted noise for ``sample`` at ``timesteps`` given class embedding vectors (N, D)."""
        return self.unet(sample, timesteps, class_labels=embeddings).sample


def build_model(config: DiffusionConfig) -> ConditionalUNet:
    """A freshly initialised model; the initial weights depend only on ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ConditionalUNet(config)


def interpolate_embeddings(table: Tensor, i: Tensor | int, j: Tensor | int, alpha: Tensor | float) -> Tensor:
    """``alpha * table[i] + (1 - alpha) * table[j]``: points on the segment between two class embeddings.

    ``i``, ``j`` and ``alpha`` are scalars or 1-D tensors of one length; ``alpha`` must lie in [0, 1].
    """
    i, j = torch.as_tensor(i, device=table.device), torch.as_tensor(j, device=table.device)
    alpha = torch.as_tensor(alpha, dtype=table.dtype, device=table.device)
    if alpha.numel() and (alpha.min() < 0 or alpha.max() > 1):
        raise ConfigError("alpha must lie in [0, 1]")
    alpha = alpha.unsqueeze(-1)
    return alpha * table[i] + (1 - alpha) * table[j]


def noise_scheduler(config: DiffusionConfig) -> DDPMScheduler:
    """The DDPM training scheduler (epsilon prediction, ``config.beta_schedule``)."""
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         clip_sample=True, prediction_type="epsilon")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------- training


@dataclass
class _TrainState:
    """Everything a checkpoint holds besides the config: restoring it continues training exactly."""

    model: ConditionalUNet
    ema: ConditionalUNet
    optimizer: torch.optim.Optimizer
    rng: torch.Generator
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    history: list | None = None
    train_seconds: float = 0.0  # wall time of the training up to the last checkpoint, summed over resumes


def train_diffusion(
    images: ImageSet,
    config: DiffusionConfig,
    out_dir: str | Path,
    resume: bool = True,
    quiet: bool = False,
    device: str | torch.device = "auto",
    checkpoint_every: int = 200,
) -> Path:
    """DDPM-train a class-conditional UNet on ``images``; returns ``out_dir/diffusion.ckpt``.

    The checkpoint (model, EMA, optimizer, position in the epoch, RNG states) is written atomically at
    the end of every epoch and every ``checkpoint_every`` steps (0: epoch ends only). With ``resume``
    an existing checkpoint is continued -- to more ``epochs`` if the config asks for them -- and the
    result equals an uninterrupted run; without it training starts over.
    """
    _check_training_images(images, config)
    device = resolve_device(device)
    path = Path(out_dir) / CHECKPOINT_NAME
    fingerprint = _fingerprint(images)
    state = _new_state(config, device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        if resume and path.exists():
            _restore(state, read_checkpoint(path), config, fingerprint, path, device)
        if state.epoch < config.epochs:
            _train_epochs(state, images, config, device, quiet,
                          lambda: _save(state, config, images.classes, fingerprint, path, device),
                          checkpoint_every)
    return path


def _train_epochs(state: _TrainState, images: ImageSet, config: DiffusionConfig, device: torch.device,
                  quiet: bool, save: Callable[[], None], checkpoint_every: int) -> None:
    data = torch.from_numpy(images.images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.asarray(images.labels, dtype=np.int64))
    scheduler = noise_scheduler(config)
    per_epoch = max(1, len(images) // config.batch_size)
    with _progress(quiet) as progress:
        task = progress.add_task("diffusion", total=per_epoch * config.epochs,
                                 completed=per_epoch * state.epoch + state.step_in_epoch)
        if state.global_step and not quiet:
            progress.console.print(f"resuming at epoch {state.epoch + 1}, step {state.step_in_epoch + 1}")
        clock = {"time": time.perf_counter(), "step": state.global_step}
        log = not quiet and not progress.console.is_terminal  # a log file gets a line per checkpoint instead

        def checkpoint() -> None:
            now = time.perf_counter()
            state.train_seconds += now - clock["time"]
            save()
            if log:
                rate = (state.global_step - clock["step"]) * config.batch_size / max(now - clock["time"], 1e-9)
                progress.console.print(f"diffusion epoch {state.epoch + (state.step_in_epoch > 0)}/{config.epochs}, "
                                       f"step {state.global_step}/{per_epoch * config.epochs}: {rate:.0f} images/s, "
                                       f"{state.train_seconds / 60:.1f} min of training so far; checkpoint saved",
                                       soft_wrap=True)
            clock.update(time=time.perf_counter(), step=state.global_step)

        while state.epoch < config.epochs:
            order = _epoch_order(len(images), config.seed, state.epoch)
            for batch in range(state.step_in_epoch, per_epoch):
                index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
                loss = _train_step(state, scheduler, data[index], labels[index], config, device)
                state.loss_sum += loss
                state.step_in_epoch, state.global_step = batch + 1, state.global_step + 1
                progress.update(task, advance=1, description=f"diffusion epoch {state.epoch + 1}/"
                                f"{config.epochs} loss {state.loss_sum / state.step_in_epoch:.4f}")
                if checkpoint_every and state.global_step % checkpoint_every == 0 and batch + 1 < per_epoch:
                    checkpoint()
            state.history.append({"epoch": state.epoch + 1, "loss": state.loss_sum / per_epoch,
                                  "steps": state.global_step,
                                  "train_seconds": state.train_seconds + time.perf_counter() - clock["time"]})
            state.epoch, state.step_in_epoch, state.loss_sum = state.epoch + 1, 0, 0.0
            checkpoint()


def _train_step(state: _TrainState, scheduler: DDPMScheduler, pixels: Tensor, labels: Tensor,
                config: DiffusionConfig, device: torch.device) -> float:
    """One DDPM step (random t, eps-MSE) with label dropout to the null class; returns the loss."""
    rng, count = state.rng, len(pixels)
    x0 = pixels.float().div_(127.5).sub_(1.0)
    if config.random_flip:
        flip = torch.rand(count, generator=rng) < 0.5
        x0[flip] = x0[flip].flip(-1)
    drop = torch.rand(count, generator=rng) < config.cfg_dropout
    labels = torch.where(drop, torch.full_like(labels, config.null_class), labels)
    noise = torch.randn(x0.shape, generator=rng)
    timesteps = torch.randint(0, config.num_train_timesteps, (count,), generator=rng)
    x0, noise, timesteps, labels = x0.to(device), noise.to(device), timesteps.to(device), labels.to(device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    state.model.train()
    with _autocast(device, config.bf16):
        prediction = state.model(noisy, timesteps, state.model.embed(labels))
    loss = nn.functional.mse_loss(prediction.float(), noise)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * min(1.0, (state.global_step + 1) / max(1, config.warmup_steps))
    state.optimizer.step()
    _update_ema(state.ema, state.model, config.ema_decay, state.global_step)
    return float(loss.detach())


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with the usual warm-up: the effective decay is min(decay, (1 + step) / (10 + step))."""
    rate = 1.0 - min(decay, (1 + step) / (10 + step))
    for average, current in zip(ema.parameters(), model.parameters(), strict=True):
        average.lerp_(current, rate)


def _epoch_order(count: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of epoch ``epoch``: a function of (seed, epoch) only, so resumes can skip ahead."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _new_state(config: DiffusionConfig, device: torch.device) -> _TrainState:
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(config.seed)
    return _TrainState(model, ema, optimizer, rng, history=[])


def _save(state: _TrainState, config: DiffusionConfig, classes: list[str], fingerprint: str, path: Path,
          device: torch.device) -> None:
    checkpoint = {
        "format": FORMAT,
        "config": asdict(config),
        "classes": list(classes),
        "data_fingerprint": fingerprint,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "loss_sum": state.loss_sum,
        "history": state.history,
        "train_seconds": state.train_seconds,
        "rng": state.rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    atomic_torch_save(checkpoint, path)


def _restore(state: _TrainState, checkpoint: dict, config: DiffusionConfig, fingerprint: str, path: Path,
             device: torch.device) -> None:
    saved = _config_from_checkpoint(checkpoint, path)
    changed = [f.name for f in fields(DiffusionConfig)
               if f.name not in RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise CheckpointError(f"{path} was trained with a different config ({', '.join(changed)}); "
                              "use another output folder or resume=False")
    if checkpoint.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"{path} was trained on different images; use another output folder "
                              "or resume=False")
    try:
        state.model.load_state_dict(checkpoint["model"])
        state.ema.load_state_dict(checkpoint["ema"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.rng.set_state(checkpoint["rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        state.epoch, state.step_in_epoch = int(checkpoint["epoch"]), int(checkpoint["step_in_epoch"])
        state.global_step, state.loss_sum = int(checkpoint["global_step"]), float(checkpoint["loss_sum"])
        state.history = list(checkpoint["history"])
        state.train_seconds = float(checkpoint.get("train_seconds", 0.0))  # absent before 2026-11-24
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: {exc.__class__.__name__}: {exc}") from exc


def _config_from_checkpoint(checkpoint: dict, path: Path) -> DiffusionConfig:
    if checkpoint.get("format") != FORMAT or not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{path} is not an {FORMAT} checkpoint")
    try:
        return DiffusionConfig(**checkpoint["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds an unusable diffusion config: {exc}") from exc


def _check_training_images(images: ImageSet, config: DiffusionConfig) -> None:
    expected = (config.image_size, config.image_size, config.channels)
    if images.image_shape != expected:
        raise ConfigError(f"{images.name}: images are {images.image_shape} (H, W, C) but the diffusion "
                         f"config expects {expected}")
    labels = np.asarray(images.labels)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= config.num_classes:
        raise ConfigError(f"{images.name}: labels must lie in [0, {config.num_classes}) for class-conditional "
                         "training")


def _fingerprint(images: ImageSet) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(images.images).data)
    digest.update(np.ascontiguousarray(images.labels, dtype=np.int64).data)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class DiffusionGenerator:
    """A trained model ready to sample: EMA weights in eval mode, plus where they came from."""

    model: ConditionalUNet
    config: DiffusionConfig
    classes: list[str]
    path: Path
    model_hash: str
    epoch: int
    device: torch.device


def load_generator(path: str | Path, device: str | torch.device = "auto") -> DiffusionGenerator:
    """The EMA model of a ``train_diffusion`` checkpoint; a bad or missing file raises ``CheckpointError``."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    config = _config_from_checkpoint(checkpoint, path)
    device = resolve_device(device)
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["ema"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the EMA weights of {path}: {exc.__class__.__name__}: "
                              f"{exc}") from exc
    model.to(device).eval().requires_grad_(False)
    classes = list(checkpoint.get("classes") or [str(c) for c in range(config.num_classes)])
    return DiffusionGenerator(model, config, classes, path, file_hash(path, 16),
                              int(checkpoint.get("epoch", 0)), device)


def sample_id(
    generator: DiffusionGenerator,
    per_class: int = 600,
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 50,
    batch_size: int = 256,
    quiet: bool = False,
    chunks: str | Path | None = None,
) -> SyntheticSet:
    """``per_class`` images of every class (class-major order, labels = class).

    DDIM with ``steps`` steps (eta = 0) and classifier-free guidance: eps = eps_null + guidance *
    (eps_class - eps_null), so ``guidance=1`` is plain conditional sampling. The same ``seed`` and
    arguments give identical images. ``chunks``: a folder keeping finished batches (see
    ``sample_embeddings``), so an interrupted call continues where it stopped.
    """
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    labels = np.repeat(np.arange(generator.config.num_classes, dtype=np.int64), per_class)
    with torch.no_grad():
        embeddings = generator.model.embed(torch.from_numpy(labels).to(generator.device))
    pixels = sample_embeddings(generator, embeddings, seed, guidance, steps, batch_size, quiet, chunks)
    manifest = _manifest(generator, "id", seed, guidance, steps, None) | {"per_class": per_class}
    return SyntheticSet("synthetic-id", pixels, labels, generator.classes, manifest)


def sample_interpolated(
    generator: DiffusionGenerator,
    n: int = 6000,
    alpha_range: tuple[float, float] = (0.3, 0.7),
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 50,
    batch_size: int = 256,
    quiet: bool = False,
    chunks: str | Path | None = None,
) -> SyntheticSet:
    """``n`` outliers conditioned on a*e_i + (1-a)*e_j: pairs i != j uniform, a ~ U[alpha_range]; labels -1.

    The pairs (N, 2) and alphas (N,) are returned in ``.extra``. Sampling as in ``sample_id`` (``chunks``
    included), with the interpolated embedding in place of the class embedding.
    """
    low, high = (float(a) for a in alpha_range)
    if n < 1 or not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"need n >= 1 and 0 <= alpha_range[0] <= alpha_range[1] <= 1, got {n}, "
                         f"{alpha_range}")
    classes = generator.config.num_classes
    if classes < 2:
        raise ConfigError("label interpolation needs at least 2 classes")
    draw = np.random.default_rng(seed)
    first = draw.integers(0, classes, n)
    second = (first + draw.integers(1, classes, n)) % classes
    alphas = draw.uniform(low, high, n)
    with torch.no_grad():
        embeddings = interpolate_embeddings(generator.model.label_embedding.weight, torch.from_numpy(first),
                                            torch.from_numpy(second), torch.from_numpy(alphas).float())
    pixels = sample_embeddings(generator, embeddings, seed, guidance, steps, batch_size, quiet, chunks)
    manifest = _manifest(generator, "interpolated", seed, guidance, steps, [low, high])
    extra = {"pairs": np.stack([first, second], axis=1).astype(np.int64), "alphas": alphas.astype(np.float32)}
    return SyntheticSet("synthetic-interpolated", pixels, np.full(n, -1, np.int64), generator.classes,
                        manifest, extra)


@torch.no_grad()
def sample_embeddings(
    generator: DiffusionGenerator,
    embeddings: Tensor,
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 50,
    batch_size: int = 256,
    quiet: bool = False,
    chunks: str | Path | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, C) images conditioned on class-embedding vectors ``embeddings`` (N, D).

    Image k starts from the k-th noise image drawn from ``seed``, so calls with the same seed and N
    share their starting noise (useful for sweeping alpha with everything else fixed). With ``chunks``
    (a folder), every finished batch is stored there and batches already stored by the same job (same
    model, conditions, seed, guidance, steps, batch size, precision) are read back instead of sampled;
    a folder holding another job's batches raises ``ValueError``.
    """
    config = generator.config
    if guidance < 0 or not 1 <= steps <= config.num_train_timesteps or batch_size < 1:
        raise ConfigError(f"need guidance >= 0, 1 <= steps <= {config.num_train_timesteps} and "
                         f"batch_size >= 1, got {guidance}, {steps}, {batch_size}")
    count = len(embeddings)
    shape = (count, config.channels, config.image_size, config.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    null = generator.model.embed(torch.tensor([config.null_class], device=generator.device))
    out = np.empty((count, config.image_size, config.image_size, config.channels), np.uint8)
    store = None
    if chunks is not None:
        key = job_key(generator.model_hash, embeddings, seed, guidance, steps, batch_size, config.bf16)
        store = SampleChunks(chunks, key).open()
    with _progress(quiet) as progress:
        task = progress.add_task("sampling", total=math.ceil(count / batch_size) * steps)
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            done = store.load(start, stop) if store is not None else None
            if done is not None:
                out[start:stop] = done
                progress.advance(task, steps)
                continue
            x = _denoise(generator, noise[start:stop].to(generator.device), embeddings[start:stop], null,
                         guidance, steps, lambda: progress.advance(task))
            out[start:stop] = _to_uint8(x)
            if store is not None:
                store.save(start, out[start:stop])
    return out


def _denoise(generator: DiffusionGenerator, x: Tensor, cond: Tensor, null: Tensor, guidance: float,
             steps: int, tick: Callable[[], None]) -> Tensor:
    """DDIM (eta = 0) from noise ``x``; eps = eps_null + guidance * (eps_cond - eps_null)."""
    ddpm = noise_scheduler(generator.config)
    scheduler = DDIMScheduler.from_config(ddpm.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    conditions = torch.cat([cond, null.expand(len(cond), -1)]) if guidance != 1.0 else cond
    for t in scheduler.timesteps:
        batch = torch.cat([x, x]) if guidance != 1.0 else x
        timesteps = torch.full((len(batch),), int(t), device=x.device, dtype=torch.long)
        with _autocast(x.device, generator.config.bf16):
            eps = generator.model(batch, timesteps, conditions).float()
        if guidance != 1.0:
            eps_cond, eps_null = eps.chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
        x = scheduler.step(eps, t, x).prev_sample
        tick()
    return x


def _to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _manifest(generator: DiffusionGenerator, kind: str, seed: int, guidance: float, steps: int,
              alpha_range: list[float] | None) -> dict:
    return {
        "kind": kind,
        "model_hash": generator.model_hash,
        "checkpoint": str(generator.path),
        "checkpoint_epoch": generator.epoch,
        "seed": seed,
        "guidance": guidance,
        "steps": steps,
        "sampler": "ddim",
        "alpha_range": alpha_range,
    }


def _autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _progress(quiet: bool) -> Progress:
    """A rich progress bar, disabled when ``quiet``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=quiet, transient=True)

"""Export a guard as one model file (ONNX or TorchScript) that maps a preprocessed batch (N, C, H, W) in [0, 1] to
``logits``, ``score``, ``p_value`` and ``out`` (1 = flagged OOD), with no oodforge needed to run it.

Detectors whose score is tensor algebra on the logits and features export; those that need input gradients
(ODIN with a perturbation, GradNorm) are refused, as is any whose export fails or does not reproduce the guard.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import Tensor, nn

from oodforge.deploy.guard import Guard
from oodforge.detectors.base import forward_outputs
from oodforge.outputs import ModelOutputs
from oodforge.util.atomic import atomic_write
from oodforge.util.errors import ConfigError

FORMATS = {"onnx": "guard.onnx", "torchscript": "guard.pt"}
OUTPUT_NAMES = ("logits", "score", "p_value", "out")
TOLERANCE = 1e-4


class ExportError(ConfigError):
    """A guard that cannot be exported (its detector, its precision, or an export that does not match)."""


class GuardGraph(nn.Module):
    """The guard as one tensor program: network, detector score, conformal p-value and decision."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.model, self.detector = guard.model, guard.detector
        for name, value in vars(guard.detector).items():  # e.g. a flow: traced as parameters, not constants
            if isinstance(value, nn.Module) and value is not guard.model:
                self.add_module(f"detector_{name.strip('_')}", value)
        calibration = guard._require_calibration()
        classes = len(guard.classes) if guard.class_conditional else 1
        sets = ([calibration.by_class.get(c, torch.empty(0, dtype=torch.float64)) for c in range(classes)]
                if guard.class_conditional else [calibration.scores])
        width = max(1, max(len(s) for s in sets))
        table = torch.full((classes, width), float("inf"), dtype=torch.float64)
        for row, scores in enumerate(sets):
            table[row, :len(scores)] = scores
        self.register_buffer("calibration", table)
        self.register_buffer("sizes", torch.tensor([float(len(s)) for s in sets], dtype=torch.float64))
        self.class_conditional = guard.class_conditional
        self.alpha = guard.alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(logits, score, p_value, out) of a preprocessed batch."""
        features, logits, layers = forward_outputs(self.model, x, self.detector.layer_keys(self.model))
        logits = logits.float()
        score = self.detector.score_outputs(ModelOutputs(logits, features.flatten(1).float(),
                                                         layers={k: v.float() for k, v in layers.items()})).float()
        row = logits.argmax(1) if self.class_conditional else torch.zeros_like(logits[:, 0], dtype=torch.long)
        reference = self.calibration[row]  # (N, width), padded with +inf
        count = (reference <= score.double()[:, None]).double().sum(1)
        p_value = (count + 1.0) / (self.sizes[row] + 1.0)
        return logits, score, p_value, (p_value <= self.alpha).long()


def check_exportable(guard: Guard) -> None:
    """Refuse, in one line, a guard whose detector needs input gradients or whose precision is not float32."""
    name = guard.detector_name
    if guard.detector.needs_inputs and getattr(guard.detector, "epsilon", 1) != 0:
        raise ExportError(f"detector {name} cannot export: it needs input gradients (a backward pass per input), "
                          "which an inference graph does not run; build the guard with a detector such as energy, "
                          "vim or knn")
    if guard.detector.needs_inputs:
        raise ExportError(f"detector {name} cannot export: it scores through the network's backward pass")
    if guard.precision != "32-true":
        raise ExportError(f"a {guard.precision} guard cannot export; rebuild it with --precision 32-true")


def export_guard(guard: Guard, folder: str | Path, format: str = "onnx", check: bool = True) -> Path:
    """Write ``folder/guard.onnx`` (or ``guard.pt``) and, with ``check``, verify that it reproduces the guard within
    ``TOLERANCE`` on a random batch; returns the file."""
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_exportable(guard)
    graph = GuardGraph(copy.deepcopy(guard)).cpu().eval()  # a copy: the guard itself stays on its device
    height, width, channels = guard.preprocessing.image_shape
    example = torch.rand(4, channels, height, width, generator=torch.Generator().manual_seed(0))
    path = Path(folder) / FORMATS[format]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            data = _onnx_bytes(graph, example) if format == "onnx" else _torchscript_bytes(graph, example)
    except ExportError:
        raise
    except Exception as exc:  # exporters raise many kinds
        raise ExportError(f"detector {guard.detector_name} cannot export to {format}: {type(exc).__name__}: "
                          f"{(str(exc).strip().splitlines() or [''])[0][:200]}") from exc
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    if check:
        check_export(guard, path, format)
    return path


def _onnx_bytes(graph: GuardGraph, example: Tensor) -> bytes:
    program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["input"],
                                output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def _torchscript_bytes(graph: GuardGraph, example: Tensor) -> bytes:
    traced = torch.jit.trace(graph, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def run_export(path: str | Path, x: Tensor) -> dict[str, Tensor]:
    """The exported file's outputs on a preprocessed batch (onnxruntime for ONNX, torch.jit for TorchScript)."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise ConfigError("running an ONNX guard needs onnxruntime: pip install 'oodforge[deploy]'") from exc
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        return {name: torch.from_numpy(v) for name, v in zip(OUTPUT_NAMES, values, strict=True)}
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return dict(zip(OUTPUT_NAMES, module(x), strict=True))


def check_export(guard: Guard, path: Path, format: str, x: Tensor | None = None) -> None:
    """Refuse an export whose scores or decisions differ from the Python guard's on a batch."""
    height, width, channels = guard.preprocessing.image_shape
    x = x if x is not None else torch.rand(6, channels, height, width, generator=torch.Generator().manual_seed(1))
    try:
        got = run_export(path, x)
    except ConfigError:
        warnings.warn(f"{path} was written but not checked: onnxruntime is not installed", stacklevel=2)
        return
    logits, scores = guard.outputs(x)
    # p-values are steps of 1/(n+1): a score a float rounding away from a calibration score may take the next step,
    # so the file's p-values are checked against the guard's p-values of the file's own scores
    p = guard.p_values(got["score"].float(), got["logits"].argmax(1))
    gaps = {"score": _gap(got["score"], scores), "logits": _gap(got["logits"], logits),
            "p_value": _gap(got["p_value"], p)}
    bad = {k: v for k, v in gaps.items() if v > TOLERANCE}
    if bad or not torch.equal(got["out"].bool(), p <= guard.alpha):
        path.unlink(missing_ok=True)
        name, gap = next(iter(bad.items())) if bad else ("decision", 1.0)
        raise ExportError(f"detector {guard.detector_name} does not export faithfully to {format}: its {name} "
                          f"differs by {gap:.2e} (relative) from the guard's; nothing was written")


def _gap(a: Tensor, b: Tensor) -> float:
    """Largest difference relative to max(1, |b|)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) if len(b) else 0.0

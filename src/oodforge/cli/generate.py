"""``oodforge generate train|sample``: the class-conditional diffusion model from the command line."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from oodforge.util.errors import ConfigError

generate_app = typer.Typer(no_args_is_help=True, help="Train a class-conditional diffusion model and sample "
                           "synthetic ID images or label-interpolated outliers.")
console = Console(stderr=True)


@generate_app.command("train")
def train_generator(dataset: str = typer.Option("fashion_mnist", help="Registered dataset (train split)."),
                    out: Path = typer.Option(Path("runs/generator"), help="Folder for diffusion.ckpt."),
                    epochs: int | None = typer.Option(None, help="Epochs (default: the preset's)."),
                    batch_size: int | None = typer.Option(None), lr: float | None = typer.Option(None),
                    subset: int | None = typer.Option(None, help="Train on N images only (class-balanced)."),
                    seed: int = typer.Option(0), device: str = typer.Option("auto"),
                    preset: str = typer.Option("auto", help="Model size: cpu (a few CPU cores; RGB 32x32: 4.6M "
                                               "parameters, ~3.5 h on one core), gpu (RGB: 41M) or auto (cpu without "
                                               "a CUDA device; on one, gpu for RGB and cpu for small grayscale)."),
                    precision: str = typer.Option("auto", help="auto (bf16-mixed where the device runs bf16 "
                                                  "natively, else 32-true), 32-true or bf16-mixed."),
                    resume: bool = typer.Option(True, help="Continue from OUT/diffusion.ckpt if present."),
                    quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Train (or resume) the diffusion model; a checkpoint is written atomically every epoch."""

    from oodforge.data.datasets import load_dataset
    from oodforge.generate.diffusion import PRESETS, preset_for, resolve_device, train_diffusion
    from oodforge.util.precision import check_precision, resolve_precision
    from oodforge.util.validation import check_output_folder

    check_output_folder(out, "--out")
    check_precision(precision)
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    target = resolve_device(device)
    bf16 = resolve_precision(precision, target) == "bf16-mixed"
    images = load_dataset(dataset, "train")
    if subset:
        images = images.balanced_head(subset)
    height, _, channels = images.image_shape
    config = preset_for(height, channels, len(images.classes), preset, on_gpu=target.type == "cuda")
    overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    config = replace(config, seed=seed, bf16=bf16, **overrides)
    path = train_diffusion(images, config, out, resume=resume, quiet=quiet, device=device)
    console.print(f"wrote {path}")


@generate_app.command("sample")
def sample(generator: Path = typer.Option(..., help="A diffusion.ckpt written by 'generate train'."),
           kind: str = typer.Option("id", help="'id' (per-class images) or 'interpolated' (outliers)."),
           out: Path = typer.Option(..., help="Folder of the synthetic set (load it as synthetic:<folder>)."),
           per_class: int = typer.Option(600, help="Images per class (--kind id)."),
           n: int = typer.Option(6000, help="Number of outliers (--kind interpolated)."),
           alpha_range: tuple[float, float] = typer.Option((0.3, 0.7), help="Range of the mixing weight a."),
           seed: int = typer.Option(0), guidance: float = typer.Option(2.0, help="Classifier-free guidance."),
           steps: int = typer.Option(50, help="DDIM steps."), batch_size: int = typer.Option(256),
           device: str = typer.Option("auto"),
           precision: str = typer.Option("auto", help="auto (bf16-mixed where the device runs bf16 natively, "
                                         "else 32-true), 32-true or bf16-mixed."),
           resume: bool = typer.Option(True, help="Keep finished batches in .OUT.batches beside OUT and reuse "
                                       "those of an interrupted run of the same job; --no-resume starts over."),
           quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Sample a synthetic set (images, labels or class pairs, manifest, grid.png) into OUT; an interrupted
    run continues from its last finished batch."""
    from oodforge.data.synthetic import write_synthetic
    from oodforge.generate.diffusion import load_generator, sample_id, sample_interpolated
    from oodforge.generate.sample_chunks import chunks_folder
    from oodforge.util.validation import check_output_folder

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    check_output_folder(out.absolute().parent, "--out (its parent folder)")  # OUT itself is the set, made whole
    if kind not in ("id", "interpolated"):
        raise ConfigError(f"--kind must be 'id' or 'interpolated', got {kind!r}")
    from oodforge.util.precision import check_precision, resolve_precision

    check_precision(precision)
    model = load_generator(generator, device=device)
    model.config = replace(model.config, bf16=resolve_precision(precision, model.device) == "bf16-mixed")
    batches = chunks_folder(out)
    if not resume:
        shutil.rmtree(batches, ignore_errors=True)
    if kind == "id":
        images = sample_id(model, per_class, seed, guidance, steps, batch_size, quiet, batches)
    else:
        images = sample_interpolated(model, n, alpha_range, seed, guidance, steps, batch_size, quiet, batches)
    folder = write_synthetic(out, images, images.manifest, getattr(images, "extra", None))
    shutil.rmtree(batches, ignore_errors=True)
    console.print(f"wrote {len(images)} images to {folder} (grid: {folder / 'grid.png'})")

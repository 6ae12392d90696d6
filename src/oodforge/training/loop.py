"""One training loop on Lightning Fabric: a recipe = backbone + head + loss + data mix + outliers."""

from __future__ import annotations

import inspect
import math
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader

from oodforge.data.batches import AUGMENTATIONS, TensorBatches
from oodforge.data.benchmark import Images, holdout_record
from oodforge.data.benchmarks import Benchmark, adapt, get_benchmark
from oodforge.data.datasets import load_dataset, overlaps
from oodforge.data.imageset import ImageSet
from oodforge.data.sampling import MixedBatchSampler
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import loader_workers
from oodforge.losses import LOSSES, LossInputs, create_loss
from oodforge.losses.outlier_exposure import uniform_cross_entropy
from oodforge.models.classifier import (
    CheckpointError,
    Classifier,
    ModelConfig,
    build_classifier,
    load_classifier,
    nonfinite_tensors,
    read_checkpoint,
    save_classifier,
)
from oodforge.models.loading import check_model_fits
from oodforge.training.config import LAST_CHECKPOINT, MODEL_CHECKPOINT, TrainConfig
from oodforge.util.atomic import atomic_json, atomic_torch_save, remove_stale_temp_files
from oodforge.util.errors import ConfigError, DivergedError
from oodforge.util.precision import resolve_precision
from oodforge.util.progress import progress_bar


def make_model(config: TrainConfig, benchmark: Benchmark) -> Classifier:
    """The classifier a recipe trains: fresh, or loaded from ``config.init``."""
    height, width, channels = benchmark.image_shape
    model_config = ModelConfig(backbone=config.backbone or benchmark.default_backbone, head=config.head,
                               num_classes=benchmark.num_classes(), in_channels=channels,
                               mean=benchmark.mean, std=benchmark.std, head_options=dict(config.head_options))
    if not config.init:
        return build_classifier(model_config)
    init = load_classifier(config.init, pretrained_config(model_config, config.init))
    check_model_fits(init, benchmark, what=f"--init {config.init}")
    same_head = _same_head(init.config, model_config)
    model = build_classifier(init.config if same_head else _with_head(init.config, model_config))
    state = init.state_dict()
    if not same_head:  # another head: keep the backbone, and head tensors only where they fit (class weights)
        wanted = model.state_dict()
        state = {k: v for k, v in state.items()
                 if not k.startswith("head.") or (k in wanted and wanted[k].shape == v.shape)}
    missing = model.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise CheckpointError(f"{config.init}: unexpected weights {missing.unexpected_keys[:5]}")
    return model


def _same_head(a: ModelConfig, b: ModelConfig) -> bool:
    return a.head == b.head and a.head_options == b.head_options


def _with_head(base: ModelConfig, wanted: ModelConfig) -> ModelConfig:
    return ModelConfig(base.backbone, wanted.head, base.num_classes, base.in_channels, base.mean, base.std,
                       wanted.head_options)


def pretrained_config(config: ModelConfig, weights: str | Path) -> ModelConfig:
    """``config`` adjusted for known external weights (the CIFAR ResNets use ImageNet statistics)."""
    if Path(weights).name.startswith(("resnet20-", "resnet32-", "resnet44-", "resnet56-")):
        return ModelConfig(Path(weights).name.split("-")[0], "linear", config.num_classes, 3,
                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return config


class TrainStep(nn.Module):
    """Model + loss in one module so Fabric (and DDP) sees every trainable parameter."""

    def __init__(self, model: Classifier, loss: nn.Module, oe_weight: float) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.oe_weight = oe_weight

    def forward(self, x: Tensor, y: Tensor, x_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        features = self.model.features(x if x_out is None else torch.cat([x, x_out]))
        id_features, out_features = features[:n], (None if x_out is None else features[n:])
        logits = self.model.head(id_features, y)
        plain = self.model.head(features)
        batch = LossInputs(logits, y, id_features, plain[:n], None if x_out is None else plain[n:], out_features)
        loss = self.loss(batch)
        if x_out is not None and not getattr(self.loss, "uses_outliers", False):
            loss = loss + self.oe_weight * uniform_cross_entropy(batch.outlier_logits)
        return loss, logits.detach()


def build_loss(config: TrainConfig, model: Classifier) -> nn.Module:
    """The recipe's loss; losses that declare ``num_classes``/``feature_dim`` get them."""
    accepted = inspect.signature(LOSSES.get(config.loss)).parameters
    extra = {"num_classes": model.config.num_classes, "feature_dim": model.backbone.feature_dim}
    return create_loss(config.loss, **config.loss_options, **{k: v for k, v in extra.items() if k in accepted})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(), "python": random.getstate()[1]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


class TrainingData(NamedTuple):
    """The images a recipe trains on, all in the ID image format, and the ``held_out`` record of what it leaves out."""

    real: Images  # the ID training split minus the ID validation hold-out (then ``train_subset``'s head)
    synthetic: ImageSet | None
    outliers: ImageSet | None
    held_out: dict  # ``holdout_record``: the held-out images, or {"separate": val.id spec}


def training_data(config: TrainConfig, benchmark: Benchmark) -> TrainingData:
    """The real ID images (without the ID validation images ``Benchmark.split_train`` holds out), the synthetic ID
    set and the outlier set of a recipe, with the record of the hold-out."""
    train = benchmark.id_set("train")
    real = benchmark.without_holdout(train)
    if config.train_subset:
        real = real.balanced_head(config.train_subset)
    synthetic = adapt(load_dataset(config.synthetic_id, "train"), benchmark.image_shape, benchmark.resize) \
        if config.synthetic_id else None
    outliers = None
    if config.outliers:
        check_outlier_source(benchmark, config.outliers)
        outliers = adapt(load_dataset(config.outliers, "train", image_shape=benchmark.image_shape),
                         benchmark.image_shape, benchmark.resize)
    return TrainingData(real, synthetic, outliers, holdout_record(benchmark, train=train))


def check_outlier_source(benchmark: Benchmark, source: str) -> None:
    """Refuse training outliers drawn from one of the benchmark's test OOD sets."""
    clash = [name for name in benchmark.ood if overlaps(source, name)]
    if clash:
        raise ConfigError(f"outlier source {source!r} overlaps test OOD set {clash[0]!r} of benchmark "
                         f"{benchmark.name!r}; train on a disjoint source")


def batch_source(benchmark: Benchmark, sets: list, sampler: MixedBatchSampler, device: torch.device
                 ) -> Iterable[tuple[Tensor, Tensor]]:
    """Training batches: cut from a uint8 tensor on ``device`` and augmented per batch when every set is in
    memory (``TensorBatches``), else a DataLoader with per-image transforms (streamed sets)."""
    augment = None if benchmark.augment == "none" else benchmark.augment
    if all(isinstance(s, ImageSet) for s in sets) and augment in AUGMENTATIONS:
        return TensorBatches(sets, sampler, device, augment, channels_last=sets[0].image_shape[2] > 1)
    transform = benchmark.train_transform()
    return DataLoader(ConcatDataset([s.torch_dataset(transform) for s in sets]), batch_sampler=sampler,
                      num_workers=loader_workers(sets[0]))


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def training_precision(config: TrainConfig) -> str:
    """The recipe's precision resolved for the device Fabric trains on (``auto`` -> bf16-mixed or 32-true)."""
    return resolve_precision(config.precision, training_device(config.accelerator))


def make_fabric(config: TrainConfig) -> Fabric:
    """A launched Fabric for the recipe's accelerator, devices, nodes, strategy and resolved precision."""
    fabric = Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                    strategy=config.strategy, precision=training_precision(config))
    fabric.launch()
    return fabric


def train(config: TrainConfig, out_dir: str | Path, resume: bool = True, quiet: bool = False,
          stop_after_epochs: int | None = None, fabric: Fabric | None = None) -> Classifier:
    """Train a classifier per ``config`` into ``out_dir``; resumes from ``out_dir/last.ckpt``.

    A checkpoint is written atomically after every epoch; ``stop_after_epochs`` ends the run early
    (as a kill would), which tests use to check resumption. ``fabric``: a launched Fabric to train with
    (default: ``make_fabric(config)``), so a caller can go on using its processes (e.g. to extract
    outputs over every DDP rank).
    """
    out_dir = Path(out_dir)
    config.validate()
    remove_stale_temp_files(out_dir)  # e.g. a .last.ckpt temp file of a killed run
    fabric = fabric or make_fabric(config)
    precision = training_precision(config)
    seed_everything(config.seed)
    benchmark = get_benchmark(config.benchmark)
    model = make_model(config, benchmark)
    loss_fn = build_loss(config, model)
    step = TrainStep(model, loss_fn, config.oe_weight)
    optimizer = torch.optim.SGD(step.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    real, synthetic, outliers, held_out = training_data(config, benchmark)
    transform = benchmark.train_transform()
    sampler = MixedBatchSampler(len(real), config.batch_size, len(synthetic) if synthetic else 0,
                                config.real_ratio, config.seed, fabric.global_rank, fabric.world_size)
    loader = batch_source(benchmark, [real] + ([synthetic] if synthetic else []), sampler, fabric.device)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(sampler))
    history: list[dict] = []
    start_epoch = 0
    last = out_dir / LAST_CHECKPOINT
    if resume and last.is_file():
        state = read_checkpoint(last)
        if state.get("train_config") != asdict(config):
            raise CheckpointError(f"{last} was written by a different recipe; use a new --out or --no-resume")
        if state.get("held_out") != held_out:
            raise CheckpointError(f"{last} was written with other training images; use a new --out or --no-resume")
        step.load_state_dict(state["step"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
    else:
        start_centres(loss_fn, model, real, fine_tuning=bool(config.init))
    step, optimizer = fabric.setup(step, optimizer)
    outlier_batches = None
    if outliers is not None:
        generator = torch.Generator().manual_seed(config.seed + 1)
        outlier_loader = DataLoader(outliers.torch_dataset(transform), shuffle=True, drop_last=True,
                                    num_workers=loader_workers(outliers),
                                    batch_size=min(config.outlier_batch_size or config.batch_size, len(outliers)),
                                    generator=generator)
        outlier_batches = _cycle(outlier_loader)
    with progress_bar(quiet or not fabric.is_global_zero) as bar:
        task = bar.add_task("train", total=(config.epochs - start_epoch) * len(sampler))
        for epoch in range(start_epoch, config.epochs):
            if stop_after_epochs is not None and epoch >= stop_after_epochs:
                break
            tic = time.perf_counter()
            sampler.set_epoch(epoch)
            step.train()
            total_loss, correct, seen = 0.0, 0, 0
            for x, y in loader:
                x, y = fabric.to_device((x, y))
                x_out = fabric.to_device(next(outlier_batches)[0]) if outlier_batches else None
                loss, logits = step(x, y, x_out)
                if not math.isfinite(loss.item()):
                    raise DivergedError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{config.epochs} loss {total_loss / seen:.3f}")
            history.append({"epoch": epoch + 1, "loss": total_loss / seen, "train_accuracy": correct / seen,
                            "seconds": time.perf_counter() - tic, "precision": precision})
            bad = nonfinite_tensors(model.state_dict())
            if bad:
                raise DivergedError(f"weights became NaN or infinite during epoch {epoch + 1} (e.g. {bad[0]}); "
                                         f"nothing was saved for it; lower --lr")
            if seen and nonfinite_outputs(model, x, fabric):
                raise DivergedError(f"outputs became NaN or infinite after the last step of epoch {epoch + 1} "
                                         f"(weights up to {largest_weight(model):.1e}); nothing was saved for it; "
                                         f"lower --lr")
            if fabric.is_global_zero:
                atomic_torch_save({"format": "oodforge-training", "model_config": asdict(model.config),
                                   "train_config": asdict(config), "epoch": epoch + 1, "history": history,
                                   "model": model.state_dict(), "step": step.state_dict(),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "rng": _rng_state(), "held_out": held_out}, last)
    attach_centres(model, loss_fn)
    if fabric.is_global_zero:
        copy_sample_grids(config, out_dir)
    if fabric.is_global_zero and len(history) == config.epochs:
        record = {"train_config": asdict(config), "history": history, "held_out": held_out}
        save_classifier(model, out_dir / MODEL_CHECKPOINT, extra=record)
        atomic_json(record, out_dir / "train.json")
    model.history = history
    return model.eval()


def nonfinite_outputs(model: Classifier, x: Tensor, fabric: Fabric) -> bool:
    """Whether ``model`` as the last optimizer step left it gives NaN or infinite logits on ``x`` (the epoch's last
    batch) in eval mode and float32, as scoring runs it, in any process. The loss of a step is checked before
    its update, so a last step that blows finite weights up to where every output overflows shows only here."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            bad = not bool(torch.isfinite(model(x.float())).all())
    finally:
        model.train(was_training)
    if fabric.world_size > 1:  # every process takes the same branch, so none waits alone in a collective
        bad = bool(fabric.all_reduce(torch.tensor(float(bad), device=fabric.device), reduce_op="max") > 0)
    return bad


def largest_weight(model: nn.Module) -> float:
    """The largest absolute value among the model's floating-point parameters."""
    return max((float(p.detach().abs().max()) for p in model.parameters() if p.is_floating_point() and p.numel()),
               default=0.0)


def training_device(accelerator: str) -> str:
    """The device type Fabric trains on for ``accelerator`` (``auto``: CUDA when available)."""
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def start_centres(loss: nn.Module, model: Classifier, real: ImageSet, fine_tuning: bool = False) -> None:
    """Fresh runs of ``sde`` with ``centre_init=class_means`` (or ``auto`` when ``fine_tuning``): centres = the
    starting model's unit-norm class means.

    The outputs come from the output cache, so seeds fine-tuning the same model share one forward pass.
    """
    init = getattr(loss, "centre_init", None)
    if init == "class_means" or (init == "auto" and fine_tuning):
        outputs = OutputCache().outputs(model, real)
        loss.init_centres_from(outputs.features, outputs.labels)


def attach_centres(model: Classifier, loss: nn.Module) -> None:
    """Copy learned class centres (semantic-driven energy) onto the model for its detectors."""
    centres = getattr(loss, "centres", None)
    if centres is not None:
        model.class_centres = centres.detach().clone()


def copy_sample_grids(config: TrainConfig, out_dir: Path, prefix: str = "") -> None:
    """Put the grid.png of every synthetic set the recipe used into ``out_dir/figures`` (for the report).

    The copies are named ``<prefix><role>-grid.png``, role ``synthetic-id`` or ``outliers``.
    """
    for role, spec in (("synthetic-id", config.synthetic_id), ("outliers", config.outliers)):
        if spec and spec.startswith("synthetic:"):
            grid = Path(spec.split(":", 1)[1]) / "grid.png"
            if grid.is_file():
                (out_dir / "figures").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(grid, out_dir / "figures" / f"{prefix}{role}-grid.png")

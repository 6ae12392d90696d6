"""Write a canvas detection benchmark to disk: PNG images and one COCO file per split, all or nothing.

Layout of the folder::

    benchmark.json                 format, benchmark name, seed, settings, categories, splits (written last)
    <split>/annotations.json       COCO: images, annotations (bbox [x, y, w, h]), categories
    <split>/images/000000.png      canvas 0 of the split (image id 1), ...

``<split>`` is each of ``train``, ``val``, ``test_id``, ``test_ood``, ``test_mixed`` and ``train_outliers``
(those with a count above 0). The folder is filled beside its target (``.<name>.<host>-<pid>.partial``) and renamed
into place, so a crash never leaves a half-written benchmark. The same benchmark, settings and seed give
byte-identical files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from PIL import Image

from oodforge.data.canvas import ALPHA_THRESHOLD
from oodforge.data.canvas_benchmark import PLANS, SPLITS, CanvasBenchmark, CanvasMaker
from oodforge.data.coco import ANNOTATIONS, IMAGES, coco_annotation, coco_document
from oodforge.util.atomic import atomic_json, partial_path, process_tag, remove_stale_temp_files, write_failure
from oodforge.util.errors import ConfigError, WriteError
from oodforge.util.progress import progress_bar

FORMAT = "oodforge-detection-canvas"
MANIFEST = "benchmark.json"


def write_split(maker: CanvasMaker, split: str, seed: int, folder: Path, advance: object = None) -> dict:
    """Write the canvases of ``split`` as PNGs under ``folder/images`` and their COCO file; returns its summary."""
    count, kind = maker.bench.counts[split], PLANS[split].kind
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        canvas = maker.make(split, seed, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(canvas.image).save(folder / IMAGES / file_name, format="PNG", compress_level=6)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": maker.bench.size,
                       "height": maker.bench.size, "kind": kind})
        for box, category, origin in zip(canvas.boxes, canvas.category_ids, canvas.origins, strict=True):
            annotations.append(coco_annotation(len(annotations) + 1, image_id, box, int(category), **origin))
        if callable(advance):
            advance()
    description = f"oodforge {maker.bench.name}, split {split}, seed {seed}"
    atomic_json(coco_document(description, images, annotations, maker.categories), folder / ANNOTATIONS)
    return {"count": count, "kind": kind, "objects": len(annotations),
            "annotations": f"{split}/{ANNOTATIONS}", "images": f"{split}/{IMAGES}"}


def write_canvas_benchmark(bench: CanvasBenchmark, out: str | Path, seed: int = 0, root: str | Path | None = None,
                           overwrite: bool = False, quiet: bool = True) -> Path:
    """Write every split of ``bench`` with a count above 0 into folder ``out`` (see the module for the layout).

    An ``out`` that exists and is not empty is refused, unless ``overwrite`` and it holds a benchmark written
    before: that one is replaced whole once the new one is complete. Object and background images are read from
    ``root`` (``$OODFORGE_DATA`` by default).
    """
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    maker = CanvasMaker(bench, root)
    splits = [split for split in SPLITS if bench.counts[split] > 0]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out.parent)
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary = {}
        with progress_bar(quiet) as progress:
            task = progress.add_task(f"canvases of {bench.name}", total=sum(bench.counts[s] for s in splits))
            for split in splits:
                summary[split] = write_split(maker, split, seed, partial / split,
                                             lambda: progress.advance(task))
        manifest = {"format": FORMAT, "version": 1, "benchmark": bench.name, "seed": seed,
                    "alpha_threshold": ALPHA_THRESHOLD, "settings": bench.options(),
                    "categories": maker.categories, "splits": summary}
        atomic_json(manifest, partial / MANIFEST)
        _swap_in(partial, out)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(out, write_failure(exc), exc.errno) from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    """``out`` must be absent, an empty folder, or (with ``overwrite``) a canvas benchmark written before."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file; name a folder to write the benchmark into")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out} is not empty; choose another folder or pass overwrite=True")
    if not (out / MANIFEST).is_file():
        raise ConfigError(f"{out} holds no {MANIFEST}: overwrite replaces only a benchmark written before")


def _swap_in(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` folder to ``out``, moving a previous ``out`` aside and removing it after."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(partial, out)
        return
    old = out.with_name(f".{out.name}.old.{process_tag()}.partial")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)

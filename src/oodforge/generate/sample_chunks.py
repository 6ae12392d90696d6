"""Resumable sampling: the finished batches of one sampling job, kept on disk until the set is written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from oodforge.util.atomic import atomic_json, atomic_npy
from oodforge.util.errors import ConfigError

KEY_NAME = "key.json"


def job_key(model_hash: str, embeddings: torch.Tensor, seed: int, guidance: float, steps: int,
            batch_size: int, bf16: bool) -> dict:
    """What makes a sampling job's batches reusable: the same model, conditions, noise, sampler and batching."""
    conditions = embeddings.detach().float().cpu().contiguous().numpy()
    return {"model_hash": model_hash, "embeddings_sha256": hashlib.sha256(conditions.tobytes()).hexdigest(),
            "count": int(len(conditions)), "seed": int(seed), "guidance": float(guidance), "steps": int(steps),
            "batch_size": int(batch_size), "bf16": bool(bf16)}


class SampleChunks:
    """Batches of one sampling job in ``folder``: ``key.json`` names the job, ``batch-<start>.npy`` each batch.

    Batch k of a job is a pure function of the key (image i starts from the i-th noise image of the seed),
    so a batch written by an interrupted run is exactly the batch a new run would compute.
    """

    def __init__(self, folder: str | Path, key: dict) -> None:
        self.folder = Path(folder)
        self.key = key

    def open(self) -> SampleChunks:
        """Create the folder, or check that the batches already in it belong to this job."""
        path = self.folder / KEY_NAME
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path} is unreadable ({exc.__class__.__name__}); remove {self.folder}") from exc
            if stored != self.key:
                changed = sorted(k for k in self.key if stored.get(k) != self.key[k])
                raise ConfigError(f"{self.folder} holds batches of another sampling job (differs in "
                                 f"{', '.join(changed) or 'its fields'}); remove it or sample without resuming")
        else:
            atomic_json(self.key, path)
        return self

    def _path(self, start: int) -> Path:
        return self.folder / f"batch-{start:08d}.npy"

    def load(self, start: int, stop: int) -> np.ndarray | None:
        """The stored images of batch ``start:stop``, or None when it is not done (or its file is damaged)."""
        path = self._path(start)
        if not path.exists():
            return None
        try:
            images = np.load(path)
        except (OSError, ValueError):
            return None
        return images if len(images) == stop - start and images.dtype == np.uint8 else None

    def save(self, start: int, images: np.ndarray) -> None:
        """Store one finished batch atomically."""
        atomic_npy(np.ascontiguousarray(images, dtype=np.uint8), self._path(start))

    def remove(self) -> None:
        """Delete the folder (after the whole set was written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def chunks_folder(out: str | Path) -> Path:
    """Where ``generate sample --out OUT`` keeps its finished batches: a hidden folder beside OUT."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.batches")

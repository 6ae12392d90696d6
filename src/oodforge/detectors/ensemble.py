"""Deep ensembles (Lakshminarayanan et al. 2017): the maximum of the members' mean softmax."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, features_and_logits, require_interface
from oodforge.util.errors import ConfigError


@DETECTORS.register("ensemble")
class Ensemble(Detector):
    """Score = max_c (1 / M) sum_m softmax(f_m(x))_c over M members: the model itself and one copy of it per
    checkpoint in ``members`` (files joined by ``+``), each a plain state dict, a ``{"state_dict": ...}`` dict
    or an oodforge checkpoint of the same architecture. Lakshminarayanan et al. 2017, "Simple and Scalable
    Predictive Uncertainty Estimation using Deep Ensembles" (the mean of the members' probabilities, Eq. 3).
    OpenOOD's ``ensemble`` postprocessor takes the softmax of the mean logits instead. Scoring runs every member
    on the inputs; the members are read once per model and kept.
    """

    needs_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, members: str | None = None) -> None:
        self.members = members

    def _check(self) -> None:
        missing = [path for path in self._paths() if not Path(path).is_file()]
        if missing:
            raise ConfigError(f"ensemble: members file not found: {', '.join(missing)}")

    def supports(self, model: nn.Module | None) -> bool:
        """Only with member files: without them the ensemble would be the model's MSP under another name (so
        ``--detectors all`` leaves it out)."""
        return bool(self._paths()) and super().supports(model)

    def _paths(self) -> list[str]:
        return [p.strip() for p in self.members.split("+") if p.strip()] if self.members else []

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        model = require_interface(model)
        total = None
        with torch.no_grad():
            for member in [model, *self._copies(model)]:
                member.train(model.training)
                probabilities = torch.softmax(features_and_logits(member, x)[1].float(), dim=1)
                total = probabilities if total is None else total + probabilities
        return (total / (1 + len(self._paths()))).max(dim=1).values

    def _copies(self, model: nn.Module) -> list[nn.Module]:
        """One copy of ``model`` per member file, with that file's weights (read once per model and members)."""
        key = (id(model), self.members, str(next((p.device for p in model.parameters()), "cpu")))
        cached = getattr(self, "_loaded", None)
        if cached is None or cached[0] != key:
            copies = []
            for path in self._paths():
                member = copy.deepcopy(model)
                load_member(member, path)
                copies.append(member)
            self._loaded = (key, copies)
        return self._loaded[1]

    def _score(self, outputs: ModelOutputs) -> Tensor:
        """Without member files the ensemble is the model alone: its maximum softmax probability."""
        if self._paths():
            raise ConfigError("ensemble runs its members on the inputs: call score(model, x) with the inputs")
        return torch.softmax(outputs.logits.float(), dim=1).max(dim=1).values


def load_member(member: nn.Module, path: str) -> None:
    """Load the weights in ``path`` into ``member`` (same architecture), or one error naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise ConfigError(f"ensemble: cannot read members file {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and state.get("format") == "oodforge-classifier":
        state = state.get("state_dict")
    elif isinstance(state, dict) and state.get("format") == "oodforge-training":
        state = state.get("model")
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"ensemble: members file {path} holds no state dict")
    try:
        member.load_state_dict(_renamed(state, set(member.state_dict())))
    except RuntimeError as exc:
        raise ConfigError(f"ensemble: members file {path} does not fit the model: "
                          f"{' '.join(str(exc).split())[:300]}") from None


def _renamed(state: dict, model_keys: set[str]) -> dict:
    """``state`` under the model's names: without a ``module.`` prefix, and with the prefix the model's own names
    add (a wrapped net's weights in its wrapper) when that makes the names match."""
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    if set(state) == model_keys:
        return state
    first = next(iter(state))
    for key in model_keys:
        if key.endswith(first):
            prefixed = {key[: len(key) - len(first)] + k: v for k, v in state.items()}
            if set(prefixed) == model_keys:
                return prefixed
    return state

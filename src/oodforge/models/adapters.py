"""Adapters that give any torchvision, timm or plain PyTorch classifier oodforge's classifier interface."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from oodforge.models.classifier import CheckpointError, Classifier, read_checkpoint, state_dict_mismatch
from oodforge.models.layers import default_layers
from oodforge.outputs import has_interface
from oodforge.util.errors import ConfigError, ModelError

HEAD_CANDIDATES = ("fc", "classifier", "heads.head", "head", "heads")
SPEC_FORMS = "torchvision:NAME, timm:NAME or module:pkg.mod:factory"


class ModelSpecError(ModelError):
    """A ``--model`` network whose factory or forward raises, or whose outputs do not fit the benchmark."""


def one_line_cause(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, for one-line errors about a user's code."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class WrappedClassifier(nn.Module):
    """A classifier ``net`` seen through oodforge's interface: ``features``, ``logits`` and ``head``."""

    def __init__(
        self,
        net: nn.Module,
        head_name: str,
        family: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.head_name = head_name
        self.family = family
        self.layer_names = None if layers is None else [str(name) for name in layers]
        self.normalize = mean is not None
        self._norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std)) if self.normalize else None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def head(self) -> nn.Linear:
        """The net's final linear layer (the module itself, not a copy)."""
        return self.net.get_submodule(self.head_name)

    @property
    def num_classes(self) -> int:
        """Number of classes, the final layer's ``out_features``."""
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        """Penultimate feature size, the final layer's ``in_features``."""
        return self.head.in_features

    def _prepare(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std if self.normalize else x

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the wrapped net, ``net(x)``."""
        return self.net(self._prepare(x))

    def logits(self, x: Tensor) -> Tensor:
        """Logits f(x), shape (N, C): exactly what the net returns."""
        return self.net(self._prepare(x))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features h(x), shape (N, D): the input of the final linear layer."""
        return self.features_and_logits(x)[0]

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate features and logits from one forward pass of the net."""
        captured: list[Tensor] = []

        def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["input"])

        handle = self.head.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            logits = self.net(self._prepare(x))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"head {self.head_name!r} of {type(self.net).__name__} ran {len(captured)} times in one forward "
                "pass, expected once; pass head= naming the layer that produces the logits"
            )
        return torch.flatten(captured[0], 1), logits

    def default_layers(self) -> list[str]:
        """The intermediate layers multi-layer detectors read: ``layers=`` as given, else the net's stage ends
        (``oodforge.models.layers``), found once."""
        if self.layer_names is None:
            channels = next((m.in_channels for m in self.net.modules() if isinstance(m, nn.Conv2d)), 3)
            self.layer_names = default_layers(self.net, channels)
        return list(self.layer_names)

    def layer_module(self, name: str) -> nn.Module:
        """The wrapped net's module ``name`` (names are the net's own, as in ``net.named_modules()``)."""
        return self.net.get_submodule(name)

    def describe(self) -> dict:
        """JSON-serialisable summary of the wrapped net for results.json."""
        info = {
            "net": type(self.net).__name__,
            "head": self.head_name,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "family": self.family,
        }
        if self._norm is not None:
            info["mean"], info["std"] = list(self._norm[0]), list(self._norm[1])
        return info


def wrap_model(
    net: nn.Module,
    head: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layers: Sequence[str] | None = None,
) -> nn.Module:
    """Give ``net`` the ``features``/``logits``/``head`` interface; oodforge classifiers pass through unchanged.
    ``layers`` names the modules multi-layer detectors read (default: the net's stage ends)."""
    if isinstance(net, (Classifier, WrappedClassifier)):
        return net
    if not isinstance(net, nn.Module):
        raise TypeError(f"wrap_model expects an nn.Module, got {type(net).__name__}")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    if mean is not None and len(mean) != len(std):
        raise ConfigError(f"mean has {len(mean)} values but std has {len(std)}")
    head_name = _check_head(net, head) if head is not None else _detect_head(net)
    if layers is not None:
        for name in layers:
            try:
                net.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"layer {name!r} not found in {type(net).__name__}") from None
    return WrappedClassifier(net, head_name, _family(net), mean=mean, std=std, layers=layers)


def _family(net: nn.Module) -> str:
    if _is_timm(net):
        return "timm"
    return "torchvision" if type(net).__module__.startswith("torchvision") else "generic"


def _is_timm(net: nn.Module) -> bool:
    return all(callable(getattr(net, name, None)) for name in ("forward_features", "forward_head", "get_classifier"))


def _linear_names(net: nn.Module, limit: int = 5) -> str:
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        return "it has no nn.Linear layers"
    shown = ", ".join(repr(name) for name in names[-limit:])
    return f"its nn.Linear layers: {shown}" + (f" (last {limit} of {len(names)})" if len(names) > limit else "")


def _check_head(net: nn.Module, name: str) -> str:
    try:
        module = net.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"head {name!r} not found in {type(net).__name__}; {_linear_names(net)}") from None
    if not isinstance(module, nn.Linear):
        raise ConfigError(
            f"head {name!r} of {type(net).__name__} is a {type(module).__name__}, not an nn.Linear; "
            f"{_linear_names(net)}"
        )
    return name


def _detect_head(net: nn.Module) -> str:
    if _is_timm(net):
        classifier = net.get_classifier()
        if isinstance(classifier, nn.Linear):
            for name, module in net.named_modules():
                if module is classifier:
                    return name
    for candidate in HEAD_CANDIDATES:
        try:
            module = net.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return candidate
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
            return f"{candidate}.{list(module._modules)[-1]}"
    if isinstance(net, nn.Sequential) and len(net) and isinstance(net[-1], nn.Linear):
        return list(net._modules)[-1]
    raise ConfigError(
        f"cannot find the final linear layer of {type(net).__name__}; pass head='dotted.name'; {_linear_names(net)}"
    )


def build_model(spec: str, weights: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """Build the raw network named by a ``--model`` spec, load ``weights`` into it and put it in eval mode."""
    kind, sep, name = spec.partition(":")
    builders: dict[str, Callable[[str, int | None], nn.Module]] = {
        "torchvision": _torchvision_net,
        "timm": _timm_net,
        "module": _module_net,
    }
    if not sep or not name or kind not in builders:
        raise ConfigError(f"unknown model spec {spec!r}; use {SPEC_FORMS}")
    net = builders[kind](name, num_classes)
    if weights is not None:
        load_weights(net, weights, spec)
    return net.eval()


def _torchvision_net(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    options = {} if num_classes is None else {"num_classes": num_classes}
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ConfigError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from None
    return builder(weights=None, **options)


def _timm_net(name: str, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"model timm:{name} needs timm, but timm is not installed: pip install 'oodforge[timm]'"
        ) from None
    options = {} if num_classes is None else {"num_classes": num_classes}
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, **options)


def _module_net(target: str, num_classes: int | None) -> nn.Module:
    module_name, sep, factory_name = target.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise ConfigError(f"model spec module:{target} must read module:pkg.mod:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the user's module raises while it is imported
        raise ModelSpecError(f"--model module:{target}: cannot import module {module_name!r}: "
                             f"{one_line_cause(exc)}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {factory_name!r} (model spec module:{target})")
    try:
        net = factory(num_classes=num_classes) if num_classes is not None and _takes_num_classes(factory) else factory()
    except Exception as exc:  # the user's code may raise anything
        raise ModelSpecError(f"--model module:{target}: the factory raised {one_line_cause(exc)}") from exc
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"--model module:{target}: the factory returned a {type(net).__name__}, "
                             "not an nn.Module")
    return net


def _takes_num_classes(factory: Callable) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def load_weights(net: nn.Module, weights: str | Path, spec: str) -> None:
    """Load a state dict file into ``net``, raising ``CheckpointError`` when it does not fit ``spec``."""
    state = read_checkpoint(weights)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    problem = state_dict_mismatch(net.state_dict(), state)
    if problem:
        raise CheckpointError(f"--weights {weights} does not fit --model {spec}: {problem}")
    net.load_state_dict(state, strict=False)


def classifier_view(model: nn.Module) -> nn.Module:
    """``model`` if it has oodforge's classifier interface (``features_and_logits``, or ``features`` and
    ``head``), else ``wrap_model(model)``."""
    return model if has_interface(model) else wrap_model(model)

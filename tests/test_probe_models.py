"""A user's model checked at the door: factories and forwards that raise or return the wrong thing, weights and
checkpoints that do not fit, each refused in one ``error:`` line before any data goes through the model."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from oodforge.cli import app
from oodforge.data.benchmarks import get_benchmark
from oodforge.models.adapters import ModelSpecError
from oodforge.models.classifier import CheckpointError, ModelConfig, build_classifier, load_classifier, read_checkpoint
from oodforge.models.heads import create_head
from oodforge.models.loading import check_model_fits, load_model

runner = CliRunner()

NETS = """
import torch
from torch import nn

CALLS = []  # batch sizes seen by forward


def body(channels=3):
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Net(nn.Module):
    def __init__(self, channels=3, classes=3, columns=None, result="logits"):
        super().__init__()
        self.body, self.fc = body(channels), nn.Linear(4, classes)
        self.columns, self.result = columns, result

    def forward(self, x):
        CALLS.append(x.shape[0])
        if self.result == "raise":
            raise RuntimeError("boom in forward\\nsecond line of the message")
        features = self.body(x)
        logits = self.fc(features)[:, :self.columns]
        return (logits, features) if self.result == "tuple" else logits


def fine():
    return Net()


def raising_factory():
    raise RuntimeError("no weights for this size\\nsecond line of the message")


def tuple_forward():
    return Net(result="tuple")


def raising_forward():
    return Net(result="raise")


def gray_net():
    return Net(channels=1)


def narrow_forward():
    return Net(columns=2)
"""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The user module ``probe_nets`` (importable), its call log emptied."""
    (tmp_path / "probe_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_nets", raising=False)
    import probe_nets

    yield probe_nets
    sys.modules.pop("probe_nets", None)


def write_benchmark(root: Path, channels: int = 3) -> Path:
    """A YAML benchmark over 16 x 16 folders: 3 ID classes (4 train, 2 test images each), one OOD folder."""
    rng = np.random.default_rng(0)
    for folder, classes, count in (("train", ("ash", "elm", "oak"), 4), ("test", ("ash", "elm", "oak"), 2),
                                   ("weeds", ("x",), 4)):
        for name in classes:
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / name / f"{i}.png")
    config = {"name": "leaves", "id": {"train": "folder:train", "test": "folder:test"},
              "ood": {"weeds": {"data": "folder:weeds", "group": "near"}}, "image_size": 16,
              "mean": [0.5] * channels, "std": [0.25] * channels}
    path = root / f"leaves{channels}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def leaves(tmp_path) -> Path:
    return write_benchmark(tmp_path)


def score(benchmark: Path, out: Path, *model: str):
    return runner.invoke(app, ["score", "--benchmark", str(benchmark), "--detectors", "msp", "--out", str(out),
                               "--quiet", *model])


def one_error(result) -> str:
    """The single ``error:`` line of a run that exited with code 2."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def resnet20_weights(path: Path, in_channels: int, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Path:
    """A resnet20 state dict saved the way the public CIFAR checkpoints are (``module.`` keys, ``linear`` head)."""
    model = build_classifier(ModelConfig(backbone="resnet20", num_classes=3, in_channels=in_channels,
                                         mean=(0.5,) * in_channels, std=(0.25,) * in_channels))
    state = {"module." + key.removeprefix("backbone.").replace("head.", "linear."): value
             for key, value in model.state_dict().items()}
    for key in drop:
        del state[key]
    state.update({key: torch.zeros(1) for key in extra})
    torch.save({"state_dict": state, "best_prec1": 90.0}, path)
    return path


# ---------------------------------------------------------------- row 4: tracebacks from a user's model


@pytest.mark.parametrize("factory, cause", [
    ("raising_factory", "the factory raised RuntimeError: no weights for this size"),
    ("tuple_forward", "forward returns a tuple, expected a Tensor of logits"),
    ("raising_forward", "forward raised RuntimeError: boom in forward"),
])
def test_user_factory_or_forward_failing_is_one_error_line_naming_the_spec(leaves, tmp_path, nets, factory,
                                                                           cause) -> None:
    """Row 4: a factory that raises, a forward returning a tuple or raising: one error line, nothing scored."""
    out = tmp_path / "run"
    line = one_error(score(leaves, out, "--model", f"module:probe_nets:{factory}"))
    assert line == f"error: --model module:probe_nets:{factory}: {cause}"
    assert nets.CALLS == ([] if factory == "raising_factory" else [2])  # only the 2-image probe, never the data
    assert not out.exists()


def test_one_channel_net_fed_rgb_is_one_error_line_naming_the_spec(leaves, tmp_path, nets) -> None:
    """Row 4: a network built with Conv2d(1, ...) scored on a 3-channel benchmark."""
    out = tmp_path / "run"
    line = one_error(score(leaves, out, "--model", "module:probe_nets:gray_net"))
    assert line.startswith("error: --model module:probe_nets:gray_net: forward raised RuntimeError: ")
    assert "expected input[2, 3, 16, 16] to have 1 channels, but got 3 channels" in line
    assert nets.CALLS == [2] and not out.exists()


def test_a_fitting_user_model_is_probed_once_then_scored(leaves, tmp_path, nets) -> None:
    """Row 4: the probe lets a sound network through; it sees one 2-image batch before the data."""
    result = score(leaves, tmp_path / "run", "--model", "module:probe_nets:fine")
    assert result.exit_code == 0, result.output
    assert nets.CALLS == [2, 3 * 2, 4]  # the probe, then the ID test and OOD images (msp fits on nothing)
    assert (tmp_path / "run" / "results.json").is_file()


# ---------------------------------------------------------------- row 12: logits narrower than the last layer


def test_logit_columns_checked_against_the_class_count_before_scoring(leaves, tmp_path, nets) -> None:
    """Row 12: the final Linear has 3 outputs but forward returns 2 columns: refused, not scored silently."""
    out = tmp_path / "run"
    line = one_error(score(leaves, out, "--model", "module:probe_nets:narrow_forward"))
    assert line == ("error: --model module:probe_nets:narrow_forward: forward returns 2 logit columns but "
                    "benchmark 'leaves' has 3 classes")
    assert nets.CALLS == [2] and not out.exists()


def test_python_load_model_raises_model_spec_error(leaves, nets) -> None:
    """Row 12: the Python path that loads a model from a spec raises one ValueError subclass."""
    with pytest.raises(ModelSpecError, match="^--model module:probe_nets:narrow_forward: forward returns 2 logit "
                                             "columns but benchmark 'leaves' has 3 classes$"):
        load_model("module:probe_nets:narrow_forward", None, get_benchmark(str(leaves)))
    assert issubclass(ModelSpecError, ValueError)


def test_checkpoint_models_are_probed_once_in_eval_mode_and_keep_their_mode(leaves, tmp_path) -> None:
    """Row 12: the first-batch check covers oodforge classifiers too: one zero batch of 2 images, mode restored."""
    model = build_classifier(ModelConfig(num_classes=3, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)).train()
    seen = []
    model.backbone.register_forward_hook(lambda module, args, output: seen.append((args[0].shape, module.training)))
    check_model_fits(model, get_benchmark(str(leaves)), what="--model m.ckpt")
    assert seen == [((2, 3, 16, 16), False)]
    assert model.training
    model.head = create_head("linear", model.backbone.feature_dim, 2)  # disagrees with config.num_classes
    with pytest.raises(ModelSpecError, match="^--model m.ckpt: forward returns 2 logit columns but benchmark "
                                             "'leaves' has 3 classes$"):
        check_model_fits(model, get_benchmark(str(leaves)), what="--model m.ckpt")


# ---------------------------------------------------------------- row 10: checkpoint messages, one line each


@pytest.mark.parametrize("model", ["small_cnn", "torchvision:mobilenet_v3_small"])
def test_pickled_objects_in_weights_are_one_line_without_unsafe_advice(leaves, tmp_path, model) -> None:
    """Row 10: a checkpoint holding pickled objects names the file and the object; never suggests weights_only."""
    weights = tmp_path / "with-args.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 4)}, "args": argparse.Namespace(lr=0.1)}, weights)
    out = tmp_path / "run"
    result = score(leaves, out, "--model", model, "--weights", str(weights))
    assert one_error(result) == (
        f"error: checkpoint {weights} holds pickled Python objects (argparse.Namespace) that oodforge will not "
        "load; only tensors and plain containers (dicts, lists, numbers, strings) are loaded: save a state_dict")
    assert "weights_only" not in result.output and not out.exists()


def test_unreadable_checkpoint_message_is_one_line_without_unsafe_advice(tmp_path) -> None:
    """Row 10: a damaged file or a whole pickled module gives one line naming the file, no weights_only advice."""
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02garbage" * 10)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError) as damaged:
        read_checkpoint(tmp_path / "junk.pt")
    assert str(damaged.value) == (f"cannot read checkpoint {tmp_path / 'junk.pt'}: not a file torch.save wrote, "
                                  "or damaged (Unsupported operand 103)")
    with pytest.raises(CheckpointError) as pickled:
        read_checkpoint(tmp_path / "module.pt")
    message = str(pickled.value)
    assert "(torch.nn.modules.linear.Linear) that oodforge will not load" in message
    assert str(tmp_path / "module.pt") in message and "\n" not in message and "weights_only" not in message


def test_three_channel_weights_on_one_channel_data_name_the_layer_and_shapes(tmp_path) -> None:
    """Row 10: 3-channel weights on a 1-channel benchmark: one line with the layer, both shapes and the channels."""
    gray = write_benchmark(tmp_path, channels=1)
    weights = resnet20_weights(tmp_path / "W.th", in_channels=3)
    out = tmp_path / "run"
    line = one_error(score(gray, out, "--model", "resnet20", "--weights", str(weights)))
    assert line == (f"error: --weights {weights} does not fit the resnet20 model: layer conv1.weight: the model "
                    "expects shape (16, 1, 3, 3), the weights have (16, 3, 3, 3) (the model expects 1 input channel, "
                    "the weights have 3)")
    assert not out.exists()


def test_missing_and_unexpected_keys_are_one_line_with_counts_and_a_few_names(tmp_path) -> None:
    """Row 10: missing and unexpected keys: one line naming a few of each and their counts."""
    extra = tuple(f"module.extra{i}.weight" for i in range(5))
    weights = resnet20_weights(tmp_path / "W.th", 3, drop=("module.layer3.2.bn2.running_var",), extra=extra)
    config = ModelConfig(backbone="resnet20", num_classes=3, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(CheckpointError) as error:
        load_classifier(weights, config, source="--weights W.th")
    assert str(error.value) == (
        "--weights W.th does not fit the resnet20 model: 1 key of the model missing from the weights "
        "('backbone.layer3.2.bn2.running_var'); 5 keys in the weights not in the model ('extra0.weight', "
        "'extra1.weight', 'extra2.weight' and 2 more)")


def test_wrong_class_count_in_external_weights_is_named(tmp_path) -> None:
    """Row 10: a head of another class count: the layer, both shapes and the class counts, one line."""
    weights = resnet20_weights(tmp_path / "W.th", 3)
    config = ModelConfig(backbone="resnet20", num_classes=5, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(CheckpointError) as error:
        load_classifier(weights, config)
    assert str(error.value) == (
        f"{weights} does not fit the resnet20 model: layer linear.weight: the model expects shape (5, 64), the "
        "weights have (3, 64) (the model predicts 5 classes, the weights 3); 1 more layer with a different shape "
        "('linear.bias')")


def test_user_module_that_fails_on_import_is_one_line(tmp_path, monkeypatch, leaves) -> None:
    """Row 4: a user module raising while it is imported (not an ImportError) is one error line too."""
    (tmp_path / "broken_nets.py").write_text(textwrap.dedent("""
        raise RuntimeError("CUDA_VISIBLE_DEVICES is not set\\nsecond line")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_nets", raising=False)
    line = one_error(score(leaves, tmp_path / "run", "--model", "module:broken_nets:make"))
    assert line == ("error: --model module:broken_nets:make: cannot import module 'broken_nets': RuntimeError: "
                    "CUDA_VISIBLE_DEVICES is not set")

"""Fine-tuning from a checkpoint with outliers (energy / semantic-driven energy), then scoring."""

import json

import torch
from typer.testing import CliRunner

from conftest import needs_mnist_family
from oodforge.cli import app
from oodforge.detectors import create_detector
from oodforge.models.classifier import load_classifier

runner = CliRunner()


@needs_mnist_family
def test_finetune_with_outliers_then_score(tmp_path):
    base = tmp_path / "base"
    result = runner.invoke(app, ["train", "--epochs", "1", "--train-subset", "512", "--lr", "0.05",
                                 "--detectors", "msp", "--out", str(base), "--quiet"])
    assert result.exit_code == 0, result.output
    for loss in ("energy", "sde"):
        out = tmp_path / loss
        result = runner.invoke(app, ["train", "--init", str(base / "model.ckpt"), "--loss", loss,
                                     "--loss-option", "m_in=-7", "--loss-option", "m_out=-2",
                                     "--outliers", "natural_patches", "--outlier-batch-size", "64",
                                     "--epochs", "1", "--lr", "0.001", "--train-subset", "256",
                                     "--detectors", "msp,energy,semantic_energy,representation",
                                     "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        results = json.loads((out / "results.json").read_text())
        assert results["train"]["outliers"] == "natural_patches" and results["train"]["loss"] == loss
        assert len(results["results"]) == 4 * 3
    model = load_classifier(tmp_path / "sde" / "model.ckpt")
    assert model.class_centres.shape == (10, model.backbone.feature_dim)
    detector = create_detector("semantic_energy")
    from oodforge.detectors import ModelOutputs

    x = torch.randn(4, 256)
    detector.fit(ModelOutputs(torch.randn(4, 10), x, torch.arange(4)), model)
    assert detector.centre_source_ == "model"
    # fine-tuning started from the base weights: the backbone's first conv moved only a little
    base_model = load_classifier(tmp_path / "base" / "model.ckpt")
    first = "backbone.body.0.weight"
    drift = (model.state_dict()[first] - base_model.state_dict()[first]).norm() / base_model.state_dict()[first].norm()
    assert 0 < drift < 0.5


@needs_mnist_family
def test_sde_with_class_mean_centres_starts_from_the_init_models_features(tmp_path):
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.evaluation.extraction import compute_outputs
    from oodforge.scores import normalized_class_means
    from oodforge.training.config import TrainConfig
    from oodforge.training.loop import train

    base = train(TrainConfig(epochs=1, train_subset=300, lr=0.05), tmp_path / "base", quiet=True)
    config = TrainConfig(init=str(tmp_path / "base" / "model.ckpt"), loss="sde", epochs=0, train_subset=300,
                         loss_options={"centre_init": "class_means"})
    model = train(config, tmp_path / "sde", quiet=True)
    outputs = compute_outputs(base, get_benchmark("fashion_mnist").id_set("train").balanced_head(300))
    means = torch.nn.functional.normalize(normalized_class_means(outputs.features, outputs.labels), dim=1)
    assert torch.allclose(model.class_centres, means, atol=1e-5)
    # centre_init=auto (the default) also starts from the class means when the recipe fine-tunes
    auto = train(TrainConfig(init=config.init, loss="sde", epochs=0, train_subset=300), tmp_path / "auto", quiet=True)
    assert torch.allclose(auto.class_centres, means, atol=1e-5)

"""Class-conditional diffusion: label interpolation, training resume, deterministic sampling (tiny UNet)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from oodforge.data.imageset import ImageSet
from oodforge.generate import diffusion
from oodforge.generate.diffusion import (
    DiffusionConfig,
    build_model,
    interpolate_embeddings,
    load_generator,
    preset_for,
    sample_embeddings,
    sample_id,
    sample_interpolated,
    train_diffusion,
)
from oodforge.models.classifier import CheckpointError

TINY = DiffusionConfig(image_size=8, channels=1, num_classes=3, block_out_channels=(8, 16),
                       layers_per_block=1, mid_attention=False, epochs=1, batch_size=8, warmup_steps=2,
                       bf16=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one thread avoids OpenMP spin-waits when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy_images() -> ImageSet:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
    return ImageSet("toy", images, np.arange(24, dtype=np.int64) % 3, ["a", "b", "c"])


@pytest.fixture(scope="module")
def trained(toy_images, tmp_path_factory) -> diffusion.DiffusionGenerator:
    path = train_diffusion(toy_images, TINY, tmp_path_factory.mktemp("tiny"), quiet=True, device="cpu")
    return load_generator(path, device="cpu")


@pytest.fixture(scope="module")
def two_epochs(toy_images, tmp_path_factory) -> dict:
    """The checkpoint of an uninterrupted 2-epoch run, to compare resumed runs with."""
    path = train_diffusion(toy_images, replace(TINY, epochs=2), tmp_path_factory.mktemp("two"), quiet=True,
                           device="cpu")
    return torch.load(path, weights_only=True)


def states_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_interpolated_embedding_lies_on_the_segment() -> None:
    table = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    for i, j, alpha in [(0, 3, 0.3), (4, 1, 0.55), (2, 0, 0.7)]:
        e = interpolate_embeddings(table, i, j, alpha)
        direction = table[i] - table[j]
        coefficient = torch.dot(e - table[j], direction) / torch.dot(direction, direction)
        assert coefficient == pytest.approx(alpha, abs=1e-5)
        torch.testing.assert_close(e - table[j], coefficient * direction)


def test_interpolation_is_batched_and_hits_the_endpoints() -> None:
    table = torch.randn(4, 6)
    i, j = torch.tensor([0, 1, 2]), torch.tensor([3, 2, 0])
    e = interpolate_embeddings(table, i, j, torch.tensor([1.0, 0.0, 0.25]))
    torch.testing.assert_close(e[0], table[0])
    torch.testing.assert_close(e[1], table[2])
    torch.testing.assert_close(e[2], 0.25 * table[2] + 0.75 * table[0])
    with pytest.raises(ValueError, match="alpha"):
        interpolate_embeddings(table, 0, 1, 1.5)


def test_unet_is_conditioned_by_the_embedding_vectors() -> None:
    model = build_model(TINY).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        by_label = model(x, t, model.embed(labels))
        by_vector = model(x, t, model.label_embedding.weight[labels].clone())
        other = model(x, t, model.embed(torch.tensor([2, 2])))
    torch.testing.assert_close(by_label, by_vector)
    assert not torch.allclose(by_label, other)
    assert model.label_embedding.num_embeddings == TINY.num_classes + 1  # last row: null class


def test_resume_continues_training_exactly(toy_images, two_epochs, tmp_path) -> None:
    two = replace(TINY, epochs=2)
    first = torch.load(train_diffusion(toy_images, TINY, tmp_path / "b", quiet=True, device="cpu"),
                       weights_only=True)
    assert first["epoch"] == 1 and first["global_step"] == 3
    resumed = torch.load(train_diffusion(toy_images, two, tmp_path / "b", quiet=True, device="cpu"),
                         weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 6 and len(resumed["history"]) == 2
    assert not states_equal(first["ema"], resumed["ema"])
    assert states_equal(two_epochs["model"], resumed["model"]) and states_equal(two_epochs["ema"], resumed["ema"])


def test_kill_mid_epoch_then_resume(toy_images, two_epochs, tmp_path, monkeypatch) -> None:
    two = replace(TINY, epochs=2)
    real_save = diffusion.atomic_torch_save
    saves = []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(obj["global_step"])
        if len(saves) == 3:
            raise KeyboardInterrupt  # the process dies right after a mid-epoch checkpoint

    monkeypatch.setattr(diffusion, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(toy_images, two, tmp_path, quiet=True, device="cpu", checkpoint_every=2)
    monkeypatch.setattr(diffusion, "atomic_torch_save", real_save)
    assert saves == [2, 3, 4]  # 3 steps per epoch: mid-epoch at 2, end of epoch 1 at 3, mid-epoch at 4
    killed = torch.load(tmp_path / diffusion.CHECKPOINT_NAME, weights_only=True)
    assert killed["epoch"] == 1 and killed["step_in_epoch"] == 1
    resumed = torch.load(train_diffusion(toy_images, two, tmp_path, quiet=True, device="cpu"),
                         weights_only=True)
    assert states_equal(two_epochs["model"], resumed["model"]) and states_equal(two_epochs["ema"], resumed["ema"])
    assert states_equal(two_epochs["optimizer"]["state"][0], resumed["optimizer"]["state"][0])


def test_training_time_adds_up_over_resumes_and_a_log_file_gets_a_line_per_checkpoint(
        toy_images, tmp_path, monkeypatch, capsys) -> None:
    ticks = iter(range(0, 10_000, 10))  # every perf_counter call is 10 "seconds" after the previous one
    monkeypatch.setattr(diffusion.time, "perf_counter", lambda: float(next(ticks)))
    first = torch.load(train_diffusion(toy_images, TINY, tmp_path, device="cpu", checkpoint_every=2),
                       weights_only=True)
    assert first["train_seconds"] > 0 and first["history"][0]["train_seconds"] >= first["train_seconds"] - 10
    resumed = torch.load(train_diffusion(toy_images, replace(TINY, epochs=2), tmp_path, device="cpu",
                                         checkpoint_every=2), weights_only=True)
    assert resumed["train_seconds"] > first["train_seconds"]  # the second run adds to the first one's time
    assert resumed["history"][1]["train_seconds"] > first["train_seconds"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("diffusion epoch")]
    assert len(lines) == 4  # steps 2 and 3 (end of epoch 1), then 4 and 6 (end of epoch 2) after the resume
    assert lines[1].startswith("diffusion epoch 1/1, step 3/3:") and "images/s" in lines[1]
    assert lines[-1].startswith("diffusion epoch 2/2, step 6/6:") and "checkpoint saved" in lines[-1]


def test_resume_refuses_a_different_config(toy_images, tmp_path) -> None:
    train_diffusion(toy_images, TINY, tmp_path, quiet=True, device="cpu")
    with pytest.raises(CheckpointError, match="lr"):
        train_diffusion(toy_images, replace(TINY, lr=0.5), tmp_path, quiet=True, device="cpu")


def test_training_rejects_mismatched_images(toy_images, tmp_path) -> None:
    with pytest.raises(ValueError, match="expects"):
        train_diffusion(toy_images, replace(TINY, image_size=16), tmp_path, quiet=True, device="cpu")


def test_load_generator_names_missing_and_corrupt_files(tmp_path) -> None:
    missing = tmp_path / "nothing.ckpt"
    with pytest.raises(CheckpointError, match="nothing.ckpt"):
        load_generator(missing)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        load_generator(corrupt)
    other = tmp_path / "other.ckpt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(CheckpointError, match="other.ckpt"):
        load_generator(other)


def test_sample_id_is_deterministic(trained) -> None:
    first = sample_id(trained, per_class=2, seed=3, guidance=2.0, steps=4, batch_size=4, quiet=True)
    second = sample_id(trained, per_class=2, seed=3, guidance=2.0, steps=4, batch_size=4, quiet=True)
    other = sample_id(trained, per_class=2, seed=4, guidance=2.0, steps=4, batch_size=4, quiet=True)
    assert first.images.shape == (6, 8, 8, 1) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, second.images)
    assert not np.array_equal(first.images, other.images)
    np.testing.assert_array_equal(first.labels, [0, 0, 1, 1, 2, 2])
    assert first.manifest["kind"] == "id" and first.manifest["model_hash"] == trained.model_hash
    assert first.classes == ["a", "b", "c"]


def test_sample_interpolated_records_pairs_and_alphas(trained) -> None:
    first = sample_interpolated(trained, n=5, alpha_range=(0.3, 0.7), seed=1, steps=3, quiet=True)
    second = sample_interpolated(trained, n=5, alpha_range=(0.3, 0.7), seed=1, steps=3, quiet=True)
    np.testing.assert_array_equal(first.images, second.images)
    pairs, alphas = first.extra["pairs"], first.extra["alphas"]
    assert pairs.shape == (5, 2) and np.all(pairs[:, 0] != pairs[:, 1]) and np.all(pairs < 3)
    assert np.all((alphas >= 0.3) & (alphas <= 0.7))
    np.testing.assert_array_equal(first.labels, -1)
    assert first.manifest["kind"] == "interpolated" and first.manifest["alpha_range"] == [0.3, 0.7]


def test_interpolating_with_alpha_one_reproduces_the_class(trained) -> None:
    outlier = sample_interpolated(trained, n=3, alpha_range=(1.0, 1.0), seed=2, steps=3, quiet=True)
    first = outlier.extra["pairs"][:, 0]
    with torch.no_grad():
        vectors = trained.model.embed(torch.from_numpy(first))
    expected = sample_embeddings(trained, vectors, seed=2, guidance=2.0, steps=3, quiet=True)
    np.testing.assert_array_equal(outlier.images, expected)


def test_interrupted_sampling_continues_from_its_stored_batches(trained, tmp_path, monkeypatch) -> None:
    """A job killed after its first batch resumes with the rest only and returns the uninterrupted images."""
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        vectors = trained.model.embed(labels)
    expected = sample_embeddings(trained, vectors, seed=5, steps=3, batch_size=2, quiet=True)
    real_denoise, calls = diffusion._denoise, []

    def failing_second_batch(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_denoise(*args, **kwargs)

    folder = tmp_path / "batches"
    monkeypatch.setattr(diffusion, "_denoise", failing_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sample_embeddings(trained, vectors, seed=5, steps=3, batch_size=2, quiet=True, chunks=folder)
    assert sorted(p.name for p in folder.glob("batch-*.npy")) == ["batch-00000000.npy"]

    calls.clear()
    monkeypatch.setattr(diffusion, "_denoise", lambda *a, **k: (calls.append(len(a[1])), real_denoise(*a, **k))[1])
    resumed = sample_embeddings(trained, vectors, seed=5, steps=3, batch_size=2, quiet=True, chunks=folder)
    assert calls == [2, 1]  # batches 2:4 and 4:5 only; 0:2 came from disk
    np.testing.assert_array_equal(resumed, expected)
    calls.clear()
    again = sample_embeddings(trained, vectors, seed=5, steps=3, batch_size=2, quiet=True, chunks=folder)
    assert calls == [] and np.array_equal(again, expected)


def test_sampling_refuses_the_batches_of_another_job(trained, tmp_path) -> None:
    folder = tmp_path / "batches"
    sample_id(trained, per_class=1, seed=0, steps=2, batch_size=2, quiet=True, chunks=folder)
    with pytest.raises(ValueError, match=r"batches.*another sampling job.*seed"):
        sample_id(trained, per_class=1, seed=1, steps=2, batch_size=2, quiet=True, chunks=folder)
    with pytest.raises(ValueError, match=r"another sampling job.*batch_size"):
        sample_id(trained, per_class=1, seed=0, steps=2, batch_size=3, quiet=True, chunks=folder)


def test_presets() -> None:
    small, large = preset_for(28, 1, 10), preset_for(32, 3, 100)
    assert small.block_out_channels == (32, 64, 64) and small.num_classes == 10
    assert large.channels == 3 and large.num_classes == 100 and large.attention
    assert preset_for(28, 1, 10, "cpu") == small and preset_for(32, 3, 100, "gpu") == large
    rgb_cpu = preset_for(32, 3, 10, "cpu")
    assert rgb_cpu.channels == 3 and rgb_cpu.block_out_channels == (64, 128, 128) and not rgb_cpu.attention
    parameters = sum(p.numel() for p in build_model(replace(rgb_cpu, bf16=False)).parameters())
    assert 4e6 < parameters < 5e6  # the size the README's 2-hour CPU budget was measured for
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_for(32, 3, 10, "tpu")
    build_model(replace(small, bf16=False))
    with pytest.raises(ValueError, match="divisible"):
        DiffusionConfig(image_size=28, block_out_channels=(32, 64, 64, 64))

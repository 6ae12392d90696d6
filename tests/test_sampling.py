"""MixedBatchSampler: SIO's real + synthetic batches, plain shuffled batches, epochs and ranks."""

from __future__ import annotations

import math

import pytest

from oodforge.data.sampling import MixedBatchSampler


def test_mixed_batches_hold_round_b_r_real_and_the_rest_synthetic() -> None:
    sampler = MixedBatchSampler(n_real=1000, batch_size=128, n_synthetic=500, real_ratio=0.8)
    batches = list(sampler)
    assert len(sampler) == len(batches) == math.ceil(1000 / 128) == 8
    for batch in batches:
        assert len(batch) == 128
        real = [i for i in batch if i < 1000]
        synthetic = [i for i in batch if i >= 1000]
        assert len(real) == 102  # round(128 * 0.8) = round(102.4)
        assert len(synthetic) == 26
        assert all(1000 <= i < 1500 for i in synthetic)


def test_real_indices_do_not_repeat_within_an_epoch() -> None:
    batches = list(MixedBatchSampler(n_real=1000, batch_size=128, n_synthetic=500, real_ratio=0.8, seed=3))
    real = [i for batch in batches for i in batch if i < 1000]
    assert len(real) == 8 * 102 == 816  # 816 < 1000: one permutation is enough
    assert len(set(real)) == 816


def test_each_source_wraps_into_a_fresh_permutation() -> None:
    # 10 real, 6 real per batch, 2 batches -> 12 real draws: a full permutation, then 2 from the next one.
    # 5 synthetic, 2 per batch -> 4 draws from one permutation of 10..14.
    sampler = MixedBatchSampler(n_real=10, batch_size=8, n_synthetic=5, real_ratio=0.75, seed=1)
    batches = list(sampler)
    assert len(batches) == 2
    real = [i for batch in batches for i in batch[:6]]
    synthetic = [i for batch in batches for i in batch[6:]]
    assert sorted(real[:10]) == list(range(10))
    assert all(0 <= i < 10 for i in real[10:])
    assert len(set(synthetic)) == 4 and all(10 <= i < 15 for i in synthetic)


def test_small_synthetic_pool_is_cycled_through_whole_permutations() -> None:
    batches = list(MixedBatchSampler(n_real=1000, batch_size=128, n_synthetic=50, real_ratio=0.8))
    synthetic = [i for batch in batches for i in batch if i >= 1000]
    assert len(synthetic) == 8 * 26
    for start in range(0, 200, 50):  # 208 draws = 4 full permutations of 50, then 8 more
        assert sorted(synthetic[start:start + 50]) == list(range(1000, 1050))


def test_set_epoch_changes_the_order_deterministically() -> None:
    def epoch(number: int, seed: int = 0) -> list[list[int]]:
        sampler = MixedBatchSampler(n_real=300, batch_size=32, n_synthetic=100, real_ratio=0.75, seed=seed)
        sampler.set_epoch(number)
        return list(sampler)

    assert epoch(0) == epoch(0)
    assert epoch(1) == epoch(1)
    assert epoch(0) != epoch(1)
    assert epoch(0, seed=0) != epoch(0, seed=1)
    sampler = MixedBatchSampler(n_real=300, batch_size=32, n_synthetic=100, real_ratio=0.75)
    assert list(sampler) == list(sampler)  # iterating twice in one epoch repeats the order


def test_without_synthetic_images_it_is_a_shuffled_batch_sampler() -> None:
    sampler = MixedBatchSampler(n_real=1000, batch_size=128, seed=2)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 8
    assert [len(b) for b in batches] == [128] * 7 + [1000 - 7 * 128]
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1000))
    assert flat != list(range(1000))  # shuffled


def test_real_ratio_is_ignored_without_synthetic_images() -> None:
    batches = list(MixedBatchSampler(n_real=100, batch_size=32, real_ratio=0.5))
    assert [len(b) for b in batches] == [32, 32, 32, 4]


@pytest.mark.parametrize("n_synthetic", [0, 200])
def test_ranks_partition_the_batches(n_synthetic) -> None:
    kwargs = {"n_real": 1100, "batch_size": 128, "n_synthetic": n_synthetic, "real_ratio": 0.8, "seed": 5}
    full = list(MixedBatchSampler(**kwargs))  # ceil(1100 / 128) = 9 batches
    assert len(full) == 9
    rank0 = MixedBatchSampler(**kwargs, rank=0, world_size=2)
    rank1 = MixedBatchSampler(**kwargs, rank=1, world_size=2)
    assert (len(rank0), len(rank1)) == (5, 4)
    batches0, batches1 = list(rank0), list(rank1)
    assert batches0 == full[0::2]
    assert batches1 == full[1::2]
    if n_synthetic == 0:
        assert sorted(i for b in batches0 + batches1 for i in b) == list(range(1100))
    else:
        real0 = {i for b in batches0 for i in b if i < 1100}
        real1 = {i for b in batches1 for i in b if i < 1100}
        assert not real0 & real1  # 9 * 102 = 918 real draws < 1100: ranks never share a real image


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_invalid_real_ratio_raises(ratio) -> None:
    with pytest.raises(ValueError, match="real_ratio"):
        MixedBatchSampler(n_real=10, batch_size=4, n_synthetic=4, real_ratio=ratio)


@pytest.mark.parametrize(("n_real", "batch_size"), [(0, 4), (10, 0), (-1, 4)])
def test_invalid_sizes_raise(n_real, batch_size) -> None:
    with pytest.raises(ValueError):
        MixedBatchSampler(n_real=n_real, batch_size=batch_size)

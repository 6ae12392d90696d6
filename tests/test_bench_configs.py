"""Every bench config shipped in benchmarks/configs/ validates (keys, types, every run x seed recipe) without data,
so a typo fails here in seconds instead of hours into a benchmark run."""

from __future__ import annotations

from pathlib import Path

import pytest

from oodforge.bench import bench_recipes, benchmark_reference, load_bench_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path: Path, tmp_path: Path) -> None:
    config = load_bench_config(path)
    recipes = bench_recipes(config, benchmark_reference(config["benchmark"], path), tmp_path)
    seeds = {(run["name"], seed) for run, seed, _ in recipes}
    assert len(seeds) == len(recipes)  # no run x seed twice
    names = [run["name"] for run in config["runs"]]
    assert len(names) == len(set(names)), f"{path.name}: duplicate run names"
    # fine-tunes name their starting model per seed, so no two seeds share one
    for run, seed, recipe in recipes:
        if recipe.init and "{seed}" in run.get("init", ""):
            assert f"seed{seed}" in recipe.init

"""Every bench config shipped in benchmarks/configs/ validates (keys, types, every run x seed recipe) without data,
so a typo fails here in seconds instead of hours into a benchmark run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from oodforge.bench.jobs import bench_recipes, benchmark_reference, load_bench_config, select_part
from oodforge.cli import app

runner = CliRunner()
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


def test_select_part_keeps_the_named_runs_and_seeds(tmp_path) -> None:
    config = {"seeds": [0, 1, 2], "runs": [{"name": "a"}, {"name": "b", "seeds": [5]}, {"name": "c"}]}
    path = tmp_path / "x.yaml"
    part = select_part(config, path, only=["a", "b"], seeds=[1, 2])
    assert part["runs"] == [{"name": "a", "seeds": [1, 2]}]  # b has no seed 1 or 2: dropped
    assert select_part(config, path, seeds=[5])["runs"] == [{"name": "b", "seeds": [5]}]
    assert select_part(config, path) == config
    with pytest.raises(ValueError, match=r"--seeds: \[7\]"):
        select_part(config, path, only=["a"], seeds=[0, 7])
    with pytest.raises(ValueError, match=r"no runs named \['z'\]"):
        select_part(config, path, only=["z"])


def test_bench_seeds_flag_is_checked_at_the_door(tmp_path) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text("benchmark: fashion_mnist\nseeds: [0, 1]\nruns:\n  - {name: ce, loss: ce}\n")
    for bad, words in (("0,x", "--seeds '0,x' must be comma-separated integers"), ("3", "--seeds: [3]")):
        result = runner.invoke(app, ["bench", str(config), "--out", str(tmp_path / "o"), "--seeds", bad, "--quiet"])
        assert result.exit_code == 2 and result.output.startswith("error:") and words in result.output
        assert not (tmp_path / "o" / "ce").exists()  # refused before any training

"""``oodforge bench``: several recipes x seeds from one YAML file -> one results.json, report, summary.

Config keys: ``benchmark``, ``detectors`` (as for ``--detectors``), ``seeds`` (list), ``defaults``
(``TrainConfig`` fields shared by all runs) and ``runs`` (list of ``{name: ..., <TrainConfig fields>}``;
a run may set its own ``seeds``, e.g. one seed for a run that does not train) and ``resources``
(``{num_cpus: 1, num_gpus: 0.25}``: what each run x seed takes on Ray, ``--executor ray``).
Each run/seed trains into ``OUT/<name>/seed<k>/`` (resumable) and is scored as method
``<name>-seed<k>``; ``summary.md``/``summary.json`` give mean ± std over seeds.

Path-valued fields (``init``, ``outliers``, ``synthetic_id``) expand ``$VARIABLES`` and the
placeholders ``{out}`` (the bench output folder) and ``{seed}``, so a run can fine-tune from an
earlier run of the same bench, seed by seed: ``init: "{out}/ce/seed{seed}/model.ckpt"``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from rich.console import Console

from oodforge.bench.executors import check_executor, check_resources, run_jobs
from oodforge.data.benchmarks import Benchmark, get_benchmark
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import default_device
from oodforge.evaluation.result import mean_metric, percent
from oodforge.evaluation.runner import evaluate
from oodforge.evaluation.specs import parse_detector_spec
from oodforge.runs.payload import MethodRun, methods_of, print_results
from oodforge.runs.pipeline import write_run
from oodforge.runs.store import EVALUATION_JSON, evaluation_key, load_evaluation, save_evaluation
from oodforge.training.config import MODEL_CHECKPOINT, TrainConfig, with_recipe_detectors
from oodforge.training.loop import copy_sample_grids, train
from oodforge.util.atomic import read_yaml_mapping
from oodforge.util.errors import ConfigError
from oodforge.util.precision import resolve_precision

CONFIG_KEYS = {"benchmark", "detectors", "seeds", "defaults", "runs", "description", "tune", "resources"}
PATH_KEYS = ("init", "outliers", "synthetic_id")
DEFAULT_DETECTORS = "msp,maxlogit,energy"


def resolve_paths(options: dict, out: Path, seed: int) -> dict:
    """Expand ``$VARS``, ``{out}`` and ``{seed}`` in the path-valued fields of a run's options."""
    resolved = dict(options)
    for key in PATH_KEYS:
        if isinstance(resolved.get(key), str):
            resolved[key] = os.path.expandvars(resolved[key]).replace("{out}", str(out)).replace(
                "{seed}", str(seed))
    return resolved


def benchmark_reference(name: str, config_path: Path) -> str:
    """A benchmark name, or a YAML benchmark file taken relative to the bench config's folder."""
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute():
        return str(config_path.parent / name)
    return name


def load_bench_config(path: Path) -> dict:
    """Read and validate a bench YAML file, types included; errors name the file and the bad key."""
    config = read_yaml_mapping(path, "bench config")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    runs = config.get("runs")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"{path}: 'runs' must be a non-empty list of runs, each a mapping with a 'name'")
    kinds = {"detectors": str, "benchmark": str, "defaults": dict, "tune": bool, "description": str}
    for key, kind in kinds.items():
        if key in config and not isinstance(config[key], kind):
            raise ConfigError(f"{path}: {key} must be a {kind.__name__}, got {config[key]!r}")
    _check_seeds(config.get("seeds", [0]), path, "seeds")
    check_resources(config.get("resources", {}), path)
    allowed = {f.name for f in fields(TrainConfig)}
    for key in config.get("defaults", {}):
        if key not in allowed:
            raise ConfigError(f"{path}: defaults: {key!r} is not a training option")
    for run in runs:
        bad = set(run) - allowed - {"name", "seeds"}
        if "name" not in run or bad:
            raise ConfigError(f"{path}: each run needs a 'name' and TrainConfig fields; bad keys {sorted(bad)}")
        name = run["name"]
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"{path}: run name {name!r} must be a plain folder name (no '/', not '.' or '..')")
        _check_seeds(run.get("seeds", [0]), path, f"run {name}: seeds")
    return config


def _check_seeds(seeds: object, path: Path, where: str) -> None:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise ConfigError(f"{path}: {where} must be a non-empty list of integers, got {seeds!r}")


def bench_recipes(config: dict, reference: str, out: Path) -> list[tuple[dict, int, TrainConfig]]:
    """(run, seed, recipe) for every run x seed, each recipe validated (types and ranges) before any training."""
    recipes = []
    for run in config["runs"]:
        for seed in run.get("seeds", config.get("seeds", [0])):
            own = {k: v for k, v in run.items() if k not in ("name", "seeds")}
            options = resolve_paths({**config.get("defaults", {}), **own}, out, seed)
            recipe = TrainConfig(**{"benchmark": reference, **options, "seed": seed})
            try:
                recipe.validate()
            except ValueError as exc:
                raise ConfigError(f"run {run['name']} (seed {seed}): {exc}") from None
            recipes.append((run, seed, recipe))
    return recipes


@dataclass(frozen=True)
class BenchJob:
    """One (run, seed) of a bench: trained into ``run_dir`` (resumable) and scored as ``<run>-seed<k>``."""

    run: str
    seed: int
    recipe: TrainConfig
    run_dir: Path
    out: Path  # the bench folder
    needs: tuple[str, ...]  # methods whose files this job reads (run after them)
    detectors: str  # the config's detectors plus the recipe's own
    tune: bool
    rescore: bool = False  # score again even when the run folder holds this model's evaluation

    @property
    def method(self) -> str:
        return f"{self.run}-seed{self.seed}"


def bench_jobs(config: dict, reference: str, out: Path, rescore: bool = False) -> list[BenchJob]:
    """One job per run x seed, in config order; a job whose paths point into an earlier job's folder
    (``init: "{out}/ce/seed{seed}/model.ckpt"``) names that job in ``needs``; ``rescore``: score every job
    again instead of reusing stored evaluations."""
    jobs: list[BenchJob] = []
    for run, seed, recipe in bench_recipes(config, reference, out):
        paths = [str(getattr(recipe, key)) + os.sep for key in PATH_KEYS if getattr(recipe, key)]
        run_dir = out / run["name"] / f"seed{seed}"
        needs = tuple(job.method for job in jobs if any(str(job.run_dir) + os.sep in p for p in paths))
        jobs.append(BenchJob(run["name"], seed, recipe, run_dir, out, needs,
                             with_recipe_detectors(config.get("detectors", DEFAULT_DETECTORS), recipe),
                             bool(config.get("tune", False)), rescore))
    return jobs


def run_job(job: BenchJob, benchmark: Benchmark, quiet: bool = False) -> MethodRun:
    """Train (resuming from ``run_dir/last.ckpt``) and score one job: its ``MethodRun``. The evaluation
    is stored in the run folder and reused while the model and the way it is scored stay the same
    (``oodforge.runs.store``), unless ``job.rescore``."""
    tic = time.perf_counter()
    model = train(job.recipe, job.run_dir, resume=True, quiet=quiet)
    train_s = time.perf_counter() - tic
    copy_sample_grids(job.recipe, job.out, prefix=f"{job.run}-")  # the bench report shows them too
    device = default_device()
    key = evaluation_key(model, benchmark, job.detectors, tune=job.tune, outliers=job.recipe.outliers,
                         train_subset=job.recipe.train_subset, precision=resolve_precision(job.recipe.precision,
                                                                                           device))
    evaluation = None if job.rescore else load_evaluation(job.run_dir, key)
    if evaluation is None:
        evaluation = evaluate(model, benchmark, parse_detector_spec(job.detectors), method=job.method,
                              tune=job.tune, cache=OutputCache(), quiet=quiet, train_subset=job.recipe.train_subset,
                              precision=job.recipe.precision, device=device, outliers=job.recipe.outliers)
        save_evaluation(job.run_dir, key, evaluation)
    elif not quiet:
        Console().print(f"{job.method}: evaluation reused from {job.run_dir / EVALUATION_JSON}")
    evaluation.timings["train_s"] = train_s
    info = {**asdict(job.recipe), "history": model.history, "run": job.run}
    return MethodRun.of(model, evaluation, info, str(job.run_dir / MODEL_CHECKPOINT))


def summary_files(payload: dict) -> dict[str, str]:
    """A bench's summary files beside its results.json: summary.json and summary.md."""
    summary = summarize(payload)
    return {"summary.json": json.dumps(summary, indent=2) + "\n", "summary.md": summary_markdown(summary, payload)}


def select_part(config: dict, path: Path, only: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """The config with only the runs named in ``only`` and the seeds in ``seeds`` (None: all); unknown ones refused."""
    names = [run["name"] for run in config["runs"]]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"{path}: no runs named {unknown}; the runs are {names}")
    runs = [run for run in config["runs"] if not only or run["name"] in only]
    if seeds is not None:
        runs = [{**run, "seeds": run.get("seeds", config.get("seeds", [0]))} for run in runs]
        available = {seed for run in runs for seed in run["seeds"]}
        missing = sorted(set(seeds) - available)
        if missing:
            raise ConfigError(f"--seeds: {missing} not among the seeds of the selected runs ({sorted(available)}) "
                             f"in {path}")
        runs = [{**run, "seeds": [s for s in run["seeds"] if s in seeds]} for run in runs]
        runs = [run for run in runs if run["seeds"]]
    return {**config, "runs": runs}


def run_bench(config_path: Path, out: Path, quiet: bool = False, only: list[str] | None = None,
              executor: str = "local", address: str | None = None, rescore: bool = False,
              seeds: list[int] | None = None) -> dict:
    """Train and score every run x seed of the config (or the runs in ``only``, seeds in ``seeds``); write them.

    Finished runs are not trained again and finished evaluations are not redone (``rescore`` redoes them),
    so running the parts of a config separately (``only``, ``seeds``) and then the whole config is cheap and
    gives one table.
    ``executor="ray"`` runs each run x seed as a Ray task (``oodforge.bench.executors``), on the cluster at
    ``address`` or on a local Ray instance; the files written are the same as with ``"local"``.
    """
    check_executor(executor, address)
    config = select_part(load_bench_config(config_path), config_path, only, seeds)
    reference = benchmark_reference(config.get("benchmark", "fashion_mnist"), config_path)
    benchmark = get_benchmark(reference)
    parse_detector_spec(config.get("detectors", DEFAULT_DETECTORS))  # fail before any training
    jobs = bench_jobs(config, reference, out, rescore)
    done = run_jobs(executor, run_job, jobs, benchmark, quiet=quiet, resources=config.get("resources"),
                    address=address)
    runs = {job.method: done[job.method] for job in jobs}  # config order
    results = write_run(out, benchmark, runs, fields={"bench_config": config}, extra_files=summary_files,
                        save_detectors=False)
    payload = results.payload
    print_results(payload, Console())
    Console().print(summary_markdown(summarize(payload), payload))
    return payload


def summarize(payload: dict, validation_sets: list[str] | None = None) -> list[dict]:
    """Mean and std over seeds of ID accuracy, mean near/far AUROC and FPR95, and FPR95 over all OOD sets
    (``fpr95``), per (run, detector); with tuning, also the validation AUROC (``val_auroc``) over
    ``validation_sets`` (default: the validation sets common to all runs, ``common_validation_sets``)."""
    blocks = methods_of(payload)
    per_method = {m: (info.get("train") or {}).get("run", m) for m, info in blocks.items()}
    rows_of: dict[tuple[str, str], list[dict]] = {}  # (method, detector) -> its result rows
    for r in payload["results"]:
        rows_of.setdefault((r["method"], r["detector"]), []).append(r)
    tunings = _tunings(payload)
    common = common_validation_sets(tunings) if len(tunings) == len(per_method) else []
    if validation_sets is not None:
        unknown = sorted(set(validation_sets) - set(common))
        if unknown:
            raise ConfigError(f"validation set(s) {', '.join(unknown)} not scored for every run "
                             f"(common to all: {', '.join(common) or 'none'})")
        common = list(validation_sets)
    rows = []
    for run in dict.fromkeys(per_method.values()):
        methods = [m for m, r in per_method.items() if r == run]
        accuracies = [blocks[m]["id_accuracy"] for m in methods]
        detectors = dict.fromkeys(r["detector"] for r in payload["results"] if r["method"] in methods)
        for detector in detectors:
            stats = {"run": run, "detector": detector, "seeds": len(methods)}
            stats.update(_mean_std("id_accuracy", accuracies))
            for group in ("near", "far", None):  # None: every OOD set
                for metric in ("auroc", "fpr95") if group else ("fpr95",):
                    values = [mean_metric(rows_of[(m, detector)], detector, metric, group) for m in methods]
                    stats.update(_mean_std(f"{group}_{metric}" if group else metric, values))
            validation = [validation_auroc(tunings.get(m), detector, common) for m in methods]
            if common and all(v is not None for v in validation):
                stats.update(_mean_std("val_auroc", validation))
            rows.append(stats)
    return rows


def merge_payloads(payloads: list[dict]) -> dict:
    """One results.json payload from several bench outputs of the same benchmark (e.g. two configs), so that
    ``summarize`` and ``best_on_validation`` compare all their runs; a method found twice must be the same."""
    if not payloads:
        raise ConfigError("no payload to merge")
    benchmarks = {p["benchmark"] for p in payloads}
    if len(benchmarks) > 1:
        raise ConfigError(f"payloads of different benchmarks: {', '.join(sorted(benchmarks))}")
    methods: dict[str, dict] = {}
    rows_of: dict[str, list[dict]] = {}  # method -> its result rows
    for payload in payloads:
        rows: dict[str, list[dict]] = {}
        for r in payload["results"]:
            rows.setdefault(r["method"], []).append(r)
        for method, info in methods_of(payload).items():
            if method not in methods:
                methods[method], rows_of[method] = info, rows.get(method, [])
            elif info["id_accuracy"] != methods[method]["id_accuracy"] or rows.get(method, []) != rows_of[method]:
                raise ConfigError(f"method {method!r} appears in two payloads with different results")
    merged = {**payloads[0], "methods": methods, "results": [r for m in methods for r in rows_of[m]]}
    merged.pop("scores_sha256", None)  # no single scores.npz holds the merged scores
    return merged


def load_payloads(paths: list[Path]) -> list[dict]:
    """Read bench results.json files; the ValueError for one that cannot be read or parsed names it."""
    payloads = []
    for path in paths:
        try:
            payloads.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return payloads


def _tunings(payload: dict) -> dict[str, dict]:
    """method -> the ``tuning`` block of results.json (runs scored with ``tune``)."""
    return {m: info["tuning"] for m, info in methods_of(payload).items() if "tuning" in info}


def payload_validation_sets(payload: dict) -> list[str]:
    """The validation sets common to every tuned method of a results.json payload."""
    return common_validation_sets(_tunings(payload))


def common_validation_sets(tunings: dict[str, dict]) -> list[str]:
    """The validation OOD sets every tuned method was scored on (sets left out for a model trained against
    their source drop out for all), so that pipelines are compared on the same data."""
    sets = [set(t["validation"]["ood"]) for t in tunings.values() if "validation_auroc" in t]
    if not sets or len(sets) < len(tunings):
        return []
    return sorted(set.intersection(*sets))


def validation_auroc(tuning: dict | None, detector: str, sets: list[str]) -> float | None:
    """Mean validation AUROC of ``detector`` (a results label, ``[tuned]`` included) over ``sets``."""
    record = (tuning or {}).get("validation_auroc", {}).get(detector)
    if not record or not sets or any(s not in record["by_set"] for s in sets):
        return None
    values = [record["by_set"][s] for s in sets]
    return float(np.mean(values)) if np.isfinite(values).all() else None


def rank_on_validation(summary: list[dict]) -> list[dict]:
    """The (run, detector) rows with a validation AUROC, highest mean first (rows without one are left out)."""
    rows = [r for r in summary if np.isfinite(r.get("val_auroc_mean", np.nan))]
    return sorted(rows, key=lambda r: -r["val_auroc_mean"])


def best_on_validation(summary: list[dict]) -> dict | None:
    """The (run, detector) row with the highest mean validation AUROC: the pipeline picked without test data."""
    ranked = rank_on_validation(summary)
    return ranked[0] if ranked else None


def _mean_std(name: str, values: list[float]) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {f"{name}_mean": float(np.mean(values)), f"{name}_std": float(np.std(values))}


def summary_markdown(summary: list[dict], payload: dict) -> str:
    """The summary as a Markdown table (percentages, mean ± std over seeds)."""
    has_near = any(r["group"] == "near" for r in payload["results"])
    header = (["run", "detector", "seeds", "ID acc"] + (["near AUROC", "near FPR95"] if has_near else [])
              + ["far AUROC", "FPR95 (all sets)"])
    validated = any("val_auroc_mean" in r for r in summary)
    header += ["val AUROC"] if validated else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["run"], row["detector"], str(row["seeds"]), pm_cell(row, "id_accuracy")]
        cells += ([pm_cell(row, "near_auroc"), pm_cell(row, "near_fpr95")] if has_near else [])
        cells += [pm_cell(row, "far_auroc"), pm_cell(row, "fpr95")]
        cells += [pm_cell(row, "val_auroc") if "val_auroc_mean" in row else "–"] if validated else []
        lines.append("| " + " | ".join(cells) + " |")
    best = best_on_validation(summary)
    if best is not None:
        sets = ", ".join(payload_validation_sets(payload))
        lines += ["", f"Best on validation data only (mean AUROC over {sets}): run **{best['run']}**, detector "
                      f"**{best['detector']}** ({pm_cell(best, 'val_auroc')} on validation)."]
    return "\n".join(lines) + "\n"


def pm_cell(row: dict, name: str) -> str:
    """A summary metric as "mean ± std" in percent."""
    return f"{percent(row[name + '_mean'])} ± {percent(row[name + '_std'])}"

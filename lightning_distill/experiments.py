"""Multi-seed experiment runner: ``lightning-distill compare``.

Runs every config over several seeds -- each run a separate ``lightning-distill fit`` process,
so runs cannot leak state into each other -- and writes a results table::

    lightning-distill compare --configs configs/digits/baseline.yaml configs/digits/kd.yaml \\
        --seeds 0 1 2 --out results/digits_kd

    results/digits_kd/
      results.md          mean +- std per config: test accuracy at the last epoch and at the best
                          validation epoch, best epoch, wall time, config hash
      results.csv         the same summary, machine-readable
      runs.csv            one row per (config, seed)
      runs/<name>/seed<S>/config.yaml   the fully resolved config of each run: it reproduces the
                                        run on its own (``lightning-distill fit --config ...``)

``--set KEY=VALUE`` (repeatable) passes an override to every run (``--set trainer.max_epochs=5``),
and ``--name`` labels a config in the table (``--configs a.yaml b.yaml --names teacher-free kd``).
Standard deviations are sample standard deviations (n - 1) over seeds.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["RunResult", "compare", "main", "summarize", "write_tables"]

RunResult = dict[str, Any]


def _included_files(config: Path) -> list[Path]:
    """The YAML files a config loads by path (``trainer: shared/trainer.yaml``), recursively, in order."""
    import yaml

    found: list[Path] = []

    def walk(node: Any, base: Path) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value, base)
        elif isinstance(node, list):
            for value in node:
                walk(value, base)
        elif isinstance(node, str) and node.endswith((".yaml", ".yml")) and (base / node).is_file():
            path = (base / node).resolve()
            if path not in found:
                found.append(path)
                walk(yaml.safe_load(path.read_text()), path.parent)

    walk(yaml.safe_load(config.read_text()), config.parent)
    return found


def _config_hash(config: Path, overrides: Sequence[str]) -> str:
    """Hash of the config, every file it loads (shared trainer / data blocks) and the overrides."""
    digest = hashlib.sha256(config.read_bytes())
    for path in _included_files(config):
        digest.update(b"\0" + path.read_bytes())
    for item in overrides:
        digest.update(b"\0" + item.encode())
    return digest.hexdigest()[:12]


def _run_one(config: Path, name: str, seed: int, out: Path, overrides: Sequence[str], env: dict[str, str]) -> RunResult:
    result_file = out / "json" / f"{name}_seed{seed}.json"
    cmd = [
        sys.executable, "-m", "lightning_distill", "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--results_file", str(result_file),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", f"seed{seed}",
    ]
    for item in overrides:
        key, _, value = item.partition("=")
        cmd += [f"--{key}", value]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    log = out / "logs" / f"{name}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not result_file.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"run {name} seed {seed} failed (exit {proc.returncode}); log: {log}\n{tail}")
    record = json.loads(result_file.read_text())
    record.update(config=str(config), name=name, seed=seed, process_time_s=elapsed)
    return record


def compare(
    configs: Sequence[str],
    seeds: Sequence[int],
    out: str,
    names: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> list[RunResult]:
    """Run every config with every seed; write ``results.md``, ``results.csv``, ``runs.csv`` in ``out``."""
    paths = [Path(c) for c in configs]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"`--configs`: no such config file {str(path)!r}.")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"`--names` needs one name per config: {len(names)} names for {len(paths)} configs.")
    if not seeds:
        raise ValueError("`--seeds` needs at least one seed.")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"`--set` expects KEY=VALUE, got {item!r}.")
    labels = list(names) if names is not None else [p.stem for p in paths]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config names must be unique, got {labels}; pass --names.")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    jobs = [(p, n, s) for p, n in zip(paths, labels) for s in seeds]
    results: list[RunResult] = []
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc="compare", unit="run", disable=not progress)
    for path, name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        record = _run_one(path, name, seed, out_dir, overrides, env)
        record["config_hash"] = _config_hash(path, overrides)
        results.append(record)
        bar.write(
            f"{name} seed {seed}: test acc {100 * record['test_acc_last']:.2f}% (last)"
            + (f", {100 * record['test_acc_best']:.2f}% (best val epoch {record['best_epoch']})" if record.get("test_acc_best") is not None else "")
            + f", {record['wall_time_s']:.1f} s"
        )
    write_tables(results, out_dir, seeds=seeds, overrides=overrides)
    return results


def _mean_std(values: Sequence[Optional[float]], scale: float = 100.0) -> tuple[float, float, int]:
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), std, len(vals)


def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per config name: mean / std over seeds (accuracies in percent)."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        last = _mean_std([r.get("test_acc_last") for r in runs])
        best = _mean_std([r.get("test_acc_best") for r in runs])
        teacher = _mean_std([r.get("teacher_test_acc") for r in runs])
        epochs = [r["best_epoch"] for r in runs if r.get("best_epoch") is not None]
        # language models: perplexity of the last and the best-validation weights, and the teacher's
        ppl = {
            key: _mean_std([(r.get(src) or {}).get(metric) for r in runs], scale=1.0)
            for key, src, metric in (
                ("ppl_last", "test_last", "test/perplexity"),
                ("ppl_best", "test_best", "test/perplexity"),
                ("teacher_ppl", "test_last", "test/teacher_perplexity"),
            )
        }
        rows.append(
            {
                "name": name,
                "config": runs[0]["config"],
                "seeds": len(runs),
                "test_acc_last_mean": last[0],
                "test_acc_last_std": last[1],
                "test_acc_best_mean": best[0],
                "test_acc_best_std": best[1],
                "best_epoch_mean": statistics.fmean(epochs) if epochs else float("nan"),
                "teacher_test_acc_mean": teacher[0],
                "wall_time_s_mean": statistics.fmean(r["wall_time_s"] for r in runs),
                "config_hash": runs[0]["config_hash"],
                "ppl_last_mean": ppl["ppl_last"][0],
                "ppl_last_std": ppl["ppl_last"][1],
                "ppl_best_mean": ppl["ppl_best"][0],
                "ppl_best_std": ppl["ppl_best"][1],
                "teacher_ppl_mean": ppl["teacher_ppl"][0],
            }
        )
    return rows


def _pm(mean: float, std: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_tables(results: Sequence[RunResult], out: Path, seeds: Sequence[int] = (), overrides: Sequence[str] = ()) -> str:
    """Write ``runs.csv``, ``results.csv`` and ``results.md``; return the Markdown table."""
    out = Path(out)
    run_fields = ["name", "seed", "test_acc_last", "test_acc_best", "best_epoch", "val_acc_best", "teacher_test_acc",
                  "epochs", "wall_time_s", "config", "config_hash", "log_dir"]
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=run_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    rows = summarize(results)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
    with_ppl = any(not math.isnan(r["ppl_last_mean"]) for r in rows)
    ppl_head = "test perplexity (last epoch) | test perplexity (best val epoch) | teacher perplexity | " if with_ppl else ""
    header = (
        f"| run | {ppl_head}test acc % (last epoch) | test acc % (best val epoch) | best epoch | teacher % | wall s | config | hash |\n"
        + "|---" * (8 + 3 * with_ppl) + "|\n"
    )
    lines = []
    for r in rows:
        epoch = "n/a" if math.isnan(r["best_epoch_mean"]) else f"{r['best_epoch_mean']:.1f}"
        teacher = "—" if math.isnan(r["teacher_test_acc_mean"]) else f"{r['teacher_test_acc_mean']:.2f}"
        ppl = ""
        if with_ppl:
            t_ppl = "—" if math.isnan(r["teacher_ppl_mean"]) else f"{r['teacher_ppl_mean']:.3f}"
            ppl = (f"{_pm(r['ppl_last_mean'], r['ppl_last_std'], 3)} | {_pm(r['ppl_best_mean'], r['ppl_best_std'], 3)} | "
                   f"{t_ppl} | ")
        lines.append(
            f"| {r['name']} | {ppl}{_pm(r['test_acc_last_mean'], r['test_acc_last_std'])} | "
            f"{_pm(r['test_acc_best_mean'], r['test_acc_best_std'])} | {epoch} | {teacher} | "
            f"{r['wall_time_s_mean']:.1f} | `{r['config']}` | {r['config_hash']} |\n"
        )
    body = "".join(lines)
    seeds_text = ", ".join(str(s) for s in seeds) or ", ".join(sorted({str(r["seed"]) for r in results}))
    note = f"\nMean ± sample std over seeds {seeds_text}" + (f"; overrides: {' '.join(overrides)}" if overrides else "") + ".\n"
    table = header + body + note
    (out / "results.md").write_text(table)
    return table


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-distill compare",
        description="Run configs over several seeds and write a mean ± std results table.",
    )
    parser.add_argument("--configs", nargs="+", required=True, help="config files (each run with every seed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--out", default="results/compare", help="output directory (default: results/compare)")
    parser.add_argument("--names", nargs="+", default=None, help="table labels, one per config (default: file stems)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, e.g. --set trainer.max_epochs=5 (repeatable)")
    args = parser.parse_args(argv)
    compare(args.configs, args.seeds, args.out, names=args.names, overrides=args.overrides)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()

"""Benchmark: the four factorization methods at uniform keep levels on a real tuned model.

SmolLM2-135M fine-tuned on sst2 (tuned once and cached under benchmarks/work/), then for
every method × keep: linear-parameter reduction, accuracy on the validation split (GLUE
SST-2 dev), drop vs the dense model. Also a calibration-size sweep for the `output` method.

`svd`, `input-pca` and `output` are decomposed once per method and sliced for every keep
level (their decompositions do not depend on the rank); `sieve` is sequential, so it is
refit for every keep level.

    python benchmarks/methods.py                 # full run (writes benchmarks/results/methods.json)
    python benchmarks/methods.py --limit 300 --keeps 0.8 0.6 --methods output sieve   # a slice
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sieve_edge.calibrate import decompose_all  # noqa: E402
from sieve_edge.evaluate import make_scorer  # noqa: E402
from sieve_edge.factorize import factorize_, linear_shapes  # noqa: E402
from sieve_edge.models import load_model, load_tokenizer  # noqa: E402
from sieve_edge.plan import RankPlan  # noqa: E402
from sieve_edge.prune import prune_with_batches  # noqa: E402
from sieve_edge.tasks import calibration_batches, load_task  # noqa: E402


def tuned_model(work: Path, task: str, steps: int) -> Path:
    out = work / f"smollm2-135m-{task}-tuned{steps}"
    if not (out / "sieve_edge.json").is_file():
        print(f"tuning smollm2-135m on {task} for {steps} steps -> {out}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "sieve_edge", "tune", "--model", "smollm2-135m", "--task", task,
                        "--steps", str(steps), "--out", str(out)], check=True)
    return out


def table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(no rows)"
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line([r.get(c, "") for c in cols]) for r in rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    ap.add_argument("--methods", nargs="*", default=["svd", "input-pca", "output", "sieve"])
    ap.add_argument("--calibration", type=int, default=512, help="calibration examples for the method table")
    ap.add_argument("--damps", type=float, nargs="+", default=[1e-4],
                    help="sieve only: ridge of its least-squares solve, relative to the mean input variance "
                         "(lambda = damp * mean diag of the corrected inputs' covariance); one sieve row per value")
    ap.add_argument("--sweep", type=int, nargs="*", default=[128, 512, 2048],
                    help="calibration sizes for the output-method sweep (empty: skip)")
    ap.add_argument("--sweep-keep", type=float, default=0.6)
    ap.add_argument("--limit", type=int, default=None, help="validation examples (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods.json")
    args = ap.parse_args()

    t_start = time.time()
    task = load_task(args.task)
    folder = tuned_model(args.work, args.task, args.tune_steps)
    tok = load_tokenizer(folder)
    base = load_model(folder)
    scorer = make_scorer(tok, task, "validation", limit=args.limit)
    dense_acc = scorer.metric(base)
    print(f"dense tuned model: {task.metric} {dense_acc:.4f} on {scorer.n} validation examples", file=sys.stderr)
    shapes = linear_shapes(base)

    def calib(n):
        return list(calibration_batches(task, tok, n, batch_size=16, seed=0))

    rows = []

    def record(method, keep, plan, model, n_cal, seconds, table_name, **extra):
        acc = scorer.metric(model)
        row = {"table": table_name, "method": method, "keep": keep, "calibration": n_cal, **extra,
               "reduction": round(plan.linear_param_reduction, 4), "metric": round(acc, 4),
               "drop": round(dense_acc - acc, 4), "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        partial = args.out.with_name(args.out.stem + ".partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"dense_metric": dense_acc, "n": scorer.n, "rows": rows}, indent=2))

    batches = calib(args.calibration)
    for method in args.methods:
        if method == "sieve":
            for damp in args.damps:
                for keep in args.keeps:
                    model = copy.deepcopy(base)
                    t0 = time.time()
                    res = prune_with_batches(model, batches, keep, "sieve", damp=damp)
                    record("sieve", keep, res.plan, model, args.calibration, time.time() - t0, "methods", damp=damp)
                    del model
            continue
        t0 = time.time()
        max_plan = RankPlan.from_keep(shapes, max(args.keeps))
        decs, _ = decompose_all(base, None if method == "svd" else batches, method,
                                max_rank=lambda name, m, n: max_plan.ranks.get(name) or 1)
        t_dec = time.time() - t0
        for keep in args.keeps:
            plan = RankPlan.from_keep(shapes, keep, method=method)
            model = copy.deepcopy(base)
            factorize_(model, {n: decs[n].factors(r) for n, r in plan.factorized.items()})
            record(method, keep, plan, model, args.calibration, t_dec, "methods")
            del model
        del decs

    for n_cal in args.sweep:
        plan = RankPlan.from_keep(shapes, args.sweep_keep, method="output")
        b = calib(n_cal)
        tokens = sum(int(x["attention_mask"].sum()) for x in b)
        model = copy.deepcopy(base)
        t0 = time.time()
        prune_with_batches(model, b, plan, "output")
        record("output", args.sweep_keep, plan, model, f"{n_cal} ({tokens} tokens)", time.time() - t0, "calibration")
        del model

    result = {
        "benchmark": "methods",
        "model": "smollm2-135m tuned on " + args.task,
        "tuned_folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "task": args.task, "split": "validation", "n": scorer.n, "metric": task.metric,
        "dense_metric": round(dense_acc, 4), "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "command": " ".join(["python", "benchmarks/methods.py", *sys.argv[1:]]),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_name(args.out.stem + ".partial.json").unlink(missing_ok=True)
    print(f"\ndense {task.metric}: {dense_acc:.4f} (n={scorer.n}, {args.task} validation)")
    print(table([r for r in rows if r["table"] == "methods"], ["method", "damp", "keep", "reduction", "metric", "drop"]))
    if args.sweep:
        print("\ncalibration size (output method, keep %.2f)" % args.sweep_keep)
        print(table([r for r in rows if r["table"] == "calibration"], ["calibration", "reduction", "metric", "drop"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

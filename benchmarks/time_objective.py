"""The time objective on a real model: cost table build time, and predicted vs measured ms per example.

Two parts (``--part``):

- ``table``: build the time objective's cost table for a model and a target (every MatMul
  shape its ladder may run, at the target's prompt length and at one token), timed from an
  empty cache folder (``--cache``), and print the dense model's predicted ms per example.
- ``compare``: for search output folders (``sieve-edge search --out``) or export folders
  (the ranks of the checkpoint they were exported from), each plan's predicted
  ms per example in the registry matrices (the same table), next to the measured ms per
  example of its OpenVINO / ONNX export (``sieve-edge export``) run by the bundle runner's
  model class with the target's settings on the task's test prompts (median of --examples,
  after 2 warm-ups). The dense model's export is the baseline: predicted and measured
  savings are compared, since the table prices only the registry matrices.

Results: ``benchmarks/results/time_objective-*.json``. Example (the lead's idle-box run):

    python benchmarks/time_objective.py --part table --model TUNED --target factory-pc --cache /tmp/ct
    python benchmarks/time_objective.py --part compare --model TUNED --target factory-pc --task sst2 \
        --plan time=runs/s-time --plan params=runs/s-params --export dense=runs/x-dense \
        --export time=runs/x-time --export params=runs/x-params --examples 100
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def objective_for(model_spec: str, target: str, task=None, ladder=True):
    from sieve_edge import architectures as arch
    from sieve_edge.factorize import linear_shapes
    from sieve_edge.models import load_model
    from sieve_edge.search import SearchConfig
    from sieve_edge.search.drivers import make_objective
    from sieve_edge.progress import log

    model = load_model(model_spec)
    shapes = linear_shapes(model)
    config = SearchConfig(objective="time", target=target)
    return make_objective(config, shapes, log, arch.linear_groups(model), task), shapes


def part_table(a) -> dict:
    if a.cache:
        os.environ["SIEVE_EDGE_CACHE"] = a.cache
    from sieve_edge.tasks import load_task

    task = load_task(a.task)
    t0 = time.perf_counter()
    obj, shapes = objective_for(a.model, a.target, task)
    seconds = time.perf_counter() - t0
    dense = obj.breakdown({})
    usable = {name: sum(obj.usable(name, r) for r in range(8, min(shapes[name]), 8)) for name in list(shapes)[:7]}
    return {"part": "table", "model": a.model, "target": a.target, "task": task.name,
            "seconds_with_model_load": seconds, "points": len(obj.table.entries), "describe": obj.describe(),
            "dense": dense, "usable_ranks_layer0": usable}


def measure_export(folder: Path, profile, prompt_tokens: int, repeats: int) -> dict:
    """Median ms of a prompt pass over ``prompt_tokens`` tokens and of one decode step after it,
    with the bundle runner's model class and the target's settings (2 warm-ups first)."""
    import numpy as np

    from sieve_edge import runtime as rt

    model = rt.load_model(folder, profile.runtime, profile.threads, profile.inference_precision, profile.device,
                          profile.dynamic_quantization, profile.runtime_cache_capacity)
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 20000, prompt_tokens)]
    prompt, token = [], []
    for i in range(repeats + 2):
        model.reset()
        t0 = time.perf_counter()
        model.forward(ids)
        t1 = time.perf_counter()
        model.forward([ids[-1]])
        t2 = time.perf_counter()
        if i >= 2:
            prompt.append((t1 - t0) * 1e3)
            token.append((t2 - t1) * 1e3)
    return {"prompt_ms": statistics.median(prompt), "token_ms": statistics.median(token), "repeats": repeats}


def part_compare(a) -> dict:
    from sieve_edge.plan import RankPlan
    from sieve_edge.targets import load_profile
    from sieve_edge.tasks import load_task

    task = load_task(a.task)
    profile = load_profile(a.target)
    obj, _ = objective_for(a.model, a.target, task)
    rows = {}
    plans = dict(x.split("=", 1) for x in a.plan)
    exports = dict(x.split("=", 1) for x in a.export)
    for name in ["dense", *plans]:
        folder = Path(plans.get(name, "."))
        if name == "dense":
            ranks = {}
        elif (folder / "plan.json").is_file():   # a search folder
            ranks = {k: r for k, r in RankPlan.from_json(folder / "plan.json").ranks.items() if r is not None}
        else:                                     # an export folder: the ranks of the checkpoint it came from
            ranks = json.loads((folder / "export.json").read_text())["source"]["ranks"]
        row = {"predicted": obj.breakdown(ranks), "factorized": len(ranks)}
        if (folder / "search.json").is_file():
            summary = json.loads((Path(plans[name]) / "search.json").read_text())
            row.update({"linear_param_reduction": summary["linear_param_reduction"],
                        "objective": summary["objective"], "validation": summary["validation"].get("final"),
                        "test": (summary.get("test") or {}).get("pruned")})
        if name in exports:
            row["measured"] = measure_export(Path(exports[name]), profile, obj.prompt_tokens, a.examples)
        rows[name] = row
    dense = rows["dense"]
    for name, row in rows.items():
        for side in ("predicted", "measured"):
            if side in row and side in dense:
                for k in ("prompt_ms", "token_ms"):
                    row[side][f"{k}_saved_vs_dense"] = dense[side][k] - row[side][k]
    return {"part": "compare", "model": a.model, "target": a.target, "task": task.name,
            "describe": obj.describe(), "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["table", "compare"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--target", default="factory-pc")
    p.add_argument("--task", default="sst2")
    p.add_argument("--cache", default=None, help="cache folder (SIEVE_EDGE_CACHE) for the table part")
    p.add_argument("--plan", action="append", default=[], help="NAME=SEARCH_OUT (compare)")
    p.add_argument("--export", action="append", default=[], help="NAME=EXPORT_DIR (compare; dense=... required)")
    p.add_argument("--examples", type=int, default=40)
    p.add_argument("--label", default="under-load")
    a = p.parse_args(argv)
    res = part_table(a) if a.part == "table" else part_compare(a)
    res["box"] = a.label
    out = ROOT / "benchmarks" / "results" / f"time_objective-{a.part}-{a.label}.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Seconds per search candidate: scored on the whole validation split vs raced on growing subsets.

Where a candidate's time goes on a long-input task, and what racing saves: one model with
every matrix wrapped for the search (SVD bases: the timing does not depend on them), the
same candidates (uniform keep levels and random per-matrix plans) scored by
``CandidateEvaluator`` twice in one process: ``--race 0`` (every row) and racing (first
``--race`` rows, doubling). Also: the dense pass by batch size and the share of the forward
time in the linear matrices. Prints a table, writes benchmarks/results/candidate_cost.json.

    python benchmarks/candidate_cost.py --datasets ../shared/datasets            # SmolLM2, reviews_long
    python benchmarks/candidate_cost.py --model DIR --task sst2 --candidates 4   # any model / task
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args(argv=None):
    from search import DATASETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="reviews_long", help="sample task name, TOML, or reviews_long (built)")
    p.add_argument("--datasets", type=Path, default=DATASETS)
    p.add_argument("--val-limit", type=int, default=100)
    p.add_argument("--race", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    p.add_argument("--note", default="", help="box state, e.g. 'under load (4 other jobs)'")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "candidate_cost.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from sieve_edge.calibrate import decompose_all
    from sieve_edge.evaluate import make_scorer
    from sieve_edge.factorize import attach_search_, linear_shapes
    from sieve_edge.models import load_model, load_tokenizer
    from sieve_edge.search import Ladder, ParamObjective, SearchConfig
    from sieve_edge.search.drivers import ladder_max_ranks
    from sieve_edge.search.evaluator import CandidateEvaluator
    from sieve_edge.tasks import load_task
    from search import review_task

    spec = args.task
    if spec == "reviews_long":
        spec = str(review_task(args.datasets, args.work / "tasks" / "reviews_long", seed=args.seed))
    task = load_task(spec)
    tok, model = load_tokenizer(args.model), load_model(args.model)
    scorer = make_scorer(tok, task, "validation", limit=args.val_limit, batch_size=32, model=model)
    lengths = [len(p) for p in scorer.prompt_ids]
    row = {"model": args.model, "task": task.name, "n": scorer.n, "prompt_tokens_mean": sum(lengths) / len(lengths),
           "scoring": scorer.scoring, "threads": torch.get_num_threads(), "note": args.note}

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    row["dense_seconds_by_batch"] = {}
    for bs in (8, 32):
        scorer.batch_size, scorer._cache = bs, {}
        row["dense_seconds_by_batch"][bs] = timed(lambda: scorer.label_logprobs(model))
    scorer.batch_size, scorer._cache = 32, {}
    # the linear matrices' share of a forward pass (hooks time each nn.Linear call)
    spent = {"linear": 0.0}
    starts = {}

    def pre(m, a):
        starts[id(m)] = time.perf_counter()

    def post(m, a, o):
        spent["linear"] += time.perf_counter() - starts.pop(id(m))

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_hook(post) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = timed(lambda: scorer.label_logprobs(model))
    for h in hooks:
        h.remove()
    row["linear_share"] = spent["linear"] / total

    cfg = SearchConfig(tolerance=args.tolerance, multiple=8)
    shapes = linear_shapes(model)
    deepest = ladder_max_ranks(shapes, cfg)
    t0 = time.perf_counter()
    decs, _ = decompose_all(model, None, "svd", max_rank=lambda name, m, n: deepest[name])
    row["svd_seconds"] = time.perf_counter() - t0
    attach_search_(model, decs)
    del decs
    objective = ParamObjective(shapes)
    ladder = Ladder(shapes, cfg.ladder, cfg.multiple, objective)
    rng = random.Random(args.seed)
    genomes = [ladder.uniform(lv) for lv in (1, 3, 5)]
    while len(genomes) < args.candidates:
        genomes.append(tuple(rng.choice((0, 1, 1, 2, 2, 3, 4, 6)) for _ in ladder.names))
    genomes = genomes[:args.candidates]
    results = {}
    for mode, race in (("full", 0), ("racing", args.race)):
        ev = CandidateEvaluator(model, scorer, objective, args.tolerance, race, 2.0, seed=args.seed)
        out = []
        for g in genomes:
            e = ev(ladder.to_ranks(g))
            out.append({"gain": e.gain, "seconds": e.seconds, "rows": e.rows, "feasible": e.feasible,
                        "full": e.full, "drop": e.drop})
            print(f"{mode}: gain {e.gain:.3f} drop {e.drop:+.3f} {'in' if e.feasible else 'out'} "
                  f"rows {e.rows} {e.seconds:.1f} s", file=sys.stderr, flush=True)
        results[mode] = {"dense_seconds": ev.dense_seconds, "candidates": out,
                         "seconds_per_candidate": sum(c["seconds"] for c in out) / len(out),
                         "rows_per_candidate": sum(c["rows"] for c in out) / len(out)}
    agree = sum(a["feasible"] == b["feasible"] for a, b in zip(results["full"]["candidates"],
                                                                results["racing"]["candidates"]))
    row.update(results=results, decisions_agree=f"{agree}/{len(genomes)}",
               speedup=results["full"]["seconds_per_candidate"] / results["racing"]["seconds_per_candidate"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "candidate_cost", "machine": platform.machine(), **row}, indent=2))
    print(f"| task | n | prompt tokens | linear share | s/candidate full | s/candidate racing | rows raced | "
          f"speed-up | decisions agree |\n|---|---|---|---|---|---|---|---|---|\n"
          f"| {row['task']} | {row['n']} | {row['prompt_tokens_mean']:.0f} | {100 * row['linear_share']:.0f}% | "
          f"{results['full']['seconds_per_candidate']:.2f} | {results['racing']['seconds_per_candidate']:.2f} | "
          f"{results['racing']['rows_per_candidate']:.0f} | {row['speedup']:.2f}x | {row['decisions_agree']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Diagnostic: do `sieve` factors fitted at the searched plan predict the `sieve` refits of
other plans better than the `output` factors the search scored?

The search scores every candidate with `output` factors (each matrix projected on the dense
model's own activations); the checkpoint is a `sieve` refit (each matrix fit on the inputs
the already-cut layers below it produce), which often scores far higher at the same ranks.
This script takes a finished search and its refit tries (a `--refit-tries` run: their
`sieve` refits are the ground truth) and scores the same plans on two banks of factors:

- `output`: the calibrate stage's factors, i.e. what the search saw (a candidate racing only
  estimated is scored on the whole validation split here);
- `rebased`: the `sieve` decompositions of every matrix, fitted once at the searched plan
  (one sequential pass, the cost of one refit) and sliced at each plan's ranks. At the
  searched plan itself they are its refit, exactly; elsewhere, each matrix is fit as if the
  layers below it were cut as the searched plan cuts them.

If the rebased drops track the refit drops where the output drops do not, a search that
rebases its bank on the plan it found (and searches again around it) would see the plans
the refit tries now reach only by bisection.

    python benchmarks/rebase.py --stages benchmarks/work/stages-sms_spam --task sms_spam \\
        --model benchmarks/work/tuned-sms_spam-40 --out benchmarks/results/rebase-sms_spam.json

``--stages`` is the task's stage folder of `benchmarks/search.py` after a `--refit-tries`
row (its search, calibrate and fit stages are that row's); ``--task`` what the row searched
(a sample name or a task file).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=Path, required=True, help="the stage folder of a finished --refit-tries row")
    p.add_argument("--task", required=True, help="the task the row searched (sample name or task file)")
    p.add_argument("--model", required=True, help="the dense model the row searched (its tuned folder)")
    p.add_argument("--extra", type=int, default=4,
                   help="also score this many other measured plans above the searched one (spread over the "
                        "gain; no refit of them, so no ground truth)")
    p.add_argument("--refits", type=int, default=0,
                   help="also refit with `sieve` this many of the --extra plans, the smallest gains first, for a "
                        "ground truth beyond the refit tries (each one refit: a calibration pass and a sequential fit)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rebase.json")
    return p.parse_args(argv)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path} is missing: --stages must be the stage folder of a finished --refit-tries row")
    return json.loads(path.read_text())


def plans_to_score(result: dict, climb: dict | None, extra: int) -> list[dict]:
    """The searched plan, every refit try of a measured plan (matched to it by gain and searched
    drop) and ``extra`` other measured plans above the searched gain, spread over the gain:
    [{kind, gain, ranks, search_drop, search_full, refit_drop (None when not refit)}]."""
    from sieve_edge.search.climb import candidates

    cands = candidates(result.get("measured"), result["gain"])
    out = []
    for t in (climb or {}).get("tries") or []:
        if t.get("made"):  # made between two tries, never searched: nothing to rebase
            continue
        match = [c for c in cands if c.gain == t["gain"] and c.drop == t["search_drop"]]
        if not match:
            raise SystemExit(f"a refit try (gain {t['gain']}) is not among the measured plans: the stage folder's "
                             "search and fit are not of the same row")
        c = match[0]
        out.append({"kind": "try", "gain": c.gain, "ranks": c.ranks, "search_drop": c.drop, "search_full": c.full,
                    "refit_drop": t["drop"]})
    tried = {p["gain"] for p in out}
    rest = [c for c in cands if c.gain not in tried]
    if extra and rest:
        step = max(len(rest) / extra, 1.0)
        picks = sorted({min(int(i * step), len(rest) - 1) for i in range(extra)})
        out += [{"kind": "measured", "gain": rest[i].gain, "ranks": rest[i].ranks, "search_drop": rest[i].drop,
                 "search_full": rest[i].full, "refit_drop": None} for i in picks]
    return sorted(out, key=lambda p: p["gain"])


def rebase(stages: Path, task_ref: str, model_ref: str, extra: int = 4, refits: int = 0, log=print) -> dict:
    """Score the plans of ``plans_to_score`` on the `output` and the rebased banks, and refit
    ``refits`` of the extra plans (the smallest gains first) with `sieve`; the report."""
    from sieve_edge.calibrate import load_decompositions
    from sieve_edge.evaluate import make_scorer
    from sieve_edge.export.microbench import cpu_name
    from sieve_edge.factorize import attach_search_, set_ranks_
    from sieve_edge.models import load_model, load_tokenizer
    from sieve_edge.plan import RankPlan
    from sieve_edge.prune import prune_with_batches, sieve_bases
    from sieve_edge.tasks import calibration_batches, load_task

    result = _read(stages / "search" / "result.json")
    climb = _read(stages / "climb" / "climb.json")
    cfg = _read(stages / "fit.stage.json").get("config") or {}
    searched = RankPlan.from_json(stages / "search" / "plan.json")
    task = load_task(task_ref)
    sign = 1.0 if task.metric != "perplexity" else -1.0
    dense_metric = float(result["dense_metric"])
    plans = plans_to_score(result, climb if climb.get("applies") else None, extra)
    names = list(searched.shapes)
    tops = {n: max([searched.ranks.get(n) or 0] + [p["ranks"].get(n) or 0 for p in plans]) for n in names}
    tops = {n: r for n, r in tops.items() if r}
    dense, tok = load_model(model_ref), load_tokenizer(model_ref)
    dense.eval()
    scorer = make_scorer(tok, task, "validation", limit=cfg.get("val_limit"), batch_size=cfg.get("batch_size", 32),
                         model=dense)

    def drop(model) -> float:
        return sign * (dense_metric - float(scorer.metric(model)))

    t0 = time.perf_counter()
    decs, _, _ = load_decompositions(stages / "calibrate")
    bank = attach_search_(copy.deepcopy(dense), {n: decs[n] for n in tops})
    for p in plans:
        if not p["search_full"]:  # racing only estimated it: score the whole split
            set_ranks_(bank, p["ranks"])
            p["output_drop"] = drop(bank)
        else:
            p["output_drop"] = p["search_drop"]
    del bank, decs
    output_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    batches = list(calibration_batches(task, tok, int(cfg.get("n_calibration", 512)),
                                       int(cfg.get("calibration_batch", 16)), max_length=256, seed=0))
    refit = copy.deepcopy(dense)
    bases, _ = sieve_bases(refit, batches, copy.deepcopy(searched), tops, progress=True)
    searched_refit = drop(refit)
    del refit
    sieve_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = attach_search_(copy.deepcopy(dense), bases)
    set_ranks_(bank, searched.ranks)
    searched_rebased = drop(bank)
    for p in plans:
        set_ranks_(bank, p["ranks"])
        p["rebased_drop"] = drop(bank)
        log(f"rebase: plan {100 * p['gain']:.1f}% ({p['kind']}): output {p['output_drop']:+.4f}, rebased "
            f"{p['rebased_drop']:+.4f}, refit {'-' if p['refit_drop'] is None else format(p['refit_drop'], '+.4f')}")
    rebased_seconds = time.perf_counter() - t0
    del bank
    t0 = time.perf_counter()
    for p in [p for p in plans if p["refit_drop"] is None][:refits]:
        model = copy.deepcopy(dense)
        prune_with_batches(model, batches, RankPlan(dict(searched.shapes), dict(p["ranks"])), "sieve")
        p["refit_drop"], p["kind"] = drop(model), "refit here"
        log(f"rebase: plan {100 * p['gain']:.1f}% refit with sieve here: drop {p['refit_drop']:+.4f}")
        del model
    refit_seconds = time.perf_counter() - t0
    searched_drop = sign * (dense_metric - float(result["metric"]))
    top = {"kind": "searched", "gain": float(result["gain"]), "search_drop": searched_drop, "search_full": True,
           "output_drop": searched_drop, "rebased_drop": searched_rebased, "refit_drop": searched_refit}
    rows = [top] + plans
    for r in rows:
        r.pop("ranks", None)
    truth = [r for r in rows if r["refit_drop"] is not None]
    err = lambda key: sum(abs(r[key] - r["refit_drop"]) for r in truth) / len(truth)  # noqa: E731
    return {"benchmark": "rebase", "stages": str(stages), "task": task.name, "model": model_ref,
            "tolerance_abs": result["tolerance_abs"], "dense_metric": dense_metric,
            "rows": rows, "mean_abs_error": {"output": err("output_drop"), "rebased": err("rebased_drop")},
            "seconds": {"output_scores": output_seconds, "sieve_pass": sieve_seconds, "rebased_scores": rebased_seconds,
                        "refits": refit_seconds},
            "machine": {"cpu": cpu_name()}}


def table(report: dict) -> str:
    lines = ["| plan | removed | searched drop | output bank | rebased bank | sieve refit |", "|---|---|---|---|---|---|"]
    pt = lambda v: "—" if v is None else f"{100 * v:+.1f}"  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['kind']} | {100 * r['gain']:.1f}% | {pt(r['search_drop'])}{'' if r['search_full'] else ' est.'}"
                     f" | {pt(r['output_drop'])} | {pt(r['rebased_drop'])} | {pt(r['refit_drop'])} |")
    e = report["mean_abs_error"]
    lines.append(f"\nmean |bank drop - refit drop| over the plans refit: output {100 * e['output']:.1f} pt, "
                 f"rebased {100 * e['rebased']:.1f} pt (drops in points of {report['task']}'s metric)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    report = rebase(args.stages, args.task, args.model, args.extra, args.refits,
                    log=lambda m: print(m, file=sys.stderr))
    report["machine"]["threads"] = torch.get_num_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

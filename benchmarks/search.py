"""Benchmark of the search: the GA against the uniform baseline on SmolLM2-135M.

Tasks: sst2, sms_spam, snips and reviews_long, a long-input task (reviews of four
sentences, ~70 prompt tokens) built at run time under --work from the uci_* sets in
--datasets (nothing of it is committed). For each task: tune SmolLM2-135M once (cached under
--work), then for each tolerance (1 and 5 points) run
  uniform-output  bisection on one keep fraction, refit with `output`
  uniform-sieve   the same bisection, refit with `sieve`
  ga-sieve        the surrogate-guided genetic search per matrix, refit with `sieve`
  ga-plain-sieve  the genetic search without the surrogate (--no-surrogate), refit with `sieve`
and record the linear-parameter reduction, validation and test metric (test never seen by
the search), search time, evaluations, generations reached and candidates per minute. For
sst2 the pruned models are also scored on the uci_yelp / uci_amazon / uci_imdb test sets.
`--heal-steps N` also heals each row's fitted plan with N steps of healing (`--heal ce` by
default, as in `sieve-edge`: the answers' cross-entropy on the train split; `--heal kl`
distills the dense model's label distribution), its search and fit reused, and records
validation and test before and after: what healing buys at each tolerance.
`--heal-slack S` (with `--heal-steps`) reruns each GA row searching up to tolerance + S and
keeping the largest plan that heals back within the tolerance, resuming the finished row at
tolerance + S when --work has it; `--slack-only` takes the row's own numbers from its folder.

Prints a Markdown table and writes benchmarks/results/search.json. Heavy: ~7 min of tuning
per task plus the 15-minute budget and the stages per search on 2 cores (hours in all).
`--quick` is a smoke run: no tuning, sst2 only, one tolerance, small validation and GA.

    python benchmarks/search.py                 # the full benchmark
    python benchmarks/search.py --quick         # a ~10 min check, GA vs uniform on sst2
    python benchmarks/search.py --tasks reviews_long --only ga-sieve@0.01 --heal-steps 300
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CROSS = ("uci_yelp", "uci_amazon", "uci_imdb")
STRATEGIES = {
    "uniform-output": dict(strategy="uniform", method="output"),
    "uniform-sieve": dict(strategy="uniform", method="sieve"),
    "ga-sieve": dict(strategy="ga", method="sieve"),
    "ga-plain-sieve": dict(strategy="ga", method="sieve", surrogate=False),
}
DEFAULT_STRATEGIES = "uniform-sieve,ga-sieve"
TASK_ORDER = ("sst2", "sms_spam", "snips", "reviews_long")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(TASK_ORDER),
                   help="sample task names, or reviews_long (built from --datasets)")
    p.add_argument("--datasets", type=Path, default=DATASETS,
                   help="folder holding uci_amazon, uci_yelp, uci_imdb (for reviews_long and the sst2 cross checks)")
    p.add_argument("--tolerances", default="0.01,0.05")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"of {', '.join(STRATEGIES)}")
    p.add_argument("--only", default=None, metavar="STRATEGY@TOL,...",
                   help="run just these rows per task, e.g. ga-sieve@0.01,uniform-sieve@0.05 "
                        "(instead of every --strategies x --tolerances pair)")
    p.add_argument("--tune-steps", type=int, default=600, help="0 = search the zero-shot model")
    p.add_argument("--calibration", type=int, default=1024)
    p.add_argument("--val-limit", type=int, default=300)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--race", type=int, default=64)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in --out that this run does not redo (same task, strategy, tolerance)")
    p.add_argument("--combine", nargs="+", type=Path, metavar="FILE",
                   help="run nothing: merge the rows of these result files into --out (a later file's row "
                        "replaces an earlier one of the same task, strategy and tolerance) and print the table")
    p.add_argument("--heal-steps", type=int, default=0,
                   help="also heal each row's plan for this many steps (its search and fit reused, the healed "
                        "checkpoint scored again) and record validation and test before and after")
    p.add_argument("--heal", default="ce", choices=("ce", "kl"),
                   help="the healing loss (with --heal-steps); ce, the default of sieve-edge too")
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--heal-rank", type=int, default=0,
                   help="with --heal-steps: train rank-R adapters on the factors (merged after) instead of the "
                        "factors themselves (0)")
    p.add_argument("--holdout", type=int, default=0,
                   help="also confirm each row's plan on this many validation rows beyond --val-limit (the "
                        "finished search reused, its plan refit and scored again) and record what it keeps")
    p.add_argument("--heal-slack", type=float, default=0.0,
                   help="also rerun each GA row with this heal slack (needs --heal-steps): the search accepts plans "
                        "up to tolerance + slack, and the largest that heals back within the tolerance is kept. A "
                        "finished row at tolerance + slack in --work is resumed (no candidate scored again)")
    p.add_argument("--refit-tries", type=int, default=0,
                   help="also rerun each GA row with this many refit tries: the row's finished search is resumed "
                        "(no candidate scored again) and larger plans it measured are refit with the row's method; "
                        "the largest within the tolerance is kept and scored on test. With --heal-steps each try "
                        "is healed before it is judged")
    p.add_argument("--reruns-only", "--slack-only", dest="reruns_only", action="store_true",
                   help="with --heal-slack or --refit-tries: take each row's numbers from its folder in --work as an "
                        "earlier run left them (search.json) instead of running it, and run only those reruns (no "
                        "--holdout, --heal-steps or cross-dataset rerun of the row; --heal-steps still heals the "
                        "refit tries)")
    p.add_argument("--reuse-search", action="store_true",
                   help="keep a finished search of the same row and settings in the task's stage folder instead "
                        "of searching again (the row's numbers are that search's; e.g. to add --holdout or "
                        "--heal-steps to a row just run); when the stage folder holds another row's search, the "
                        "row's own finished state in --work is resumed on the minutes it spent (no candidate "
                        "scored again)")
    p.add_argument("--no-cross", dest="cross", action="store_false",
                   help="skip the uci_* cross-dataset scores of the sst2 plans")
    p.add_argument("--quick", action="store_true",
                   help="sst2 only, zero-shot, tolerance 0.05, uniform-output + ga-sieve, small sizes, no cross-dataset")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.tolerances, args.strategies = "sst2", "0.05", "uniform-output,ga-sieve"
        args.tune_steps, args.calibration, args.val_limit, args.test_limit = 0, 128, 96, 200
        args.cross = False
        args.race, args.population, args.generations, args.budget_minutes = 32, 6, 2, 10.0
        if args.out == ROOT / "benchmarks" / "results" / "search.json":
            args.out = ROOT / "benchmarks" / "results" / "search_quick.json"
    args.pairs = _pairs(p, args)
    if args.heal_slack and not args.heal_steps:
        p.error("--heal-slack needs --heal-steps: the plans beyond the tolerance are healed to be judged")
    if args.reruns_only and not (args.heal_slack or args.refit_tries):
        p.error("--reruns-only needs --heal-slack or --refit-tries")
    return args


def _pairs(parser, args) -> list[tuple[float, str]]:
    """(tolerance, strategy) pairs to run per task, in benchmark order."""
    if args.only is None:
        return [(float(t), s) for t in args.tolerances.split(",") for s in args.strategies.split(",")]
    pairs = []
    for item in args.only.split(","):
        label, _, tol = item.partition("@")
        try:
            pairs.append((float(tol), label))
        except ValueError:
            parser.error(f"--only: {item!r} is not STRATEGY@TOLERANCE (e.g. ga-sieve@0.01)")
        if label not in STRATEGIES:
            parser.error(f"--only: unknown strategy {label!r}; valid: {', '.join(STRATEGIES)}")
    return pairs


def task_spec(args, name: str) -> str:
    """What run_search and tune take for a task name: the sample name, or the built file."""
    if name == "reviews_long":
        return str(review_task(args.datasets, args.work / "tasks" / "reviews_long", seed=args.seed))
    return name


def cross_task(work: Path, name: str, datasets: Path = DATASETS) -> Path:
    """A task file for another sentiment dataset with the sst2 prompt and labels (test split only)."""
    sst2 = (ROOT / "samples" / "tasks" / "sst2.toml").read_text()
    head = sst2.split("[data]")[0].replace('name = "sst2"', f'name = "{name}"')
    path = work / "tasks" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + f'[data]\ntest = "{datasets / name / "test.jsonl"}"\n')
    return path


LONG_SOURCES = ("uci_amazon", "uci_yelp", "uci_imdb")


def review_task(datasets: Path, folder: Path, sentences: int = 4, seed: int = 0) -> Path:
    """The long-input task: reviews of ``sentences`` sentences each, written into ``folder``.

    The uci_* sets hold single review sentences (~10 words). A review here joins
    ``sentences`` sentences of one label from one source (drawn with ``seed``), ~45 words:
    the length users' reviews and articles have. Train and validation come from the sets'
    train files (3:1), test from their test files; labels stay balanced per source."""
    import random

    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for source in LONG_SOURCES:
        for part in ("train", "test"):
            path = datasets / source / f"{part}.jsonl"
            if not path.is_file():
                raise SystemExit(f"--datasets: {path} is missing (expected the uci_* sets there)")
            by_label: dict[str, list[str]] = {}
            for line in path.read_text().split("\n"):
                if line.strip():
                    row = json.loads(line)
                    by_label.setdefault(row["label"], []).append(row["text"].strip())
            for label, texts in sorted(by_label.items()):
                rng.shuffle(texts)
                reviews = [{"text": " ".join(texts[i:i + sentences]), "label": label}
                           for i in range(0, len(texts) - sentences + 1, sentences)]
                if part == "test":
                    splits["test"] += reviews
                else:
                    cut = len(reviews) * 3 // 4
                    splits["train"] += reviews[:cut]
                    splits["validation"] += reviews[cut:]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    toml = folder / "reviews_long.toml"
    toml.write_text(
        '# Built by benchmarks/search.py from the uci_* sentiment sets: reviews of several sentences.\n'
        'name = "reviews_long"\nkind = "classification"\nmetric = "accuracy"\nchat_template = false\n'
        'prompt = "Review: {text}\\nIs this review positive or negative?\\nAnswer:"\n\n'
        '[labels]\nnegative = " negative"\npositive = " positive"\n\n'
        '[data]\ntrain = "train.jsonl"\ncalibration = "train.jsonl"\nvalidation = "validation.jsonl"\n'
        'test = "test.jsonl"\nsample = "stratified"\n')
    return toml


def tuned_model(args, task_name: str, spec: str):
    """(model, tokenizer, spec): the task-tuned model from --work, tuning it once if missing."""
    from sieve_edge.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    if args.tune_steps <= 0:
        return load_model(args.model), tok, args.model
    folder = args.work / f"tuned-{task_name}-{args.tune_steps}"
    if (folder / "sieve_edge.json").is_file():
        return load_model(str(folder)), tok, str(folder)
    from sieve_edge.tune import DEFAULT_LR, save_tuned, tune

    # The same recipe as `sieve-edge run --tune-steps N` (full fine-tuning, its default rate).
    lr = DEFAULT_LR[False]
    model = load_model(args.model)
    t0 = time.perf_counter()
    tune(model, tok, spec, steps=args.tune_steps, lr=lr, batch_size=16, seed=args.seed)
    save_tuned(model, tok, folder, base_model=args.model, task=task_name, steps=args.tune_steps, lora=False,
               lr=lr, batch_size=16, seed=args.seed, force=True)
    print(f"tuned {task_name} in {time.perf_counter() - t0:.0f} s -> {folder}", file=sys.stderr)
    return model, tok, str(folder)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.combine:
        rows = combine(args.combine, args.out)
        print(table(rows))
        return 0
    import torch

    from sieve_edge.evaluate import evaluate
    from sieve_edge.progress import log
    from sieve_edge.search import SearchConfig, run_search

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    kept = _previous_rows(args) if args.merge else []
    started = time.perf_counter()
    for task_name in args.tasks.split(","):
        task_file = task_spec(args, task_name)
        dense, tok, spec = tuned_model(args, task_name, task_file)
        cross_dense = {}
        if task_name == "sst2" and args.cross:
            for name in CROSS:
                cross_dense[name] = evaluate(dense, tok, cross_task(args.work, name, args.datasets), "test").value
        # Every strategy searches `output` factors of the same calibration: the rows share one
        # stage folder per task, so the calibrate stage runs once (its key matches) and so does
        # the dense reference.
        stages = args.work / f"stages-{task_name}{'-quick' if args.quick else ''}"
        for tol, label in args.pairs:
            cfg = SearchConfig(tolerance=tol, seed=args.seed, population=args.population,
                               generations=args.generations, n_calibration=args.calibration,
                               val_limit=args.val_limit, race_size=args.race, **STRATEGIES[label])
            out = args.work / f"search-{task_name}-{label}-{tol:g}{'-quick' if args.quick else ''}"
            t0 = time.perf_counter()
            budget, scored = args.budget_minutes, None
            if args.reuse_search and not args.reruns_only:
                import shutil

                budget, scored = _reused_budget(args, spec, task_file, cfg, dense, tok, stages, out, log)
                shutil.rmtree(out, ignore_errors=True)  # rewritten from the stages (the search among them)
            if args.reruns_only:
                summary = _earlier(out)
            else:
                summary = run_search(spec, task_file, out, cfg, budget_minutes=budget,
                                     force=not args.reuse_search,
                                     test_limit=args.test_limit, log=log, model=copy.deepcopy(dense),
                                     tokenizer=tok, work=stages)
                if scored is not None:  # resumed from the row's own state
                    _drop_resume_point(summary, scored, stages, out)
            row = {"task": task_name, "strategy": label, "tolerance": tol,
                   "reduction": summary["linear_param_reduction"],
                   "val_dense": summary["validation"]["dense"], "val_final": summary["validation"]["final"],
                   "test_dense": summary["test"]["dense"], "test_pruned": summary["test"]["pruned"],
                   "test_drop": summary["test"]["drop"], "evaluations": summary["evaluations"],
                   "search_minutes": summary["search_seconds"] / 60,
                   "generations": summary["generations"], "stopped": summary["stopped"],
                   "full_evaluations": summary["full_evaluations"],
                   "candidates_per_minute": summary["evaluations"] / max(summary["search_seconds"] / 60, 1e-9),
                   "total_minutes": (summary["total_seconds"] / 60 if args.reruns_only
                                     else (time.perf_counter() - t0) / 60), "out": str(out),
                   "model": spec, "tune_steps": args.tune_steps, "budget_minutes": budget,
                   "method": summary["method"], "notes": summary["notes"],
                   "calibration": args.calibration, "threads": torch.get_num_threads()}
            if cross_dense and not args.reruns_only:
                from sieve_edge.checkpoint import load_checkpoint

                pruned = load_checkpoint(out)
                row["cross"] = {n: {"dense": cross_dense[n],
                                    "pruned": evaluate(pruned, tok, cross_task(args.work, n, args.datasets),
                                                       "test").value}
                                for n in CROSS}
            if args.holdout and not args.reruns_only:
                row["holdout"] = held_out(args, spec, task_file, out, cfg, dense, tok, stages, summary, log)
            if args.heal_steps and not args.reruns_only:
                row["heal"] = healed(args, spec, task_file, out, cfg, dense, tok, stages, summary, log,
                                     budget_minutes=budget)
            if args.heal_slack and cfg.strategy == "ga":
                row["slack"] = slacked(args, spec, task_file, out, cfg, dense, tok, stages, (task_name, label), log)
            if args.refit_tries and cfg.strategy == "ga" and cfg.method != cfg.search_method:
                row["refit_tries"] = refitted(args, spec, task_file, out, cfg, dense, tok, stages, log)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            _write(args, _merged(kept, rows), started)
        del dense
    rows = _merged(kept, rows)
    _write(args, rows, started)
    print(table(rows))
    return 0


def _earlier(out: Path) -> dict:
    """The summary a finished run of the row left in its folder (--slack-only)."""
    saved = out / "search.json"
    if not saved.is_file():
        raise SystemExit(f"--slack-only: {saved} is missing; run the row first (without --slack-only)")
    return json.loads(saved.read_text())


def _rerun(args, spec, task_file, out: Path, suffix: str, cfg, dense, tok, stages: Path, log,
           budget_minutes: float | None) -> tuple[dict, Path]:
    """The row rerun with ``cfg`` into a fresh OUT-suffix, on the row's stages (those whose
    key did not change are reused): (its summary, the folder)."""
    import shutil

    from sieve_edge.search import run_search

    folder = out.with_name(out.name + suffix)
    shutil.rmtree(folder, ignore_errors=True)   # the benchmark's own scratch: a fresh rerun every time
    summary = run_search(spec, task_file, folder, cfg, budget_minutes=budget_minutes, force=False,
                         test_limit=args.test_limit, log=log, model=copy.deepcopy(dense), tokenizer=tok,
                         work=stages)
    return summary, folder


def held_out(args, spec, task_file, out: Path, cfg, dense, tok, stages: Path, unheld: dict, log) -> dict:
    """The row's search confirmed on --holdout validation rows it never scored: the finished
    search's state is reused (no candidate scored again), the plan the holdout keeps is refit
    and scored on test, into OUT-holdout."""
    import dataclasses

    t0 = time.perf_counter()
    # the budget the row's search used up: the resumed search has no time to score more candidates
    spent = None if args.budget_minutes is None else max(unheld["search_seconds"] / 60, 1e-6)
    summary, folder = _rerun(args, spec, task_file, out, "-holdout", dataclasses.replace(cfg, holdout=args.holdout),
                             dense, tok, stages, log, spent)
    if summary["evaluations"] != unheld["evaluations"]:
        raise RuntimeError(f"{folder}: the holdout rerun scored candidates again ({unheld['evaluations']} -> "
                           f"{summary['evaluations']}): it did not resume the row's finished search")
    h = summary["holdout"]
    return {"rows": h["rows"], "dense": h["dense"], "tries": h["tries"], "passed": h["passed"],
            "reduction": summary["linear_param_reduction"], "val_final": summary["validation"]["final"],
            "test_pruned": summary["test"]["pruned"], "test_drop": summary["test"]["drop"],
            "method": summary["method"], "minutes": (time.perf_counter() - t0) / 60, "out": str(folder)}


def _heal_settings(args) -> dict:
    """The SearchConfig fields of the benchmark's --heal-* options."""
    return {"heal_steps": args.heal_steps, "heal": args.heal, "heal_lr": args.heal_lr,
            "heal_rank": args.heal_rank}


def _heal_record(args) -> dict:
    """The healing settings a result row records (``rank`` 0: the factors trained)."""
    return {"steps": args.heal_steps, "loss": args.heal, "lr": args.heal_lr, "rank": args.heal_rank}


def healed(args, spec, task_file, out: Path, cfg, dense, tok, stages: Path, unhealed: dict, log,
           budget_minutes: float | None = None) -> dict | None:
    """The row's plan refit again and healed (--heal-steps): what healing buys at this tolerance.

    The search and fit stages of the row just run are reused (healing is in the refit stage's
    key alone; ``budget_minutes``, default --budget-minutes, is the one the row's search ran
    on); only the healing and the test score run again, into OUT-heal[-rankR]. None when the
    plan cut nothing (nothing to heal)."""
    import dataclasses

    if not unhealed["linear_param_reduction"]:
        return None
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, **_heal_settings(args))
    summary, folder = _rerun(args, spec, task_file, out, "-heal" + (f"-rank{args.heal_rank}" if args.heal_rank else ""),
                             cfg, dense, tok, stages, log,
                             args.budget_minutes if budget_minutes is None else budget_minutes)
    if summary["linear_param_reduction"] != unhealed["linear_param_reduction"]:
        raise RuntimeError(f"{folder}: the healed refit did not reuse the row's plan")
    h = summary["heal"] or {}
    return {**_heal_record(args), "trainable_params": h.get("trainable_params"), "kept": h.get("kept"),
            "val_before": h.get("metric_before"), "val_after": h.get("metric_after"),
            "heal_seconds": h.get("seconds"), "test_pruned": summary["test"]["pruned"],
            "test_drop": summary["test"]["drop"], "minutes": (time.perf_counter() - t0) / 60, "out": str(folder)}


def slacked(args, spec, task_file, out: Path, cfg, dense, tok, stages: Path, row: tuple[str, str], log) -> dict:
    """The row searched at tolerance + --heal-slack, its plans beyond the tolerance healed and
    the largest that heals back within it kept, into OUT-slack. When the row at tolerance +
    slack ran in --work, its finished search state is resumed (the GA is that search: the
    state's fingerprint holds the search's tolerance) on the budget it used up, so no
    candidate is scored again; else the search runs on --budget-minutes."""
    import dataclasses

    from sieve_edge.search.stage import STATE

    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, heal_slack=args.heal_slack, **_heal_settings(args))
    task_name, label = row
    wide = args.work / f"search-{task_name}-{label}-{cfg.search_tolerance:g}{'-quick' if args.quick else ''}"
    resumed = (wide / STATE).is_file()
    budget = _resume(wide, stages, log) if resumed else args.budget_minutes
    summary, folder = _rerun(args, spec, task_file, out, "-slack", cfg, dense, tok, stages, log, budget)
    if resumed:
        _resumed_only(summary, wide, stages, folder)
    h = summary["healing"]
    return {"slack": args.heal_slack, **_heal_record(args),
            "resumed": str(wide) if resumed else None, "search_gain": h["search_gain"],
            "fallback_gain": h["fallback_gain"], "tries": h["tries"], "healed": h["healed"],
            "reduction": summary["linear_param_reduction"], "evaluations": summary["evaluations"],
            "val_final": summary["validation"]["final"], "heal": summary["heal"],
            "heal_searched": summary.get("heal_searched"),
            "test_pruned": summary["test"]["pruned"], "test_drop": summary["test"]["drop"],
            "method": summary["method"], "notes": summary["notes"], "minutes": (time.perf_counter() - t0) / 60,
            "out": str(folder)}


def _resume(row: Path, stages: Path, log) -> float:
    """Put the finished search state of the row folder ``row`` where the search stage resumes
    from; the minutes it spent (the budget that replays it without scoring anything new)."""
    import shutil

    from sieve_edge.search.stage import STATE

    state = json.loads((row / STATE).read_text())
    scratch = stages / "search.resume"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copy2(row / STATE, scratch / STATE)
    budget = max(float(state["elapsed"]) / 60, 1e-6)
    log(f"benchmark: resuming the finished search of {row.name} ({budget:.1f} min spent)")
    return budget


def _why_search_runs(args, spec, task_file, cfg, dense, tok, stages: Path) -> str | None:
    """None when the stage folder's finished search (and everything before it) is the one the
    row's settings and budget key, so a rerun reuses it and the fit after it; else why not."""
    from sieve_edge.search import search_stages
    from sieve_edge.stages import Workflow, model_ref
    from sieve_edge.tasks import load_task

    flow = Workflow(stages, search_stages(model_ref(spec, dense, tok), load_task(task_file), cfg,
                                          budget_minutes=args.budget_minutes, test_limit=args.test_limit))
    return flow.why_runs("search")


def _reused_budget(args, spec, task_file, cfg, dense, tok, stages: Path, out: Path, log) -> tuple[float | None,
                                                                                            int | None]:
    """--reuse-search: (the budget the row's search reruns on, the candidates its state had
    scored or None). The stage folder's finished search when it is the row's (--budget-minutes);
    else, when the row's folder keeps its finished state (another tolerance ran in the stage
    folder since), that state put back where the search stage resumes from, on the minutes it
    spent, so no candidate is scored again; else --budget-minutes (the row searches)."""
    from sieve_edge.search.stage import STATE

    why = _why_search_runs(args, spec, task_file, cfg, dense, tok, stages)
    if why is None or not (out / STATE).is_file():
        return args.budget_minutes, None
    log(f"benchmark: the stage folder's search is not the row's ({why}); resuming the row's own")
    scored = len(json.loads((out / "history.json").read_text())["frontier"])
    return _resume(out, stages, log), scored


def _resumed_only(summary: dict, row: Path, stages: Path, folder: Path) -> None:
    """After a rerun from ``_resume`` of the row folder ``row``: drop the copied state (left
    unread when the search stage was already done, a later row would resume from it; a killed
    rerun keeps it, its own resume point) and check that no candidate was scored again."""
    _drop_resume_point(summary, len(json.loads((row / "history.json").read_text())["frontier"]), stages, folder)


def _drop_resume_point(summary: dict, scored: int, stages: Path, folder: Path) -> None:
    import shutil

    shutil.rmtree(stages / "search.resume", ignore_errors=True)
    if summary["evaluations"] != scored:
        raise RuntimeError(f"{folder}: the rerun scored candidates again ({scored} -> {summary['evaluations']}): "
                           "it did not resume the row's finished search")


def refitted(args, spec, task_file, out: Path, cfg, dense, tok, stages: Path, log) -> dict:
    """The row's finished search (reused as it stands when the stage folder holds it, with its
    fit; else resumed from the row's own state: no candidate scored again either way) and its
    refit tries, into OUT-refit: the largest plan whose refit stays within the tolerance,
    scored on test."""
    import dataclasses

    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, refit_tries=args.refit_tries)
    if args.heal_steps:  # each try healed before it is judged, the plan kept shipped healed
        cfg = dataclasses.replace(cfg, **_heal_settings(args))
    why = _why_search_runs(args, spec, task_file, cfg, dense, tok, stages)
    if why is None:  # the row's search and fit as they stand: only the tries run
        log("benchmark: the stage folder holds the row's finished search; its fit is reused too")
        budget = args.budget_minutes
    else:
        log(f"benchmark: the stage folder's search is not the row's as it stands ({why})")
        budget = _resume(out, stages, log)
    summary, folder = _rerun(args, spec, task_file, out, "-refit-healed" if args.heal_steps else "-refit", cfg,
                             dense, tok, stages, log, budget)
    _resumed_only(summary, out, stages, folder)
    c = summary.get("refit_tries") or {}  # absent when the climb did not apply
    return {"tries_allowed": args.refit_tries, "searched_gain": c.get("searched_gain"), "start_gap": c.get("start_gap"),
            "tries": c.get("tries"), "kept": c.get("kept"), "healing": c.get("healing"), "heal": summary["heal"],
            "reduction": summary["linear_param_reduction"],
            "evaluations": summary["evaluations"], "val_final": summary["validation"]["final"],
            "test_pruned": summary["test"]["pruned"], "test_drop": summary["test"]["drop"],
            "method": summary["method"], "notes": summary["notes"], "minutes": (time.perf_counter() - t0) / 60,
            "out": str(folder)}


def combine(files: list[Path], out: Path) -> list[dict]:
    """Merge benchmark result files into `out`; `runs` lists each file's settings and the rows it gave."""
    rows, runs = [], []
    for f in files:
        if not f.is_file():
            raise SystemExit(f"--combine: {f} does not exist")
        doc = json.loads(f.read_text())
        mine = _rows_of(doc)
        if "runs" in doc and isinstance(doc["runs"], list):   # an earlier combined file: keep its history
            runs.extend(doc["runs"])
        elif "runs" in doc:                                    # per-task runs of an older merged file
            runs.extend({"file": f"{f.name} ({task})", **run} for task, run in doc["runs"].items())
        else:
            runs.append({"file": f.name, "settings": doc.get("settings"), "machine": doc.get("machine"),
                         "minutes": doc.get("minutes"),
                         "rows": [f"{r['task']} {r['strategy']} {r['tolerance']:g}" for r in mine]})
        rows = _merged(rows, mine)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "search", "quick": False, "rows": rows, "runs": runs,
                               "merged_by": "benchmarks/search.py --combine " + " ".join(f.name for f in files)},
                              indent=2))
    tmp.replace(out)
    return rows


def _previous_rows(args) -> list[dict]:
    """Rows of an earlier --out, each carrying the settings it ran with (older files kept them file-wide)."""
    if not args.out.is_file():
        return []
    return _rows_of(json.loads(args.out.read_text()))


def _rows_of(old: dict) -> list[dict]:
    rows = []
    for row in old.get("rows", []):
        row = dict(row)
        # an older merged file keeps each invocation under "runs" (by task); a plain one has it file-wide
        runs = old.get("runs")
        run = (runs.get(row["task"]) if isinstance(runs, dict) else None) or old
        settings, machine = run.get("settings") or {}, run.get("machine") or {}
        for name in ("model", "tune_steps", "budget_minutes", "calibration"):
            row.setdefault(name, settings.get(name))
        row.setdefault("threads", machine.get("threads"))
        saved = Path(row["out"]) / "search.json"
        if "method" not in row and saved.is_file():   # rows from before the method was recorded
            summary = json.loads(saved.read_text())
            row["method"], row["notes"] = summary["method"], summary["notes"]
        rows.append(row)
    return rows


def _merged(kept: list[dict], rows: list[dict]) -> list[dict]:
    """kept rows not redone by this run, then this run's rows, in benchmark order."""
    key = lambda r: (r["task"], r["strategy"], r["tolerance"])  # noqa: E731
    redone = {key(r) for r in rows}
    order = {name: i for i, name in enumerate(TASK_ORDER)}
    merged = [r for r in kept if key(r) not in redone] + rows
    return sorted(merged, key=lambda r: (order.get(r["task"], 99), r["tolerance"], list(STRATEGIES).index(r["strategy"])))


def _write(args, rows, started) -> None:
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "search", "quick": args.quick, "model": args.model, "tune_steps": args.tune_steps,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _machine(torch.get_num_threads()),
        "minutes": (time.perf_counter() - started) / 60, "rows": rows,
    }, indent=2))


def _machine(threads: int) -> dict:
    """The box the rows ran on: the CPU's model name (the dev boxes have changed make), threads,
    the load average when the results were written."""
    from sieve_edge.export.microbench import cpu_name

    return {"cpu": cpu_name(), "threads": threads,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _budget(row) -> str:
    return "-" if row.get("budget_minutes") is None else f"{row['budget_minutes']:g}"


def _tries_section(rows, key: str, header: str, setting, attempt) -> list[str]:
    """The table of the rows rerun with ``key`` (holdout, slack, refit_tries): what each rerun tried
    (``attempt`` of a try, ✗ when it failed) and what it changed against the row."""
    picked = [r for r in rows if r.get(key)]
    if not picked:
        return []
    lines = ["", header, "|---|---|---|---|---|---|"]
    for r in picked:
        h = r[key]
        # tries None: the rerun did not apply (a refit climb whose start missed the tolerance)
        tried = (", ".join(attempt(t) + ("" if t["passed"] else " ✗") for t in h["tries"]) or "-"
                 if h.get("tries") is not None else "none: " + "; ".join(h.get("notes") or ["did not apply"]))
        lines.append(f"| {r['task']} {r['strategy']} {r['tolerance']:g} | {setting(h)} | {tried} | "
                     f"{100 * r['reduction']:.1f}% → {100 * h['reduction']:.1f}% | {h['val_final']:.3f} | "
                     f"{100 * r['test_drop']:+.1f} → {100 * h['test_drop']:+.1f} pt |")
    return lines


def table(rows) -> str:
    lines = ["| task | strategy | tol | removed | val dense → final | test dense → pruned (drop) | evals "
             "| gens | cand/min | search min (budget) | row min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # a sieve refit that missed the tolerance keeps the output factors the search scored
        fell_back = " (kept output)" if r["strategy"].endswith("sieve") and r.get("method") == "output" else ""
        lines.append(f"| {r['task']} | {r['strategy']}{fell_back} | {r['tolerance']:g} | {100 * r['reduction']:.1f}% | "
                     f"{r['val_dense']:.3f} → {r['val_final']:.3f} | {r['test_dense']:.3f} → {r['test_pruned']:.3f} "
                     f"({100 * r['test_drop']:+.1f} pt) | {r['evaluations']} | {r.get('generations', '-')} | "
                     f"{r.get('candidates_per_minute', float('nan')):.1f} | {r['search_minutes']:.1f} "
                     f"({_budget(r)}) | {r['total_minutes']:.1f} |")
    heals = [r for r in rows if r.get("heal")]
    if heals:
        lines += ["", "| healed plan | steps (loss, lr) | trains | val before → after (kept) | "
                      "test drop unhealed → healed | heal s |", "|---|---|---|---|---|---|"]
        for r in heals:
            h = r["heal"]
            trains = f"rank-{h['rank']} adapters" if h.get("rank") else "factors"
            if h.get("trainable_params"):
                trains += f", {h['trainable_params'] / 1e6:.2f}M"
            lines.append(f"| {r['task']} {r['strategy']} {r['tolerance']:g} | {h['steps']} ({h['loss']}, "
                         f"{h.get('lr', float('nan')):g}) | {trains} | {h['val_before']:.3f} → {h['val_after']:.3f} "
                         f"({'kept' if h['kept'] else 'discarded'}) | {100 * r['test_drop']:+.1f} → "
                         f"{100 * h['test_drop']:+.1f} pt | {h.get('heal_seconds') or float('nan'):.0f} |")
    lines += _tries_section(
        rows, "holdout", "| row | holdout rows | plans tried: removed → holdout drop | removed | val final | "
                         "test drop without → with holdout |", lambda h: h["rows"],
        lambda t: f"{100 * t['gain']:.1f}% → {100 * t['drop']:+.1f}")
    lines += _tries_section(
        rows, "slack", "| row | slack | healed tries: removed (val drop) → healed drop | removed | val final | "
                       "test drop row → slack |", lambda h: f"{h['slack']:g}",
        lambda t: f"{100 * t['gain']:.1f}% ({100 * t['search_drop']:+.1f}) → {100 * t['drop']:+.1f}")
    lines += _tries_section(
        rows, "refit_tries", "| row | refit gap | refit tries: removed (searched drop) → refit drop | removed | "
                             "val final | test drop row → refit tries |",
        lambda h: ("-" if h["start_gap"] is None else f"{100 * h['start_gap']:+.1f} pt")
        + (f"; tries healed {h['healing']['steps']} steps ({h['healing']['loss']})" if h.get("healing") else ""),
        lambda t: f"{100 * t['gain']:.1f}% ("
                  + ("made" if t.get("made") else f"{100 * t['search_drop']:+.1f}") + f") → {100 * t['drop']:+.1f}")
    cross = [r for r in rows if r.get("cross")]
    if cross:
        lines += ["", "| sst2 plan | " + " | ".join(CROSS) + " |", "|---|" + "---|" * len(CROSS)]
        for r in cross:
            lines.append(f"| {r['strategy']} {r['tolerance']:g} | " + " | ".join(
                f"{r['cross'][n]['dense']:.3f} → {r['cross'][n]['pruned']:.3f}" for n in CROSS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

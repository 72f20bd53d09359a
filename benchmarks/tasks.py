"""Benchmark of task files (issue 17): multi-token label scoring and a two-field task shipped.

Part 1, scoring. Seconds per example of the classification scorer on a task with many
multi-token labels (BANKING77 with --banking77 DIR: 77 intents of 2-9 SmolLM2 tokens, 45
sharing a first token; or any task given with --task), before and after shared-prefix scoring:
  pairs          one full sequence per (example, label), batched: how it was scored before
  shared-prefix  the prompt once per example, the labels' continuations from its KV cache,
                 each distinct answer prefix once (the default now)
Both score the same rows (the task's [data] sample draws --examples test rows); the table
gives wall and process-CPU seconds per example (with --threads 1 the CPU seconds are the
work done, even on a loaded box), the speed-ups, accuracy and how often the predictions agree.

Part 2, shipping. `sieve-edge run` on a task whose prompt reads two fields (default:
reviews, "Product: {product} / Review: {text}", with an [[extra_test]]) to a bundle, which
`run` validates on --target; the row records the exit code, the validation status, the test
and extra-test metrics of the pruned bundle and its dense reference.

Prints Markdown tables and writes benchmarks/results/tasks.json (load averages before and
after are recorded: a loaded box makes the seconds meaningless, the ratio less so).

BANKING77 (Casanueva et al. 2020, CC BY 4.0; github.com/PolyAI-LDN/task-specific-datasets,
files banking_data/train.csv and test.csv) is not shipped with sieve-edge: pass the folder
holding those two CSV files and the script builds the task in --work (see build_banking77).

    python benchmarks/tasks.py --banking77 DIR              # SmolLM2-135M, both parts (~1 h on 2 idle cores)
    python benchmarks/tasks.py --banking77 DIR --no-run     # part 1 only (~15 min)
    python benchmarks/tasks.py --scorings ""                 # part 2 only (no BANKING77 needed)
    python benchmarks/tasks.py --model DIR --task T.toml --run-task R.toml --target P.toml \\
        --examples 4 --run-args "--tune-steps 0 --calibration 8 --val-limit 8 --strategy uniform"  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCORINGS = ("pairs", "shared-prefix")
RUN_ARGS = "--tune-steps 300 --calibration 256 --val-limit 200 --budget-minutes 15 --strategy ga"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default=None, help="a classification task with multi-token labels")
    p.add_argument("--banking77", type=Path, default=None,
                   help="a folder with BANKING77's train.csv and test.csv: build the 77-intent task from it")
    p.add_argument("--examples", type=int, default=40, help="test rows scored by each scoring (default 40)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for part 1 (default: torch's); with 1, CPU seconds are the work done "
                        "even on a loaded box")
    p.add_argument("--scorings", default=",".join(SCORINGS))
    p.add_argument("--no-run", dest="run", action="store_false", help="skip part 2 (sieve-edge run)")
    p.add_argument("--run-task", default="reviews", help="the two-field task of part 2")
    p.add_argument("--target", default="factory-pc", help="target profile of part 2")
    p.add_argument("--run-args", default=RUN_ARGS, help=f"more flags for sieve-edge run (default: {RUN_ARGS})")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "tasks")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tasks.json")
    args = p.parse_args(argv)
    args.scorings = [s.strip() for s in args.scorings.split(",") if s.strip()]
    bad = [s for s in args.scorings if s not in SCORINGS]
    if bad:
        p.error(f"--scorings: unknown {bad}; allowed: {', '.join(SCORINGS)}")
    if args.task is not None and args.banking77 is not None:
        p.error("give --banking77 DIR or --task T for part 1, not both")
    if args.scorings and args.task is None and args.banking77 is None:
        p.error("part 1 needs --banking77 DIR (BANKING77's CSV files) or --task T (a task with multi-token "
                "labels); --scorings '' skips part 1")
    if not args.scorings and not args.run:
        p.error("--scorings '' with --no-run leaves nothing to measure")
    return args


def build_banking77(csv_dir: Path, out: Path) -> Path:
    """BANKING77's CSV files → a task folder (three JSON Lines splits and the TOML); returns the TOML.

    test = all of test.csv (40 rows per intent); for each intent, in file order, validation =
    its last 10 rows of train.csv, train = its first 60 of the remaining ones. The answer of an
    intent is its name in words after a space (``card_arrival`` → `` card arrival``; a trailing
    ``?`` dropped). The files stay grouped by intent, so the task samples limits by label.
    """
    import csv

    csv_dir = Path(csv_dir)
    if (csv_dir / "banking_data").is_dir():
        csv_dir = csv_dir / "banking_data"

    def read(name: str) -> list[tuple[str, str]]:
        path = csv_dir / name
        if not path.is_file():
            raise SystemExit(f"--banking77: {path} not found (need train.csv and test.csv of BANKING77)")
        with open(path, newline="", encoding="utf-8") as f:
            return [(row["text"].strip(), row["category"]) for row in csv.DictReader(f)]

    train_rows, test_rows = read("train.csv"), read("test.csv")
    intents = list(dict.fromkeys(label for _, label in train_rows))
    by_intent: dict[str, list[str]] = {i: [] for i in intents}
    for text, label in train_rows:
        by_intent[label].append(text)
    splits = {"test": test_rows, "validation": [], "train": []}
    for intent in intents:
        rows = by_intent[intent]
        splits["validation"] += [(t, intent) for t in rows[-10:]]
        splits["train"] += [(t, intent) for t in rows[:-10][:60]]
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text, label in rows:
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    labels = "\n".join(f"{json.dumps(i)} = {json.dumps(' ' + i.replace('_', ' ').rstrip('?'))}" for i in intents)
    toml = (f'name = "banking77"\nkind = "classification"\nchat_template = false\n'
            f'prompt = "Customer message to a bank: {{text}}\\nIntent of the message:"\n\n[labels]\n{labels}\n\n'
            '[data]\ntrain = "train.jsonl"\nvalidation = "validation.jsonl"\ntest = "test.jsonl"\n'
            'sample = "stratified"\nseed = 0\n')
    (out / "banking77.toml").write_text(toml, encoding="utf-8")
    return out / "banking77.toml"


def score_rows(args) -> tuple[list[dict], dict]:
    """Part 1: each scoring on the same rows of the same model; (rows, task facts)."""
    import torch

    from sieve_edge.evaluate import accuracy_from_logprobs, make_scorer
    from sieve_edge.models import load_model, load_tokenizer
    from sieve_edge.tasks import load_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(args.task if args.banking77 is None else build_banking77(args.banking77, args.work / "banking77"))
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    rows, predictions = [], {}
    facts = {}
    for scoring in args.scorings:
        scorer = make_scorer(tokenizer, task, "test", limit=args.examples, batch_size=args.batch_size, model=model,
                             scoring=scoring)
        lengths = sorted({len(per_label[0]) for per_label in scorer.answer_ids})
        firsts = [per_label[0][0] for per_label in scorer.answer_ids]
        facts = {"task": task.name, "labels": len(task.labels), "answer_tokens": [lengths[0], lengths[-1]],
                 "sharing_a_first_token": sum(firsts.count(f) > 1 for f in firsts),
                 "sample": scorer.sample, "prompt_tokens_mean": sum(map(len, scorer.prompt_ids)) / scorer.n}
        scorer.label_logprobs(model, [0])  # warm-up: first-call allocations, untimed
        t0, c0 = time.perf_counter(), time.process_time()
        logprobs = scorer.label_logprobs(model)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        predictions[scoring] = logprobs.argmax(-1)
        rows.append({"scoring": scoring, "examples": scorer.n, "seconds": seconds,
                     "seconds_per_example": seconds / scorer.n, "cpu_seconds_per_example": cpu / scorer.n,
                     "threads": torch.get_num_threads(),
                     "accuracy": accuracy_from_logprobs(logprobs, scorer.labels)})
        print(f"{scoring}: {seconds / scorer.n:.3f} s per example on {scorer.n} examples", file=sys.stderr, flush=True)
    base = rows[0]
    for row in rows:
        row["speedup"] = base["seconds_per_example"] / row["seconds_per_example"]
        row["cpu_speedup"] = base["cpu_seconds_per_example"] / row["cpu_seconds_per_example"]
        row["agreement"] = float((predictions[row["scoring"]] == predictions[base["scoring"]]).double().mean())
    return rows, facts


def ship(args) -> dict:
    """Part 2: `sieve-edge run` of the two-field task to a bundle validated on --target."""
    out = args.work / "bundle"
    cmd = [sys.executable, "-m", "sieve_edge", "run", "--model", args.model, "--task", args.run_task,
           "--target", args.target, "--out", str(out), "--work", str(args.work / "stages"), "--force",
           *shlex.split(args.run_args)]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"command": " ".join(shlex.quote(c) for c in cmd[1:]), "exit_code": proc.returncode,
           "minutes": (time.perf_counter() - t0) / 60, "bundle": str(out)}
    if proc.returncode not in (0, 3):
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    reports = sorted(out.glob("reports/*/report.json"))
    if not reports:
        row["error"] = "no validation report in the bundle"
        return row
    report = json.loads(reports[-1].read_text())
    m = report.get("measurement") or {}
    ref = report.get("reference") or {}
    task = json.loads((out / "bundle.json").read_text()).get("task_spec", {})
    row.update({"status": report["status"], "target": report["target"], "metric": m.get("metric"),
                "prompt": task.get("prompt"), "test": m.get("value"), "test_dense": ref.get("value"),
                "n_test": m.get("n_examples"), "truncated": m.get("truncated"),
                "extra_tests": report.get("extra_tests") or {},
                "reduction": report.get("reduction")})
    return row


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def tables(rows: list[dict], facts: dict, run: dict | None) -> str:
    out = []
    if rows:
        out += [f"{facts['task']}: {facts['labels']} labels of {facts['answer_tokens'][0]}-{facts['answer_tokens'][1]} "
                f"tokens, {facts['sharing_a_first_token']} sharing a first token; {rows[0]['examples']} test rows "
                f"({facts['sample']['mode']}), prompts of {facts['prompt_tokens_mean']:.0f} tokens on average", "",
                "| scoring | examples | threads | s / example | speed-up | CPU s / example | CPU speed-up | accuracy "
                "| agreement |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['scoring']} | {r['examples']} | {r['threads']} | {r['seconds_per_example']:.3f} | "
                f"{r['speedup']:.1f}x | {r['cpu_seconds_per_example']:.3f} | {r['cpu_speedup']:.1f}x | "
                f"{100 * r['accuracy']:.1f}% | {100 * r['agreement']:.0f}% |" for r in rows]
    if run:
        out += ["", "| task prompt | exit | validation | test (dense) | extra tests (dense) | minutes |",
                "|---|---|---|---|---|---|"]
        if "error" in run:
            out.append(f"| - | {run['exit_code']} | error: {run['error']} | - | - | {run['minutes']:.1f} |")
        else:
            extra = ", ".join(f"{k} {v['value']:.3f} ({_num(v['dense'])})" for k, v in run["extra_tests"].items()) or "-"
            out.append(f"| {run['prompt']!r} | {run['exit_code']} | {run['status']} on {run['target']} | "
                       f"{_num(run['test'])} ({_num(run['test_dense'])}) | {extra} | {run['minutes']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()
    rows, facts = score_rows(args) if args.scorings else ([], {})
    run = ship(args) if args.run else None
    doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "task": facts, "scoring": rows, "run": run,
           "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "load_average_before": load_before, "load_average_after": os.getloadavg()},
           "minutes": (time.time() - started) / 60,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(tables(rows, facts, run))
    print(f"\nwritten: {args.out}")
    return 0 if run is None or run.get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: bad inputs and SIGKILL against the CLI, as a user would meet them (issue 16).

Part 1, bad inputs: every case of ``tests/bad_inputs.py`` (tiny random models, built offline)
run as a subprocess (``python -m sieve_edge ...``, the runner as ``python -m sieve_edge.runtime``
or ``python BUNDLE/runner.py``), stdin closed. A case is clean when it exits 1 (3 for a
failed gate) with exactly one stderr line starting ``error:`` (the last line) that names
the file/key/row, no traceback, and no output or ``OUT.partial-*``/``.final-*``/``.old-*``
left behind. Cases that need a monkeypatch (a full disk) run only in the unit tests.

Part 2, kills: ``sieve-edge run`` on a tiny model, uninterrupted once (its bundle digest is
the reference), then N times killed with SIGKILL (the whole process group) at a random
moment of that run's duration and rerun with the same command. Every rerun must exit 0,
leave no leftover, and end with the same bundle digest: the sha256 of every file
``bundle.json`` records, ``reference.json`` without its timestamp (``bundle.json`` and
``MODEL_CARD.md`` hold timestamps and are left out).

    python benchmarks/robustness.py                        # every case + 10 kills (long: an idle box)
    python benchmarks/robustness.py --kills 2 --strategy uniform --cases gguf-empty,task-missing
    python benchmarks/robustness.py --kills 0              # bad inputs only

Prints two tables and writes ``benchmarks/results/robustness.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import bad_inputs as B  # noqa: E402

LEFTOVER_SUFFIXES = (".partial-", ".final-", ".old-", ".tmp-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated case ids (default: every case)")
    p.add_argument("--kills", type=int, default=10, help="SIGKILL trials of `sieve-edge run` (0: none)")
    p.add_argument("--strategy", choices=("ga", "uniform"), default="ga",
                   help="search strategy of the killed run (ga: resumes a genetic search; uniform: quicker)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    return p.parse_args(argv)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                PYTHONDONTWRITEBYTECODE="1")


def command(case: B.Case) -> list[str]:
    if case.tool == "cli":
        return [sys.executable, "-m", "sieve_edge", *case.argv]
    if case.tool == "runner":
        return [sys.executable, "-m", "sieve_edge.runtime", *case.argv]
    return [sys.executable, str(Path(case.argv[0]) / "runner.py")]


def run_case(case: B.Case) -> dict:
    before = B.snapshot(case)
    t0 = time.perf_counter()
    proc = subprocess.run(command(case), capture_output=True, text=True, stdin=subprocess.DEVNULL, env=_env(),
                          timeout=900, cwd=case.argv[0] if case.tool == "bundle-runner" else None)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    error = next((ln for ln in lines if ln.startswith(("error:", "internal error:"))), lines[0] if lines else "")
    left = [str(p) for p in case.outputs if Path(p).exists()]
    left += [str(q) for p in case.outputs for q in B.leftovers_of(Path(p))]
    problems = B.problems(case, proc.returncode, proc.stderr, before)
    return {"case": case.id, "group": case.group, "exit_code": proc.returncode, "expected_exit_code": case.exit_code,
            "error_line": error, "stderr_lines": len(lines), "traceback": "Traceback" in proc.stderr,
            "leftovers": left, "clean": not problems, "problems": problems, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------- kills


def bundle_digest(bundle: Path) -> str:
    """sha256 over what a bundle ships, timestamps left out (see the module docstring)."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    files = {k: v for k, v in manifest["sha256"].items() if k != "reference.json"}
    reference = json.loads((bundle / "reference.json").read_text())
    reference.pop("measured_at", None)
    blob = json.dumps({"files": files, "reference": reference}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def leftovers_under(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        if not folder.exists():
            continue
        for p in [folder, *folder.rglob("*")]:
            if any(s in p.name and p.name.rsplit("-", 1)[-1].isdigit() for s in LEFTOVER_SUFFIXES) \
                    or p.name.endswith(".tmp"):
                found.append(str(p))
    return found


def kill_test(work: Path, n: int, strategy: str, seed: int, log) -> dict:
    """One uninterrupted `sieve-edge run`, then n runs killed at random moments and rerun."""
    fixtures = work / "kill-fixtures"
    model = B.write_model(fixtures / "model")
    task = B.write_task(fixtures / "task")
    profile = fixtures / "profile.toml"
    profile.write_text(B.PROFILE_TOML.replace("max_metric_drop = 0.05", "max_metric_drop = 0.5"))
    runs = work / "runs"

    def argv(out: Path) -> list[str]:
        return [sys.executable, "-m", "sieve_edge", "run", "--model", str(model), "--task", str(task),
                "--target", str(profile), "--out", str(out), "--calibration", "8", "--val-limit", "8",
                "--strategy", strategy]

    def fresh(out: Path) -> None:
        for p in runs.glob(out.name + "*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def complete(out: Path) -> dict:
        t0 = time.perf_counter()
        proc = subprocess.run(argv(out), capture_output=True, text=True, stdin=subprocess.DEVNULL, env=_env(),
                              timeout=3600)
        seconds = time.perf_counter() - t0
        ok = proc.returncode == 0 and (out / "bundle.json").is_file()
        return {"exit_code": proc.returncode, "seconds": round(seconds, 1),
                "digest": bundle_digest(out) if ok else None,
                "error": None if ok else (proc.stderr.strip().splitlines() or [""])[-1][:300],
                "leftovers": leftovers_under(runs)}

    runs.mkdir(parents=True, exist_ok=True)
    out = runs / "bundle"
    log("kill test: one uninterrupted run ...")
    reference = complete(out)
    if reference["digest"] is None:
        raise SystemExit(f"the uninterrupted run failed: {reference['error']}")
    log(f"kill test: uninterrupted run {reference['seconds']:.0f} s, digest {reference['digest'][:16]}")
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        at = rng.uniform(0.02, 0.98) * reference["seconds"]
        killed, attempts = False, 0
        while not killed and attempts < 3:  # a run faster than the reference finishes first: kill earlier
            attempts += 1
            fresh(out)
            proc = subprocess.Popen(argv(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL, env=_env(), start_new_session=True)
            try:
                proc.wait(timeout=at)
                at *= 0.6
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its children (the validate runner)
                proc.wait()
                killed = True
        stages = sorted(p.name for p in (runs / "bundle.work").iterdir()) if (runs / "bundle.work").is_dir() else []
        after_kill = leftovers_under(runs)
        rerun = complete(out)
        same = rerun["digest"] == reference["digest"]
        trials.append({"trial": i + 1, "kill_at_s": round(at, 1), "killed": killed, "attempts": attempts,
                       "work_after_kill": stages,
                       "leftovers_after_kill": after_kill, "rerun": rerun, "same_bundle": same})
        log(f"kill {i + 1}/{n} at {at:.1f} s: rerun exit {rerun['exit_code']}, "
            f"{'same bundle' if same else 'DIFFERENT bundle'}, {len(rerun['leftovers'])} leftovers")
    fresh(out)
    return {"strategy": strategy, "uninterrupted": reference, "trials": trials,
            "identical": sum(t["same_bundle"] for t in trials),
            "reruns_with_leftovers": sum(bool(t["rerun"]["leftovers"]) for t in trials)}


# ---------------------------------------------------------------- main


def table(rows: list[dict]) -> str:
    lines = ["| case | exit | first error line | leftovers | clean |", "|---|---|---|---|---|"]
    for r in rows:
        line = r["error_line"].replace("|", "\\|")
        line = line if len(line) <= 110 else line[:107] + "..."
        lines.append(f"| {r['case']} | {r['exit_code']} | {line} | {len(r['leftovers'])} | "
                     f"{'yes' if r['clean'] else 'NO: ' + '; '.join(r['problems'])[:200]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sieve-edge-robustness-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        log(f"building the bad inputs under {work} ...")
        cases = B.build_cases(work / "cases")
        if args.cases:
            wanted = set(args.cases.split(","))
            unknown = wanted - {c.id for c in cases}
            if unknown:
                raise SystemExit(f"unknown case ids: {', '.join(sorted(unknown))}")
            cases = [c for c in cases if c.id in wanted]
        rows, skipped = [], []
        for i, case in enumerate(cases, 1):
            if case.patch:
                skipped.append({"case": case.id, "why": f"needs an in-process patch ({case.patch}): unit tests only"})
                continue
            rows.append(run_case(case))
            log(f"[{i}/{len(cases)}] {case.id}: exit {rows[-1]['exit_code']}, "
                f"{'clean' if rows[-1]['clean'] else 'NOT CLEAN: ' + '; '.join(rows[-1]['problems'])}")
        kills = kill_test(work, args.kills, args.strategy, args.seed, log) if args.kills else None
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "cases": len(rows), "clean": sum(r["clean"] for r in rows),
        "tracebacks": sum(r["traceback"] for r in rows),
        "cases_with_leftovers": sum(bool(r["leftovers"]) for r in rows),
        "skipped": skipped,
        "kills": None if kills is None else f"{kills['identical']}/{len(kills['trials'])} identical bundles, "
                                            f"{kills['reruns_with_leftovers']} reruns with leftovers",
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    print(table(rows))
    if kills:
        print("\n| trial | kill at s | killed | rerun exit | same bundle | leftovers after rerun |")
        print("|---|---|---|---|---|---|")
        for t in kills["trials"]:
            print(f"| {t['trial']} | {t['kill_at_s']} | {'yes' if t['killed'] else 'no (finished)'} | "
                  f"{t['rerun']['exit_code']} | {'yes' if t['same_bundle'] else 'NO'} | {len(t['rerun']['leftovers'])} |")
    print(f"\n{summary['clean']}/{summary['cases']} clean errors, {summary['tracebacks']} tracebacks, "
          f"{summary['cases_with_leftovers']} cases with leftovers"
          + (f"; kills: {summary['kills']}" if kills else "") + f" ({summary['minutes']} min)")
    result = {"summary": summary, "cases": rows, "kill_test": kills,
              "settings": {"cases": args.cases, "kills": args.kills, "strategy": args.strategy, "seed": args.seed},
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    ok = summary["clean"] == summary["cases"] and (not kills or kills["identical"] == len(kills["trials"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""OpenVINO CPU runtime cache: peak memory against latency for a bundle (target key
`runtime_cache_capacity`).

The CPU plugin keeps compiled kernels and their buffers per input shape (default capacity
5000 entries). A classification or generation task sees a new shape for every prompt
length and every KV-cache length, so the runner's memory grows with the lengths it has
seen; a small capacity bounds it and recompiles instead. This runs the bundle's own runner
(`python -m sieve_edge.runtime B --target T --no-gates`) once per capacity and repeat, each
in its own process (peak RSS is that run's), capacities alternated within a repeat, and
reports medians and ratios to the plugin default measured in the same run.

    python benchmarks/ov_cache.py --bundle runs/smollm2-sst2-factory-pc --repeats 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "runs" / "smollm2-sst2-factory-pc")
    p.add_argument("--capacities", default="default,0,16,64,256",
                   help="comma list; 'default' leaves the plugin's own capacity")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--limit", type=int, default=200, help="test examples per run")
    p.add_argument("--threads", type=int, default=None, help="override the target's threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ov-cache.json")
    return p.parse_args(argv)


def target_with(bundle: Path, capacity: str, folder: Path) -> Path:
    """The bundle's target profile with `runtime_cache_capacity` set (schema 3), or as it is."""
    text = (bundle / "target.toml").read_text()
    if text.count("runtime_cache_capacity"):
        raise SystemExit(f"{bundle / 'target.toml'} already sets runtime_cache_capacity; give a bundle without it")
    if capacity != "default":
        head, sep, budget = text.partition("\n[budget]")
        lines = [ln for ln in head.splitlines() if not ln.startswith("schema_version")]
        text = "\n".join(["schema_version = 3", *lines, f"runtime_cache_capacity = {int(capacity)}"]) + sep + budget
    path = folder / f"target-{capacity}.toml"
    path.write_text(text)
    return path


def run_once(args, target: Path, folder: Path, tag: str) -> dict:
    out = folder / f"{tag}.json"
    cmd = [sys.executable, "-m", "sieve_edge.runtime", str(args.bundle), "--target", str(target),
           "--no-gates", "--limit", str(args.limit), "--json", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    m = json.loads(out.read_text())
    lat = m["latency"]
    return {"peak_rss_mb": m["peak_rss_mb"], "value": m["value"],
            "first_token_p50": lat["first_token_ms"]["p50"], "first_token_p90": lat["first_token_ms"]["p90"],
            "token_p50": lat["token_ms"]["p50"], "token_p90": lat["token_ms"]["p90"],
            "example_p50": lat["example_ms"]["p50"], "example_p90": lat["example_ms"]["p90"],
            "settings": m["runtime_settings"], "threads": m["threads"]}


COLUMNS = ("peak_rss_mb", "first_token_p50", "token_p50", "token_p90", "example_p50", "example_p90")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.bundle / "bundle.json").is_file():
        raise SystemExit(f"{args.bundle}: not a sieve-edge bundle (no bundle.json)")
    capacities = [c.strip() for c in args.capacities.split(",")]
    runs: dict[str, list[dict]] = {c: [] for c in capacities}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        targets = {c: target_with(args.bundle, c, folder) for c in capacities}
        for r in range(args.repeats):
            order = capacities if r % 2 == 0 else capacities[::-1]   # alternate: drift hits all alike
            for c in order:
                t0 = time.perf_counter()
                runs[c].append(run_once(args, targets[c], folder, f"{c}-{r}"))
                print(f"repeat {r + 1}/{args.repeats} capacity {c}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for c in capacities:
        row = {"capacity": c, **{k: statistics.median(x[k] for x in runs[c]) for k in (*COLUMNS, "value")},
               "plugin_capacity": runs[c][0]["settings"].get("CPU_RUNTIME_CACHE_CAPACITY"), "runs": runs[c]}
        rows.append(row)
    base = rows[0] if capacities[0] == "default" else None
    lines = ["| capacity | peak RSS MB | first token p50 | token p50 | token p90 | example p50 | example p90 | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = (lambda k: f" ({row[k] / base[k]:.2f}×)" if base and row is not base else "")  # noqa: E731
        lines.append(f"| {row['capacity']} ({row['plugin_capacity']}) | "
                     + " | ".join(f"{row[k]:.1f}{ratio(k)}" for k in COLUMNS) + f" | {row['value']:.4f} |")
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "ov-cache", "bundle": str(args.bundle), "limit": args.limit,
                                    "repeats": args.repeats, "threads": runs[capacities[0]][0]["threads"],
                                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "rows": rows, "table": table}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

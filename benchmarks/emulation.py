"""ARM64 under QEMU emulation vs x86: accuracy, prediction agreement and emulated wall time
of a bundle (`sieve-edge validate --emulate`), for one or more emulated CPU models.

Each CPU model is one `validate(..., emulate=True, emulate_cpu=MODEL)`: the bundle's runner
natively on this x86 host and under `qemu-aarch64 -cpu MODEL`, same examples, same profile
settings. The CPU model decides which ARM64 kernels the runtime picks (cortex-a72: NEON only;
cortex-a76 / neoverse-n1: + dot product and fp16; neoverse-n2 / max: + i8mm, SVE2, and for max
SME), so several models show whether the kernel paths differ in their predictions. The
per-example wall time shows the emulation's cost: a correctness check, not a speed figure.
Needs `sieve-edge emulator setup` first. It is slow: with SmolLM2-135M int8 on SST-2 one
emulated example costs ~45 host CPU-seconds with `cortex-a72` and ~15 with `cortex-a76`
(measured under load), i.e. roughly 3 h and 1 h for 500 examples on an idle 2-core box.

    python benchmarks/emulation.py --bundle runs/smollm2-sst2-arm64-panel --cpus cortex-a72,cortex-a76,max
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "runs" / "smollm2-sst2-arm64-panel")
    p.add_argument("--target", default="arm64-panel", help="profile name or TOML (arch = \"aarch64\")")
    p.add_argument("--cpus", default="cortex-a72", help="comma list of QEMU CPU models (`sieve-edge emulator status`)")
    p.add_argument("--limit", type=int, default=None, help="test examples (default: all of the bundle's)")
    p.add_argument("--box", default="idle", help="box state recorded with the numbers, e.g. 'idle', 'under load'")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "emulation.json")
    args = p.parse_args(argv)
    args.cpus = [c.strip() for c in args.cpus.split(",") if c.strip()]
    if not args.cpus:
        p.error("--cpus needs at least one CPU model")
    return args


def row(cpu: str, report) -> dict:
    """One table row from a ValidationReport of `validate --emulate`."""
    emu = report.emulation
    c = emu["comparison"]
    return {
        "cpu": cpu, "features": emu.get("features"), "status": report.status, "n": c["n"], "metric": c["metric"],
        "x86": c["x86"], "arm64": c["arm64"], "reference": (report.reference or {}).get("value"),
        "agreement": c["agreement"], "disagreements": len(c["disagreements"]),
        "max_logprob_diff": c["max_logprob_diff"], "mean_logprob_diff": c["mean_logprob_diff"],
        "x86_s_per_example": emu["x86_s_per_example"], "arm64_s_per_example": emu["arm64_s_per_example"],
        "x86_wall_s": emu["x86_wall_s"], "arm64_wall_s": emu["arm64_wall_s"], "runtime": emu.get("runtime"),
        "first_disagreements": c["disagreements"][:20],
    }


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| CPU model | x86 | arm64 | dense ref | agreement | differ | max / mean score diff | "
             "s/example x86 | s/example arm64 (emulated) | slowdown | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        slow = (r["arm64_s_per_example"] / r["x86_s_per_example"]
                if r["arm64_s_per_example"] and r["x86_s_per_example"] else None)
        lines.append(
            f"| {r['cpu']} | {_f(r['x86'], '.4f')} | {_f(r['arm64'], '.4f')} | {_f(r['reference'], '.4f')} | "
            f"{_f(None if r['agreement'] is None else 100 * r['agreement'], '.1f')}% | {r['disagreements']}/{r['n']} | "
            f"{_f(r['max_logprob_diff'], '.3g')} / {_f(r['mean_logprob_diff'], '.3g')} | "
            f"{_f(r['x86_s_per_example'], '.3f')} | {_f(r['arm64_s_per_example'], '.2f')} | {_f(slow, '.0f')}x | "
            f"{r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sieve_edge.emulate import load_emulator
    from sieve_edge.progress import log
    from sieve_edge.runtime import _cpu_name
    from sieve_edge.validate import validate

    info = load_emulator()
    rows = []
    t0 = time.perf_counter()
    doc = {
        "bundle": str(args.bundle), "target": args.target, "limit": args.limit, "box": args.box,
        "machine": {"processor": _cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "emulator": {k: info.get(k) for k in ("suite", "qemu_version", "python_version", "versions")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for cpu in args.cpus:
        with tempfile.TemporaryDirectory(prefix="emulation-bench-") as tmp:
            log(f"[{cpu}] validate --emulate on {args.bundle}")
            report = validate(args.bundle, args.target, out=tmp, limit=args.limit, emulate=True, emulate_cpu=cpu,
                              log=log)
            rows.append(row(cpu, report))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        # after every CPU model: an interrupted multi-hour run keeps the rows it finished
        doc.update(minutes=(time.perf_counter() - t0) / 60, rows=rows,
                   created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\n{args.bundle.name}, {args.box}, {doc['minutes']:.1f} min; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

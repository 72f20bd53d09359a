"""Where one decode step's time goes: per-node profile of an exported model at one token.

Runs the bundle runner's own loop (sieve_edge.runtime: prompt pass, then greedy steps of one
token) over an export folder with the runtime's profiler on, and sums the decode steps by
node type: nodes executed per token, ms per token, share. Also: wall time per step, the sum
of the nodes' own times (the rest is the runtime's and the loop's per-call overhead), the
weight bytes the step reads and their time at the measured read bandwidth.

    python benchmarks/decode_profile.py --export EXPORT_DIR [--steps 32] [--threads 2]

OpenVINO: ``PERF_COUNT`` (times per executed node, after the plugin's fusions). onnxruntime:
session profiling (times per kernel run). Not a test; the numbers are this machine's.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def profile_openvino(folder: Path, prompt: list[int], steps: int, threads: int) -> dict:
    import numpy as np
    import openvino as ov

    from sieve_edge.runtime import load_model

    model = load_model(folder, "openvino", threads)
    model.config["PERF_COUNT"] = True
    model.reset()
    logits = model.forward(prompt)
    by_type = collections.defaultdict(lambda: [0, 0.0])   # type -> [nodes executed, seconds]
    walls, node_sums = [], []
    for _ in range(steps):
        nxt = int(np.argmax(logits[-1]))
        t = time.perf_counter()
        logits = model.forward([nxt])
        walls.append(time.perf_counter() - t)
        total = 0.0
        for info in model.request.get_profiling_info():
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            seconds = info.real_time.total_seconds()
            kind = by_type[info.node_type]
            kind[0] += 1
            kind[1] += seconds
            total += seconds
        node_sums.append(total)
    return _summary(by_type, walls, node_sums, steps, "openvino " + ov.get_version())


def profile_onnxruntime(folder: Path, prompt: list[int], steps: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from sieve_edge.runtime import load_model

    model = load_model(folder, "onnxruntime", threads)
    with tempfile.TemporaryDirectory() as tmp:
        model._opts.enable_profiling = True
        model._opts.profile_file_prefix = str(Path(tmp) / "ort")
        model.reset()
        logits = model.forward(prompt)
        walls = []
        for _ in range(steps):
            nxt = int(np.argmax(logits[-1]))
            t = time.perf_counter()
            logits = model.forward([nxt])
            walls.append(time.perf_counter() - t)
        trace = json.loads(Path(model.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]   # the first run is the prompt pass
    by_type = collections.defaultdict(lambda: [0, 0.0])
    node_sums = [0.0] * len(decode_runs)
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for i, r in enumerate(decode_runs):
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                kind = by_type[e["args"].get("op_name", "?")]
                kind[0] += 1
                kind[1] += e["dur"] / 1e6
                node_sums[i] += e["dur"] / 1e6
                break
    return _summary(by_type, walls, node_sums, len(decode_runs), "onnxruntime " + ort.__version__)


def _summary(by_type, walls, node_sums, steps, runtime) -> dict:
    # means throughout, so that the per-type rows add up to the node total
    wall = statistics.fmean(walls) * 1e3
    nodes = statistics.fmean(node_sums) * 1e3
    rows = sorted(({"type": t, "nodes_per_token": n / steps, "ms_per_token": s * 1e3 / steps}
                   for t, (n, s) in by_type.items()), key=lambda r: -r["ms_per_token"])
    return {"runtime": runtime, "steps": steps, "wall_ms_per_token": wall,
            "wall_ms_per_token_median": statistics.median(walls) * 1e3, "node_ms_per_token": nodes,
            "outside_nodes_ms_per_token": wall - nodes,
            "nodes_per_token": sum(r["nodes_per_token"] for r in rows), "by_type": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="an export folder (sieve-edge export; full head)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    folder = Path(a.export)
    from runtime import PROMPT, bytes_read_per_token, read_bandwidth_gbs
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    fn = profile_onnxruntime if (folder / "model.onnx").exists() else profile_openvino
    result = fn(folder, prompt, a.steps, a.threads)
    bw = read_bandwidth_gbs()
    b = bytes_read_per_token(folder)
    result.update({"export": str(folder), "threads": a.threads, "read_bandwidth_gbs": bw,
                   "bytes_read_per_token": b, "bound_ms_per_token": b / (bw * 1e9) * 1e3})
    print(f"{result['runtime']}, {a.threads} threads, {result['steps']} decode steps of one token "
          f"after a {len(prompt)}-token prompt")
    print(f"wall {result['wall_ms_per_token']:.2f} ms/token; nodes {result['node_ms_per_token']:.2f}; outside the "
          f"nodes {result['outside_nodes_ms_per_token']:.2f}; {result['nodes_per_token']:.0f} nodes executed per token; "
          f"weights read {b / 1e6:.1f} MB = {result['bound_ms_per_token']:.2f} ms at {bw:.1f} GB/s")
    print("| node type | nodes/token | ms/token | share of node time |\n|---|---:|---:|---:|")
    for r in result["by_type"][:15]:
        print(f"| {r['type']} | {r['nodes_per_token']:.0f} | {r['ms_per_token']:.3f} "
              f"| {r['ms_per_token'] / result['node_ms_per_token']:.0%} |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

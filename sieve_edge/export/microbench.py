"""Micro-benchmark: is a rank-r pair faster than its dense matrix on this runtime?

A pair costs r(m+n) weights instead of mn, but two matmuls instead of one, each with its
own overhead; at one token (decoding) the pair pays off only well below the parameter
break-even (DESIGN §5: OpenVINO int8, 1536x576, rank 256 was 0.84x). The search and the
export ask ``faster_than_dense(shape, rank, tokens, runtime)`` and keep a matrix dense where
the answer is no.

Each measurement times a graph of ``layers`` independent copies of the matrix (dense:
``Y = Σ X W_i``; pair: ``Y = Σ (X A_i) B_i``, random weights) so that the weights stream from
memory as they do in a real model instead of sitting in cache. The graph is built once as
ONNX and run by onnxruntime (int8: 8-bit ``MatMulNBits``) and by OpenVINO (f32 hint; int8:
NNCF int8_asym). Results are cached in a JSON file keyed by CPU, runtime, weights, threads,
shape, rank and tokens.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RUNTIMES = ("onnxruntime", "openvino")
WEIGHTS = ("fp32", "int8")
TOKENS = (1, 20, 80)
# Enough copies that the dense weights (fp32) exceed the last-level cache: ~48 MB, at most 24.
TARGET_BYTES = 48 * 2**20
MAX_LAYERS = 24
REPEATS = 15
WARMUP = 3


def default_cache() -> Path:
    from ..outputs import cache_dir

    return cache_dir() / "microbench.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _threads(threads: int | None) -> int:
    return int(threads or os.cpu_count() or 1)


def _key(runtime, weights, threads, shape, rank, tokens) -> str:
    m, n = shape
    return f"{cpu_name()}|{runtime}|{weights}|t{threads}|{m}x{n}|r{rank}|tok{tokens}"


def _layers(shape) -> int:
    m, n = shape
    return max(2, min(MAX_LAYERS, TARGET_BYTES // (4 * m * n)))


def build_graph(shape: tuple[int, int], rank: int | None, layers: int, seed: int = 0):
    """ONNX model: X (T, in) → Σ_i X W_i (dense, rank None) or Σ_i (X A_i) B_i; W (in, out)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m, n = shape  # (out, in)
    rng = np.random.default_rng(seed)
    inits, nodes, outs = [], [], []
    for i in range(layers):
        if rank is None:
            w = (rng.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"]))
        else:
            a = (rng.standard_normal((n, rank)) / np.sqrt(n)).astype(np.float32)
            b = (rng.standard_normal((rank, m)) / np.sqrt(rank)).astype(np.float32)
            inits += [numpy_helper.from_array(a, f"A{i}"), numpy_helper.from_array(b, f"B{i}")]
            nodes += [helper.make_node("MatMul", ["X", f"A{i}"], [f"H{i}"]),
                      helper.make_node("MatMul", [f"H{i}", f"B{i}"], [f"Y{i}"])]
        outs.append(f"Y{i}")
    acc = outs[0]
    for i, y in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [acc, y], [f"S{i}"]))
        acc = f"S{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", n])],
        [helper.make_tensor_value_info(acc, TensorProto.FLOAT, ["T", m])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ort_runner(path: Path, weights: str, threads: int, tmp: Path):
    import onnxruntime as ort

    if weights == "int8":
        from .onnx import quantize

        q = tmp / (path.stem + ".int8.onnx")
        quantize(path, q, "nbits8")
        path = q
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"X": x})


def _ov_runner(path: Path, weights: str, threads: int, tmp: Path, precision: str = "f32",
               dynamic_quantization: bool | None = None):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if weights == "int8":
        import logging

        import nncf

        logging.getLogger("nncf").setLevel(logging.WARNING)  # its per-graph statistics table is noise here
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
              "PERFORMANCE_HINT": "LATENCY"}
    if dynamic_quantization is False:   # as the bundle's runner sets it (runtime._OvModel)
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({"X": x})


def _time(run, x, repeats: int) -> float:
    for _ in range(WARMUP):
        run(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3 / 1.0


def _check_case(runtime: str, weights: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}'; allowed: {', '.join(RUNTIMES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights '{weights}'; allowed: {', '.join(WEIGHTS)}")


def measure(shape: tuple[int, int], rank: int, tokens_list=TOKENS, runtime: str = "openvino",
            weights: str = "int8", threads: int | None = None, repeats: int = REPEATS) -> list[dict]:
    """Median ms per matrix, dense vs pair, for each token count (one graph build per case)."""
    import numpy as np

    _check_case(runtime, weights)
    threads = _threads(threads)
    layers = _layers(shape)
    make = _ort_runner if runtime == "onnxruntime" else _ov_runner
    rows = []
    with tempfile.TemporaryDirectory(prefix="sieve-mb-") as tmp:
        tmp = Path(tmp)
        runners = {}
        for kind, r in (("dense", None), ("pair", rank)):
            import onnx

            path = tmp / f"{kind}.onnx"
            onnx.save_model(build_graph(shape, r, layers), str(path))
            runners[kind] = make(path, weights, threads, tmp)
        rng = np.random.default_rng(1)
        for tokens in tokens_list:
            x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
            dense = _time(runners["dense"], x, repeats) / layers
            pair = _time(runners["pair"], x, repeats) / layers
            rows.append({
                "runtime": runtime, "weights": weights, "threads": threads, "shape": list(shape),
                "rank": rank, "tokens": tokens, "dense_ms": dense, "pair_ms": pair,
                "speedup": dense / pair, "param_fraction": rank * sum(shape) / (shape[0] * shape[1]),
                "layers": layers, "repeats": repeats,
            })
    return rows


class Cache:
    """JSON file of measurements; a missing or unreadable file is an empty cache."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_cache()
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, runtime, weights, threads, shape, rank, tokens):
        return self.data.get(_key(runtime, weights, threads, shape, rank, tokens))

    def put(self, row: dict) -> None:
        key = _key(row["runtime"], row["weights"], row["threads"], tuple(row["shape"]), row["rank"], row["tokens"])
        self.data[key] = row

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------- single MatMuls
#
# The time objective of the search (``search.objectives``) composes a plan's time out of
# single weight MatMuls: a dense matrix is one (T, in) @ (in, out), a pair is two, and a
# fused group (q/k/v, gate/up: ``export.fuse``) is one over the concatenated rows plus one
# per factorized member. Each (out, in) is timed as a graph of ``layers`` copies, like the
# dense half of ``measure``, compiled once and run at every requested token count.


def runtime_version(runtime: str) -> str:
    """The installed runtime's version: a cached time is only valid for the kernels that made it."""
    try:
        if runtime == "onnxruntime":
            import onnxruntime

            return onnxruntime.__version__
        import openvino

        return openvino.get_version()
    except ImportError:
        return "not installed"


def _mm_key(runtime, version, weights, threads, precision, dynamic_quantization, out, inp, tokens) -> str:
    dq = {None: "", False: "|dq0", True: "|dq1"}[dynamic_quantization]
    return f"mm|{cpu_name()}|{runtime} {version}|{weights}|t{threads}|{precision}{dq}|{out}x{inp}|tok{tokens}"


def matmul_times(points, tokens_list, runtime: str = "openvino", weights: str = "int8", threads: int | None = None,
                 precision: str = "f32", dynamic_quantization: bool | None = False, cache=None,
                 repeats: int = REPEATS, on_measured=None) -> dict[tuple[int, int, int], float]:
    """Median ms of one (T, in) @ (in, out) weight MatMul for every (out, in) in ``points`` and T
    in ``tokens_list``: ``{(out, in, T): ms}``. Cached per CPU, runtime and its version, weights,
    threads, precision hint and dynamic quantization (in ``cache``, default ``default_cache()``);
    only what is missing is measured, and the cache is saved after every point, so an
    interrupted build keeps what it measured. ``on_measured(i, n, (out, in))`` reports progress."""
    import numpy as np
    import onnx

    _check_case(runtime, weights)
    threads = _threads(threads)
    version = runtime_version(runtime)
    dq = None if runtime == "onnxruntime" else dynamic_quantization
    store = cache if isinstance(cache, Cache) else Cache(cache)
    tokens_list = sorted({int(t) for t in tokens_list})
    points = sorted({(int(o), int(i)) for o, i in points})

    def key(o, i, t):
        return _mm_key(runtime, version, weights, threads, precision, dq, o, i, t)

    todo = [(o, i) for o, i in points if any(key(o, i, t) not in store.data for t in tokens_list)]
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="sieve-mm-") as tmp:
        tmp = Path(tmp)
        for done, (o, i) in enumerate(todo):
            layers = _layers((o, i))
            path = tmp / f"mm{o}x{i}.onnx"
            onnx.save_model(build_graph((o, i), None, layers), str(path))
            run = (_ort_runner(path, weights, threads, tmp) if runtime == "onnxruntime" else
                   _ov_runner(path, weights, threads, tmp, precision, dq))
            for t in tokens_list:
                x = rng.standard_normal((t, i)).astype(np.float32)
                store.data[key(o, i, t)] = {"ms": _time(run, x, repeats) / layers, "layers": layers,
                                            "repeats": repeats}
            del run
            store.save()
            if on_measured is not None:
                on_measured(done + 1, len(todo), (o, i))
    return {(o, i, t): store.data[key(o, i, t)]["ms"] for o, i in points for t in tokens_list}


def lookup(shape, rank, tokens, runtime="openvino", weights="int8", threads=None, cache=None,
           repeats: int = REPEATS) -> dict:
    """The cached measurement, or measure every token count of ``TOKENS`` once and cache them."""
    threads = _threads(threads)
    shape = (int(shape[0]), int(shape[1]))
    store = cache if isinstance(cache, Cache) else Cache(cache)
    row = store.get(runtime, weights, threads, shape, rank, tokens)
    if row is None:
        wanted = sorted(set(TOKENS) | {tokens})
        for r in measure(shape, rank, wanted, runtime, weights, threads, repeats):
            store.put(r)
        store.save()
        row = store.get(runtime, weights, threads, shape, rank, tokens)
    return row


def faster_than_dense(shape, rank, tokens, runtime="openvino", weights="int8", threads=None, cache=None,
                      margin: float = 1.0) -> bool:
    """True when the rank-``rank`` pair of a (out, in) ``shape`` matrix beats the dense one by
    more than ``margin`` (a speed-up ratio) at ``tokens`` tokens per forward pass."""
    if rank * (shape[0] + shape[1]) >= shape[0] * shape[1]:
        return False  # above the parameter break-even it never is
    return lookup(shape, rank, tokens, runtime, weights, threads, cache)["speedup"] > margin


def table(shapes, ranks, tokens=TOKENS, runtimes=RUNTIMES, weights=WEIGHTS, threads=None, cache=None,
          repeats: int = REPEATS) -> list[dict]:
    """Every (runtime, weights, shape, rank, tokens) row, measured or from the cache."""
    store = cache if isinstance(cache, Cache) else Cache(cache)
    rows = []
    for runtime in runtimes:
        for w in weights:
            for shape in shapes:
                for rank in ranks:
                    for t in tokens:
                        rows.append(lookup(shape, rank, t, runtime, w, threads, store, repeats))
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'runtime':<12}{'weights':<8}{'shape':<12}{'rank':>6}{'params':>8}{'tokens':>7}{'dense ms':>10}{'pair ms':>10}{'speedup':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['runtime']:<12}{r['weights']:<8}{shape:<12}{r['rank']:>6}{r['param_fraction']:>8.0%}"
                     f"{r['tokens']:>7}{r['dense_ms']:>10.3f}{r['pair_ms']:>10.3f}{r['speedup']:>8.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sieve_edge.export.microbench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", default=None, help="OUTxIN, repeatable (default 1536x576)")
    p.add_argument("--ranks", default="64,128,192,256")
    p.add_argument("--tokens", default="1,20,80")
    p.add_argument("--runtime", action="append", choices=RUNTIMES)
    p.add_argument("--weights", action="append", choices=WEIGHTS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--cache", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (a.shape or ["1536x576"])]
    rows = table(shapes, [int(r) for r in a.ranks.split(",")], [int(t) for t in a.tokens.split(",")],
                 a.runtime or RUNTIMES, a.weights or WEIGHTS, a.threads, a.cache, a.repeats)
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

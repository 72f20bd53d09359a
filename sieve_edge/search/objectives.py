"""Objectives (what a candidate gains) and the per-shape cost tables of the latency objective."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .config import SearchConfig, write_json_atomic


class ParamObjective:
    """Gain = fraction of the registry matrices' parameters removed."""

    name = "params"

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self.shapes = shapes
        self.dense = sum(m * n for m, n in shapes.values())

    def gain(self, ranks: dict[str, int | None]) -> float:
        kept = sum(m * n if ranks.get(k) is None else ranks[k] * (m + n) for k, (m, n) in self.shapes.items())
        return 1.0 - kept / self.dense

    def usable(self, name: str, rank: int | None) -> bool:
        return True


class LatencyObjective:
    """Gain = fraction of the registry matrices' time removed, from a per-shape cost table.

    ``usable`` is False for a rank whose pair is not faster than the dense matrix: such a
    level is snapped to dense, so the search never chooses a rank slower than dense.
    """

    name = "latency"

    def __init__(self, shapes: dict[str, tuple[int, int]], table: "CostTable"):
        self.shapes, self.table = shapes, table
        self.dense = sum(table.time(s, None) for s in shapes.values())

    def gain(self, ranks: dict[str, int | None]) -> float:
        spent = sum(self.table.time(s, ranks.get(k) if self.usable(k, ranks.get(k)) else None)
                    for k, s in self.shapes.items())
        return 1.0 - spent / self.dense

    def usable(self, name: str, rank: int | None) -> bool:
        return rank is None or self.table.faster(self.shapes[name], rank)


class CostTable:
    """Seconds per call of a dense (m, n) matrix or its rank-r pair at ``tokens`` tokens.

    Uses the export micro-benchmarks for a target runtime when they are installed
    (``sieve_edge.export.microbench``); otherwise measures torch matmuls on this CPU
    (median of repeats, cached in a JSON file keyed by shape, rank and tokens).
    """

    def __init__(self, tokens: int, runtime: str = "torch", cache: Path | None = None, threads: int | None = None):
        self.tokens, self.runtime, self.cache, self.threads = tokens, runtime, cache, threads
        self.entries: dict[str, float] = {}
        if cache is not None and cache.is_file():
            try:
                self.entries = json.loads(cache.read_text())
            except json.JSONDecodeError:
                self.entries = {}

    @staticmethod
    def _key(shape, rank, tokens) -> str:
        return f"{shape[0]}x{shape[1]}:{'dense' if rank is None else rank}:{tokens}"

    def measure(self, shapes_ranks: dict[tuple[int, int], set[int]]) -> None:
        todo = [(s, r) for s, ranks in shapes_ranks.items() for r in [None, *sorted(ranks)]
                if self._key(s, r, self.tokens) not in self.entries]
        if not todo:
            return
        for shape, rank in todo:
            self.entries[self._key(shape, rank, self.tokens)] = _time_matmul(shape, rank, self.tokens, self.threads)
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.cache, self.entries)

    def time(self, shape, rank) -> float:
        k = self._key(shape, rank, self.tokens)
        if k not in self.entries:
            self.measure({tuple(shape): set() if rank is None else {rank}})
        return self.entries[k]

    def faster(self, shape, rank) -> bool:
        return self.time(shape, rank) < self.time(shape, None)


def _time_matmul(shape, rank, tokens, threads, repeats: int = 7, inner: int = 20) -> float:
    import torch

    m, n = shape
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, n, generator=g)
        if rank is None:
            w = torch.randn(m, n, generator=g)
            fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        else:
            a, b = torch.randn(rank, n, generator=g), torch.randn(m, rank, generator=g)
            fn = lambda: torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)  # noqa: E731
        with torch.no_grad():
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
        times.sort()
        return times[len(times) // 2]
    finally:
        torch.set_num_threads(old)


def make_cost_table(config: SearchConfig, shapes_ranks: dict[tuple[int, int], set[int]], log=None) -> "CostTable":
    """The target's runtime micro-benchmarks with ``--target``; torch matmuls on this CPU without."""
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sieve-edge" / "cost-tables"
    if config.target is None:
        table = CostTable(config.latency_tokens, "torch", cache_root / "torch.json")
        where = "torch matmuls on this CPU (no --target)"
    else:
        from ..targets import load_profile

        profile = load_profile(config.target)
        weights = "int8" if profile.weights == "int4" else profile.weights  # int4: int8 timings as a proxy
        table = MicrobenchTable(config.latency_tokens, profile.runtime, weights, profile.threads)
        where = f"{profile.runtime} {weights} micro-benchmarks, {profile.threads} thread(s) (target {profile.name})"
    if log:
        log(f"latency objective: cost table from {where} at {config.latency_tokens} tokens "
            f"({sum(len(r) for r in shapes_ranks.values())} shape x rank cases, cached after the first run)")
    table.measure(shapes_ranks)
    return table


class MicrobenchTable(CostTable):
    """``sieve_edge.export.microbench`` (ONNX / OpenVINO graphs, cached per CPU) as a CostTable.

    Pair and dense times come from the same measurement row, so ``faster`` is exactly the
    export's ``faster_than_dense`` verdict.
    """

    def __init__(self, tokens: int, runtime: str, weights: str, threads: int | None):
        super().__init__(tokens, runtime, None, threads)
        self.weights = weights
        self.speedup: dict[str, float] = {}

    def measure(self, shapes_ranks) -> None:
        from ..export import microbench

        for shape, ranks in shapes_ranks.items():
            m, n = shape
            dense = []
            for r in sorted(ranks):
                k = self._key(shape, r, self.tokens)
                if k in self.entries:
                    continue
                if r * (m + n) >= m * n:
                    self.entries[k], self.speedup[k] = math.inf, 0.0
                    continue
                row = microbench.lookup(shape, r, self.tokens, self.runtime, self.weights, self.threads)
                self.entries[k], self.speedup[k] = row["pair_ms"], row["speedup"]
                dense.append(row["dense_ms"])
            dense_key = self._key(shape, None, self.tokens)
            if not dense and dense_key not in self.entries:  # no usable pair: time dense beside a rank-8 one
                dense.append(microbench.lookup(shape, 8, self.tokens, self.runtime, self.weights,
                                               self.threads)["dense_ms"])
            if dense:  # the dense matrix was timed beside every pair: take the median
                self.entries[dense_key] = sorted(dense)[len(dense) // 2]

    def faster(self, shape, rank) -> bool:
        k = self._key(shape, rank, self.tokens)
        if k not in self.speedup:
            self.measure({tuple(shape): {rank}})
        return self.speedup[k] > 1.0


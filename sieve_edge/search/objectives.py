"""Objectives (what a candidate gains): parameters removed, or time per example removed.

The time objective prices a plan in milliseconds per example on the target: one prompt pass
over the workload's ``prompt_tokens`` plus one decode step (one token) for every new token
after the first (the prompt pass yields the first). Only the registry matrices are priced;
attention, norms, embeddings and the head cost every plan the same.

A plan's time is composed from single weight MatMuls, as the exported graph runs them
(``export.fuse``): a dense matrix is one (T, in) @ (in, out); a rank-r pair is two, (in → r)
then (r → out); a group that reads one input (q/k/v, gate/up) is ONE MatMul over the
concatenated rows of its dense members and its first factors, plus one second-factor MatMul
per factorized member. A ``MatmulTable`` gives the milliseconds of one MatMul by (out, in,
tokens): measured on the target's runtime, weights, threads and precision
(``export.microbench.matmul_times``, cached on disk), or torch matmuls on this CPU without a
target. Fused widths (sums of member widths) are interpolated linearly between the widths
measured for that input size; the grid includes every dense group width.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..stages import write_json_atomic
from .config import SearchConfig


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


# ---------------------------------------------------------------- MatMul tables

class MatmulTable:
    """Milliseconds of one weight MatMul (T, in) @ (in, out), by (out, in, T).

    ``entries`` holds measured points; ``ms`` interpolates linearly in ``out`` between the
    nearest measured widths of the same (in, T) (extrapolating from the last two beyond
    them), so a fused group's width need not have been measured itself, or else in ``in``
    between the measured input sizes of the same (out, T). ``prepare`` fills in missing
    points; this base class has no way to measure (a fixed table, e.g. in tests).
    """

    where = "a fixed table"

    def __init__(self, entries: dict[tuple[int, int, int], float] | None = None):
        self.entries: dict[tuple[int, int, int], float] = dict(entries or {})

    def prepare(self, points: Iterable[tuple[int, int]], tokens: Iterable[int], log=None) -> None:
        """Make sure every (out, in) of ``points`` is known at every T of ``tokens``."""

    def ms(self, out: int, inp: int, tokens: int) -> float:
        k = (int(out), int(inp), int(tokens))
        if k in self.entries:
            return self.entries[k]
        # a fused width: along the widths measured for this input size; a second factor of a
        # rank off the ladder (the uniform strategy's grid): along the input sizes of this width
        by_out = sorted((o, v) for (o, i, t), v in self.entries.items() if i == inp and t == tokens)
        by_in = sorted((i, v) for (o, i, t), v in self.entries.items() if o == out and t == tokens)
        if len(by_out) >= 2:
            return _interpolate(by_out, out)
        if len(by_in) >= 2:
            return _interpolate(by_in, inp)
        self.prepare([(out, inp)], [tokens])
        if k in self.entries:
            return self.entries[k]
        raise KeyError(f"no MatMul time for {out}x{inp} (out x in) at {tokens} token(s) in {self.where}")


def _interpolate(row: list[tuple[int, float]], x: int) -> float:
    """Piecewise linear through the (size, ms) points of ``row`` (sorted), extended by the
    slope of the two nearest points beyond them; never below zero."""
    lo = max((p for p in row if p[0] <= x), default=row[0], key=lambda p: p[0])
    hi = min((p for p in row if p[0] >= x), default=row[-1], key=lambda p: p[0])
    if lo[0] == hi[0]:
        if lo[0] == x:
            return lo[1]
        lo, hi = (row[0], row[1]) if x < row[0][0] else (row[-2], row[-1])
    return max(lo[1] + (hi[1] - lo[1]) * (x - lo[0]) / (hi[0] - lo[0]), 0.0)


class RuntimeMatmulTable(MatmulTable):
    """The target's runtime (onnxruntime or OpenVINO), weights, threads and precision:
    ``export.microbench.matmul_times``, cached in the micro-benchmark cache file."""

    def __init__(self, runtime: str, weights: str, threads: int, precision: str = "f32",
                 dynamic_quantization: bool = False, cache: Path | None = None):
        super().__init__()
        self.runtime, self.weights, self.threads = runtime, weights, threads
        self.precision, self.dynamic_quantization, self.cache = precision, dynamic_quantization, cache
        self.where = f"{runtime} {weights} MatMuls, {threads} thread(s)"

    def prepare(self, points, tokens, log=None) -> None:
        from ..export import microbench

        points, tokens = sorted(set(points)), sorted(set(tokens))
        todo = [p for p in points if any((p[0], p[1], t) not in self.entries for t in tokens)]
        if not todo:
            return
        t0 = time.perf_counter()

        def progress(i, n, point):
            if log and (i == n or i % 10 == 0):
                log(f"cost table: {i}/{n} MatMul shapes timed ({time.perf_counter() - t0:.0f} s)")

        got = microbench.matmul_times(todo, tokens, self.runtime, self.weights, self.threads, self.precision,
                                      self.dynamic_quantization, cache=self.cache, on_measured=progress)
        self.entries.update(got)


class TorchMatmulTable(MatmulTable):
    """torch matmuls on this CPU (median of 7 x 20 calls), cached in a JSON file keyed by
    torch version, threads, (out, in) and tokens."""

    def __init__(self, cache: Path | None = None, threads: int | None = None):
        super().__init__()
        self.cache, self.threads = cache, threads
        self.where = "torch fp32 MatMuls on this CPU"
        self.saved: dict[str, float] = {}
        if cache is not None and cache.is_file():
            try:
                self.saved = json.loads(cache.read_text())
            except json.JSONDecodeError:
                self.saved = {}

    def _key(self, out, inp, tokens) -> str:
        import torch

        return f"torch {torch.__version__}|t{self.threads or torch.get_num_threads()}|{out}x{inp}|tok{tokens}"

    def prepare(self, points, tokens, log=None) -> None:
        changed = False
        for out, inp in sorted(set(points)):
            for t in sorted(set(tokens)):
                k = self._key(out, inp, t)
                if k not in self.saved:
                    self.saved[k] = _time_matmul(out, inp, t, self.threads)
                    changed = True
                self.entries[(out, inp, t)] = self.saved[k]
        if changed and self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.cache, self.saved)


def _time_matmul(out: int, inp: int, tokens: int, threads: int | None, repeats: int = 7, inner: int = 20) -> float:
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(tokens, inp, generator=g), torch.randn(out, inp, generator=g)
        with torch.no_grad():
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    torch.nn.functional.linear(x, w)
                times.append((time.perf_counter() - t0) / inner)
        times.sort()
        return times[len(times) // 2] * 1e3
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- the time objective

@dataclass(frozen=True)
class _Unit:
    """Matrices whose first MatMul is one node of the exported graph (one, or a fused group)."""

    names: tuple[str, ...]
    inp: int
    outs: tuple[int, ...]

    @property
    def fused(self) -> bool:
        return len(self.names) > 1


class TimeObjective:
    """Gain = fraction of the registry matrices' milliseconds per example removed.

    ``groups``: lists of matrix names that read one input (``architectures.linear_groups``);
    a group of two or more runs fused, as the export does. ``usable(name, rank)`` is False
    for a rank whose pair (with the rest of its group dense) does not make an example faster
    than the dense matrix does, or that does not save parameters: the ladder snaps such a
    level to dense, so the search never offers a rank slower than dense at this workload.
    """

    name = "time"

    def __init__(self, shapes: dict[str, tuple[int, int]], table: MatmulTable, prompt_tokens: int,
                 new_tokens: int = 1, groups: Iterable[Iterable[str]] = ()):
        if prompt_tokens < 1 or new_tokens < 1:
            raise ValueError(f"prompt_tokens and new_tokens must be >= 1, got {prompt_tokens}, {new_tokens}")
        self.shapes, self.table = dict(shapes), table
        self.prompt_tokens, self.new_tokens = int(prompt_tokens), int(new_tokens)
        self.units: list[_Unit] = []
        grouped: set[str] = set()
        for group in groups:
            group = [n for n in group if n in self.shapes]
            ins = {self.shapes[n][1] for n in group}
            if len(group) >= 2 and len(ins) == 1:
                self.units.append(_Unit(tuple(group), ins.pop(), tuple(self.shapes[n][0] for n in group)))
                grouped.update(group)
        for name, (m, n) in self.shapes.items():
            if name not in grouped:
                self.units.append(_Unit((name,), n, (m,)))
        self._usable: dict[tuple[str, int], bool] = {}
        self._dense: float | None = None

    # -- what to measure
    def points(self, candidate_ranks: dict[str, Iterable[int | None]]) -> set[tuple[int, int]]:
        """Every (out, in) MatMul the plans over ``candidate_ranks`` (name -> ranks) may run,
        plus a grid of widths for the fused groups (interpolated in between)."""
        pts: set[tuple[int, int]] = set()
        for unit in self.units:
            widest = 0
            for name, out in zip(unit.names, unit.outs):
                pts.add((out, unit.inp))
                widest += out
                for r in candidate_ranks.get(name, ()):
                    if r is not None and self._saves(name, r):
                        pts.add((r, unit.inp))
                        pts.add((out, r))
            if unit.fused:
                pts.add((widest, unit.inp))
                w = max(unit.outs)
                while w * 1.5 < widest:  # every 1.5x between the widest member and the whole group
                    w = max(int(w * 1.5) // 8 * 8, w + 8)
                    pts.add((w, unit.inp))
        return pts

    # -- prices
    def _saves(self, name: str, rank: int) -> bool:
        m, n = self.shapes[name]
        return 0 < rank and rank * (m + n) < m * n

    def _unit_ms(self, unit: _Unit, ranks: dict[str, int | None], tokens: int) -> float:
        ms = self.table.ms
        if not unit.fused:
            (name,), (m,) = unit.names, unit.outs
            r = ranks.get(name)
            return ms(m, unit.inp, tokens) if r is None else ms(r, unit.inp, tokens) + ms(m, r, tokens)
        width, seconds = 0, 0.0
        for name, m in zip(unit.names, unit.outs):
            r = ranks.get(name)
            width += m if r is None else r
            if r is not None:
                seconds += ms(m, r, tokens)
        return ms(width, unit.inp, tokens) + seconds

    def breakdown(self, ranks: dict[str, int | None]) -> dict:
        """{prompt_ms, token_ms, example_ms} of the registry matrices under ``ranks`` (the
        ranks as given: the caller snaps unusable ones)."""
        prompt = sum(self._unit_ms(u, ranks, self.prompt_tokens) for u in self.units)
        token = sum(self._unit_ms(u, ranks, 1) for u in self.units)
        return {"prompt_ms": prompt, "token_ms": token, "example_ms": prompt + (self.new_tokens - 1) * token}

    def example_ms(self, ranks: dict[str, int | None]) -> float:
        snapped = {k: r for k, r in ranks.items() if r is not None and self.usable(k, r)}
        return self.breakdown(snapped)["example_ms"]

    @property
    def dense_ms(self) -> float:
        if self._dense is None:
            self._dense = self.breakdown({})["example_ms"]
        return self._dense

    def gain(self, ranks: dict[str, int | None]) -> float:
        return 1.0 - self.example_ms(ranks) / self.dense_ms

    def usable(self, name: str, rank: int | None) -> bool:
        if rank is None:
            return True
        k = (name, int(rank))
        if k not in self._usable:
            self._usable[k] = self._saves(name, rank) and \
                self.breakdown({name: rank})["example_ms"] < self.dense_ms
        return self._usable[k]

    def describe(self) -> dict:
        """The workload and the table, for the reports."""
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "cost_table": self.table.where, "fused_groups": sum(u.fused for u in self.units)}


LatencyObjective = TimeObjective  # the objective's earlier name


def cost_table_cache() -> Path:
    from ..outputs import cache_dir

    return cache_dir() / "cost-tables"


def make_matmul_table(config: SearchConfig, profile=None) -> MatmulTable:
    """The target's runtime MatMuls with a profile; torch matmuls on this CPU without."""
    if profile is None:
        return TorchMatmulTable(cost_table_cache() / "torch.json")
    weights = "int8" if profile.weights == "int4" else profile.weights  # int4: int8 timings as a proxy
    table = RuntimeMatmulTable(profile.runtime, weights, profile.threads, profile.inference_precision,
                               profile.dynamic_quantization)
    table.where += f" (target {profile.name})" + (" (int8 timings for its int4 weights)" if weights != profile.weights
                                                  else "")
    return table


def check_time_target(profile) -> None:
    """The time objective measures the target's runtime here: refuse a target of another CPU."""
    from ..errors import InputError
    from ..validate import host_arch

    host = host_arch()
    if profile.arch not in ("any", host):
        raise InputError(f"target '{profile.name}' is for {profile.arch} CPUs and this host is {host}: the time "
                         "objective times the target's runtime here, which would price another CPU's kernels; "
                         "use --objective params for it (or search on a host of that architecture)")
    if profile.device != "cpu":
        raise InputError(f"target '{profile.name}' runs on device '{profile.device}': the time objective times CPU "
                         "kernels only; use --objective params for it")


def workload_of(config: SearchConfig, task=None, profile=None) -> tuple[int, int]:
    """(prompt tokens, new tokens) of one example: the target's [workload], else a prompt of
    ``config.latency_tokens`` tokens; a classification or perplexity task generates 1 token."""
    from ..targets import Workload

    workload = profile.workload if profile is not None else Workload(prompt_tokens=config.latency_tokens)
    if task is None:
        return workload.prompt_tokens, 1
    return workload.for_task(task)


def make_time_objective(config: SearchConfig, shapes: dict[str, tuple[int, int]], groups=(), task=None,
                        candidate_ranks: dict[str, Iterable[int | None]] | None = None,
                        log: Callable[[str], None] | None = None, table: MatmulTable | None = None) -> TimeObjective:
    """The time objective of ``config`` (its target's runtime and workload), its table measured
    for every rank of ``candidate_ranks`` (name -> ranks) at the prompt length and at one token."""
    from ..targets import load_profile

    profile = None
    if config.target is not None:
        profile = load_profile(config.target)
        check_time_target(profile)
    prompt, new = workload_of(config, task, profile)
    table = table or make_matmul_table(config, profile)
    objective = TimeObjective(shapes, table, prompt, new, groups)
    points = objective.points(candidate_ranks or {})
    tokens = {prompt, 1}  # one token also for a classification: the report shows its decode step
    if log:
        log(f"time objective: {prompt} prompt tokens + {new - 1} decode step(s) per example, cost table from "
            f"{table.where}: {len(points)} MatMul shapes x {len(tokens)} token count(s) (cached after the first run)")
    t0 = time.perf_counter()
    table.prepare(points, tokens, log)
    if log and time.perf_counter() - t0 > 1.0:
        log(f"time objective: cost table ready in {time.perf_counter() - t0:.0f} s")
    return objective


def plan_times(objective, ranks: dict[str, int | None]) -> dict | None:
    """For the reports: the dense model's and the plan's ms per example (None for params)."""
    if not isinstance(objective, TimeObjective):
        return None
    dense = objective.breakdown({})
    plan = objective.breakdown({k: r for k, r in ranks.items() if r is not None})
    return {**objective.describe(), "dense": dense, "plan": plan,
            "saved": 1.0 - plan["example_ms"] / dense["example_ms"] if dense["example_ms"] > 0 else 0.0}


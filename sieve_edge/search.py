"""Search: a keep level per matrix under an accuracy tolerance (LLM-Sieve's genetic algorithm).

``search_plan`` is the in-memory search (model, task → ``RankPlan``); it touches no file but
its own resumable state. ``run_search`` is the stage: load, search, refit the chosen plan
with the sequential ``sieve`` method, heal if asked, score the test split, and write the
output folder (checkpoint + plan + history + report + plots).

Why it is affordable on 2 CPU cores (DESIGN §3):
- every matrix is decomposed once (``output`` projection on the task's activations) and
  wrapped in a ``SearchLinear``: a candidate plan is a dict of ranks set in place, and its
  evaluation is one batched label-likelihood pass over a pre-tokenized validation split;
- racing: a candidate first runs on a small subset of the validation split and goes on to
  the rest only if a one-sided paired test cannot already reject it;
- ranking among equal metrics uses a smooth proxy, the KL divergence of the label
  distribution from the dense model's;
- the population is seeded from the spectrum (``Decomposition.error``: the calibration
  output error each level leaves, free) by bisecting a per-matrix error budget, plus the
  best uniform level, so the GA starts at least as good as the uniform baseline.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .errors import ArtifactError, BudgetError, InputError, TaskSpecError
from .ga import Evaluation, GAConfig, GeneticSearch, Genome, key, unkey

STATE_FORMAT = "sieve-edge/search-state"
STATE_VERSION = 1
DEFAULT_LADDER = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
STRATEGIES = ("ga", "uniform")
OBJECTIVES = ("params", "latency")
WEIGHTS = ("fp32", "int8")  # int8: candidates scored with simulated int8 weights (NNCF INT8_ASYM)
UNIFORM_STEP = 0.025  # keep resolution of the uniform bisection


class _BudgetSpent(Exception):
    """No time is left to score the next GA candidate: the generation in progress is dropped."""


@dataclass(frozen=True)
class SearchConfig:
    """Every setting that changes the result; it is fingerprinted into the resumable state."""

    tolerance: float = 0.01          # metric drop allowed on the validation split
    relative: bool = False           # tolerance as a fraction of the dense metric
    method: str = "sieve"            # refit method of the final checkpoint
    strategy: str = "ga"             # ga | uniform
    objective: str = "params"        # params | latency
    target: str | None = None        # target profile for the latency objective
    seed: int = 0
    population: int = 16
    generations: int = 12
    ladder: tuple[float, ...] = DEFAULT_LADDER
    sensitivity_examples: int = 64  # validation examples for the task-sensitivity seeds; 0 = spectrum
    multiple: int = 8                # ranks rounded to this multiple (fast CPU kernels)
    n_calibration: int = 512         # calibration examples for the search decompositions and the refit
    calibration_batch: int = 16
    val_limit: int | None = 300      # validation examples scored per candidate
    race_size: int = 64              # racing subset; 0 = no racing
    race_z: float = 2.0              # one-sided z of the racing rejection test
    batch_size: int = 32
    latency_tokens: int = 20         # prompt length the latency cost table is measured at
    heal_steps: int = 0
    heal_lr: float = 1e-4
    weights: str = "fp32"            # precision candidates are scored in: int8 simulates the export's int8

    def __post_init__(self):
        if not (isinstance(self.tolerance, (int, float)) and 0.0 < self.tolerance < 1.0):
            raise BudgetError(f"tolerance must be in (0, 1) (0.01 = one point, or 1% with --relative), "
                              f"got {self.tolerance}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy '{self.strategy}' is not allowed; choose one of {', '.join(STRATEGIES)}")
        if self.weights not in WEIGHTS:
            raise InputError(f"weights '{self.weights}' is not allowed; choose one of {', '.join(WEIGHTS)}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective '{self.objective}' is not allowed; choose one of {', '.join(OBJECTIVES)}")
        from .lowrank import METHODS
        if self.method not in METHODS:
            raise InputError(f"method '{self.method}' is not allowed; choose one of {', '.join(METHODS)}")
        ladder = tuple(float(k) for k in self.ladder)
        if len(ladder) < 2 or ladder[0] != 1.0 or any(not 0.0 < k <= 1.0 for k in ladder) \
                or any(b >= a for a, b in zip(ladder, ladder[1:])):
            raise InputError(f"keep ladder must start at 1.0 and strictly decrease within (0, 1], got {self.ladder}")
        for name in ("population", "n_calibration", "calibration_batch", "batch_size", "latency_tokens", "multiple"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.generations < 0 or self.race_size < 0 or self.heal_steps < 0 or self.sensitivity_examples < 0:
            raise InputError("generations, race_size, heal_steps and sensitivity_examples must be >= 0")
        if self.val_limit is not None and self.val_limit < 1:
            raise InputError(f"val_limit must be >= 1 or None, got {self.val_limit}")

    def fingerprint(self) -> dict:
        """The settings a resumed search must share with the one that wrote the state."""
        d = asdict(self)
        for k in ("heal_steps", "heal_lr"):  # after the search: free to change on a rerun
            d.pop(k)
        d["ladder"] = list(self.ladder)
        return d


@dataclass
class SearchResult:
    plan: "object"                    # RankPlan
    strategy: str
    objective: str
    dense_metric: float
    metric: float                     # validation metric of the plan (search decompositions)
    gain: float                       # objective value of the plan
    tolerance_abs: float              # the tolerance in metric units
    evaluations: int
    full_evaluations: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)   # {gain, reduction, metric, feasible}
    levels: dict[str, float] = field(default_factory=dict)  # keep level per matrix
    sensitivity: dict[str, float] = field(default_factory=dict)  # spectrum error at keep 0.5
    task_sensitivity: dict[str, float] = field(default_factory=dict)  # label-Fisher KL at keep 0.5 (GA)
    dense_int8_metric: float | None = None  # validation metric of the dense model in simulated int8
    resumed_from: int | None = None   # generation a resumed search started from
    factors: dict = field(default_factory=dict, repr=False)  # name -> (B, A) the plan was scored with


# ---------------------------------------------------------------- state on disk

def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SearchState:
    """The resumable state file: settings fingerprint + per-strategy payload, written atomically."""

    def __init__(self, path: Path | None, fingerprint: dict):
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{self.path}: search state is not valid JSON ({e}); delete it to start over") from e
        if state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_VERSION:
            raise ArtifactError(f"{self.path}: not a sieve-edge search state (version {STATE_VERSION})")
        if state.get("fingerprint") != self.fingerprint:
            old, new = state.get("fingerprint") or {}, self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ArtifactError(
                f"{self.path}: a search with other settings ({', '.join(diff)}) left this state; "
                "rerun with the same settings to resume, or use --force / another --out to start over"
            )
        return state

    def save(self, payload: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.path, {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                                       "fingerprint": self.fingerprint, **payload})


# ---------------------------------------------------------------- objectives

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
            _atomic_write_json(self.cache, self.entries)

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
        from .targets import load_profile

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
        from .export import microbench

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


# ---------------------------------------------------------------- candidate evaluation

class CandidateEvaluator:
    """Scores rank dicts on the validation split with one model whose ranks switch in place.

    Holds the dense model's label log-probabilities as the reference for the smooth proxy
    (KL of label distributions) and for the racing test (paired per-example correctness).
    """

    def __init__(self, model, scorer, objective, tolerance_abs: float, race_size: int, race_z: float,
                 higher_is_better: bool = True):
        import torch

        self.torch = torch
        self.model, self.scorer, self.objective = model, scorer, objective
        self.tol = tolerance_abs
        self.z = race_z
        self.sign = 1.0 if higher_is_better else -1.0
        self.classification = hasattr(scorer, "label_logprobs") and getattr(scorer, "labels", None) is not None
        n = scorer.n
        self.all = torch.arange(n)
        self.race = None
        if self.classification and 0 < race_size < n:
            # a fixed, seed-free spread over the split (file order may be sorted by label)
            self.race = torch.linspace(0, n - 1, race_size).round().long().unique()
            mask = torch.ones(n, dtype=torch.bool)
            mask[self.race] = False
            self.rest = self.all[mask]
        self.n_evaluations = 0
        self.n_full = 0
        self.seconds = 0.0
        from .factorize import set_ranks_

        self._set_ranks = set_ranks_
        set_ranks_(model, {})
        t0 = time.perf_counter()
        if self.classification:
            self.ref_lp = self._logprobs(self.all)             # (N, L)
            self.labels = self._labels()
            self.dense_metric = self._metric(self.ref_lp, self.all)
        else:
            self.dense_metric = float(scorer.metric(model))
        self.dense_seconds = time.perf_counter() - t0

    # -- helpers
    def _labels(self):
        labels = self.scorer.labels
        return labels if isinstance(labels, self.torch.Tensor) else self.torch.tensor(list(labels))

    def _logprobs(self, subset):
        with self.torch.no_grad():
            lp = self.scorer.label_logprobs(self.model, subset=subset)
        return lp.double()

    def _metric(self, lp, subset) -> float:
        from .evaluate import accuracy_from_logprobs

        return accuracy_from_logprobs(lp, self.labels[subset])

    def _kl(self, lp, subset) -> float:
        # KL(dense || candidate) of label distributions renormalized over the labels
        p = self.torch.log_softmax(self.ref_lp[subset], -1)
        q = self.torch.log_softmax(lp, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    # -- the one entry point
    def __call__(self, ranks: dict[str, int | None]) -> Evaluation:
        t0 = time.perf_counter()
        self._set_ranks(self.model, ranks)
        gain = self.objective.gain(ranks)
        self.n_evaluations += 1
        try:
            if not self.classification:
                metric = float(self.scorer.metric(self.model))
                drop = self.sign * (self.dense_metric - metric)
                self.n_full += 1
                return Evaluation(gain, metric, drop, drop <= self.tol + 1e-12, 0.0, True, time.perf_counter() - t0)
            if self.race is not None:
                lp_race = self._logprobs(self.race)
                ok = (lp_race.argmax(-1) == self.labels[self.race]).double()
                ref = (self.ref_lp[self.race].argmax(-1) == self.labels[self.race]).double()
                d = ref - ok                                          # per-example paired drop
                mean = float(d.mean())
                se = float(d.std(unbiased=True)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
                if mean - self.z * se > self.tol:
                    sub_metric = float(ok.mean())
                    return Evaluation(gain, sub_metric, mean, False, self._kl(lp_race, self.race), False,
                                      time.perf_counter() - t0)
                lp_rest = self._logprobs(self.rest)
                lp = self.torch.empty_like(self.ref_lp)
                lp[self.race], lp[self.rest] = lp_race, lp_rest
            else:
                lp = self._logprobs(self.all)
            metric = self._metric(lp, self.all)
            drop = self.sign * (self.dense_metric - metric)
            self.n_full += 1
            return Evaluation(gain, metric, drop, drop <= self.tol + 1e-12, self._kl(lp, self.all), True,
                              time.perf_counter() - t0)
        finally:
            self.seconds += time.perf_counter() - t0


# ---------------------------------------------------------------- levels → ranks

class Ladder:
    """Per matrix, the rank of each ladder level (level 0 = dense); unusable ranks snap to dense."""

    def __init__(self, shapes: dict[str, tuple[int, int]], keeps: Sequence[float], multiple: int, objective):
        from .lowrank import rank_for_keep

        self.names = list(shapes)
        self.keeps = tuple(keeps)
        self.ranks: dict[str, list[int | None]] = {}
        for name, (m, n) in shapes.items():
            row = []
            for k in keeps:
                r = rank_for_keep(m, n, k, multiple)
                row.append(r if objective.usable(name, r) else None)
            self.ranks[name] = row

    def to_ranks(self, genome: Sequence[int]) -> dict[str, int | None]:
        return {name: self.ranks[name][g] for name, g in zip(self.names, genome)}

    def uniform(self, level: int) -> Genome:
        return (level,) * len(self.names)

    def max_rank(self, name: str) -> int | None:
        rs = [r for r in self.ranks[name] if r is not None]
        return max(rs) if rs else None


def bisect_largest(n: int, feasible: Callable[[int], bool]) -> int:
    """Largest i in [0, n) with feasible(i), assuming feasible is monotone (true then false)
    and feasible(0) holds. About log2(n) calls."""
    lo, hi = 0, n  # feasible(lo) known true; every i >= hi known false
    if n > 1 and feasible(n - 1):
        return n - 1
    hi = n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- the search

def _validate_task(task) -> None:
    if "validation" not in task.data:
        declared = ", ".join(s for s in ("train", "calibration", "validation", "test") if s in task.data) or "none"
        raise TaskSpecError(
            f"{task.path}: task '{task.name}' has no 'validation' split in [data] (declared: {declared}); "
            "search scores candidates on validation and keeps test unseen: add data.validation"
        )


def tolerance_in_units(config: SearchConfig, dense_metric: float) -> float:
    return config.tolerance * abs(dense_metric) if config.relative else config.tolerance


def search_plan(model, tokenizer, task, config: SearchConfig = SearchConfig(), *,
                budget_minutes: float | None = None, state_path: str | Path | None = None,
                log: Callable[[str], None] | None = None, progress: bool = False,
                decompositions: tuple[dict, int] | None = None) -> SearchResult:
    """Find a keep level per matrix: the largest objective gain within the tolerance.

    The model is modified during the search and restored (dense) before returning. With
    ``state_path`` the search checkpoints itself after every generation (or every
    uniform-bisection step) and a rerun with the same settings resumes from it.
    ``budget_minutes`` bounds the whole call (calibration included); a budget that cannot
    even cover the dense evaluation is a ``BudgetError`` naming the time it took.
    ``decompositions`` = (name -> Decomposition, calibration tokens) made by the caller with
    ``calibrate.decompose_all`` on the same calibration settings, deep enough for the ladder:
    several searches of one model and task (a benchmark) then decompose once.
    """
    from . import architectures as arch
    from .calibrate import decompose_all
    from .evaluate import make_scorer
    from .factorize import attach_search_, detach_search_, linear_shapes, simulate_int8_
    from .plan import RankPlan
    from .tasks import calibration_batches

    say = log or (lambda msg: None)
    _validate_task(task)
    if budget_minutes is not None and budget_minutes <= 0:
        raise BudgetError(f"budget must be > 0 minutes, got {budget_minutes}")
    shapes = linear_shapes(model)
    if config.objective == "latency":  # built before the clock starts: once per target, then cached
        from .lowrank import rank_for_keep
        wanted: dict[tuple[int, int], set[int]] = {}
        for m, n in shapes.values():
            rs = {rank_for_keep(m, n, k, config.multiple) for k in config.ladder}
            wanted.setdefault((m, n), set()).update(r for r in rs if r is not None)
        objective = LatencyObjective(shapes, make_cost_table(config, wanted, say))
    else:
        objective = ParamObjective(shapes)
    start = time.perf_counter()
    store = SearchState(state_path, config.fingerprint())
    saved = store.load()
    elapsed_before = float(saved["elapsed"]) if saved else 0.0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    budget = None if budget_minutes is None else budget_minutes * 60.0

    ladder = Ladder(shapes, config.ladder, config.multiple, objective)

    # Decompose each matrix once, only as deep as the ladder's largest rank needs.
    search_method = config.method if config.method in ("svd", "input-pca", "output") else "output"
    if decompositions is not None:
        decs, tokens = decompositions
        if set(decs) != set(shapes) or any(d.method != search_method for d in decs.values()):
            raise InputError(f"given decompositions must cover every matrix with method '{search_method}'")
        decs = dict(decs)  # the caller keeps its own; ours is dropped once attached
    else:
        say(f"search: calibrating on {config.n_calibration} {task.name} examples and decomposing "
            f"{len(shapes)} matrices ({search_method})")
        batches = None if search_method == "svd" else list(
            calibration_batches(task, tokenizer, config.n_calibration, config.calibration_batch))
        decs, tokens = decompose_all(model, batches, search_method,
                                     max_rank=lambda name, m, n: ladder.max_rank(name) or 1, progress=progress)
    sensitivity = _sensitivity(decs, shapes, config.multiple)
    # spectrum error of every matrix at every ladder level (monotone in the level): the seeds
    errors = {name: [0.0 if r is None else decs[name].error(r) for r in ladder.ranks[name]] for name in shapes}

    scorer = make_scorer(tokenizer, task, "validation", limit=config.val_limit, batch_size=config.batch_size)
    attach_search_(model, decs)
    del decs  # the SearchLinear modules hold their own float32 copies of the bases
    undo_int8 = None
    try:
        evaluator = CandidateEvaluator(model, scorer, objective, 0.0, config.race_size, config.race_z,
                                       higher_is_better=task.metric != "perplexity")
        tol_abs = tolerance_in_units(config, evaluator.dense_metric)
        evaluator.tol = tol_abs
        say(f"search: dense validation {task.metric} {evaluator.dense_metric:.4f} on {scorer.n} examples "
            f"({evaluator.dense_seconds:.1f} s per full evaluation); tolerance {tol_abs:.4f}")
        # The tolerance is against the float32 dense model (what the deployment gate compares
        # with); with int8 weights every candidate, dense included, is scored as int8.
        dense_ev = Evaluation(0.0, evaluator.dense_metric, 0.0, True, 0.0, True)
        if config.weights == "int8":
            undo_int8 = simulate_int8_(model)
            dense_ev = evaluator({})
            say(f"search: int8 weights alone (simulated): validation {task.metric} {dense_ev.metric:.4f}, drop "
                f"{dense_ev.drop:+.4f} ({'within' if dense_ev.feasible else 'BEYOND'} the tolerance)")
            if not dense_ev.feasible:
                say("search: no plan can meet the tolerance in int8: the search keeps looking for the least "
                    "harmful one, but expect the accuracy gate to fail; consider tuning first (--tune-steps), "
                    "fp32 weights, or a larger budget")
        if budget is not None and elapsed() > budget:
            raise BudgetError(
                f"budget of {budget_minutes:g} min is too small: calibration, decomposition and one evaluation "
                f"of the dense model alone took {elapsed():.0f} s; give at least "
                f"--budget-minutes {math.ceil(elapsed() / 60 * 10) / 10 + evaluator.dense_seconds / 60 * 4:.1f} "
                "(a search needs a few evaluations more)"
            )

        def out_of_budget(next_cost: float) -> bool:
            return budget is not None and elapsed() + next_cost > budget

        def progress_line(tag: str, gain: float | None, metric: float | None, evals: int) -> None:
            rem = "" if budget is None else f", budget left {max(budget - elapsed(), 0) / 60:.1f} min"
            g = "-" if gain is None else f"{100 * gain:.1f}%"
            mt = "-" if metric is None else f"{metric:.4f}"
            say(f"{tag}: best {objective.name} reduction {g}, {task.metric} {mt}, "
                f"{evals} evaluations, elapsed {elapsed() / 60:.1f} min{rem}")

        extra: dict = {}  # what the GA reports besides its result (task sensitivity)
        if config.strategy == "uniform":
            result = _uniform(config, shapes, objective, evaluator, store, saved, elapsed, out_of_budget,
                              progress_line, dense_ev)
        else:
            def seed_costs() -> tuple[dict[str, list[float]], str]:
                nonlocal undo_int8
                # The task's own sensitivity where it can be measured (single-token labels), else
                # the spectrum error. Only needed for the initial population (not on resume).
                if config.sensitivity_examples and getattr(scorer, "fast", False):
                    from .factorize import set_ranks_
                    from .sensitivity import label_fisher_kl

                    set_ranks_(model, {})  # the estimate is taken at the dense float32 model
                    t0 = time.perf_counter()
                    n = min(config.sensitivity_examples, scorer.n)
                    subset = sorted({round(i * (scorer.n - 1) / max(n - 1, 1)) for i in range(n)})
                    if undo_int8 is not None:
                        undo_int8()
                    try:
                        costs = label_fisher_kl(model, scorer, ladder.ranks, subset)
                    finally:
                        if undo_int8 is not None:
                            undo_int8 = simulate_int8_(model)
                    say(f"search: task sensitivity (label Fisher) of {len(costs)} matrices on {len(subset)} "
                        f"validation examples in {time.perf_counter() - t0:.0f} s")
                    return costs, "label-Fisher KL"
                return errors, "spectrum error"

            result = _genetic(config, ladder, evaluator, store, saved, elapsed, out_of_budget, progress_line,
                              seed_costs, objective, say, dense_ev, extra)
        # the exact factors the search scored the chosen plan with (B (m, r), A (r, n), float32)
        factors = {}
        for name, r in result[0].items():
            if r is not None:
                module = arch.get_module(model, name)
                factors[name] = (module.Bt[:r].T.clone(), module.A[:r].clone())
    finally:
        if undo_int8 is not None:
            undo_int8()
        detach_search_(model)
    ranks, ev, history, frontier, levels, resumed_from = result
    plan = RankPlan(dict(shapes), ranks, config.method, config.multiple, levels)
    plan.meta = {
        "strategy": config.strategy, "objective": config.objective, "tolerance": config.tolerance,
        "relative": config.relative, "tolerance_abs": tol_abs, "dense_validation_metric": evaluator.dense_metric,
        "validation_metric": ev.metric, "objective_gain": ev.gain, "seed": config.seed,
        "search_method": search_method, "calibration_tokens": tokens, "validation_examples": scorer.n,
    }
    total = len(frontier)  # every candidate scored, the dense model included
    return SearchResult(
        plan=plan, strategy=config.strategy, objective=config.objective, dense_metric=evaluator.dense_metric,
        metric=ev.metric, gain=ev.gain, tolerance_abs=tol_abs, evaluations=total,
        full_evaluations=sum(1 for f in frontier if f.get("full", True)), seconds=elapsed(),
        history=history, frontier=frontier, levels=levels, sensitivity=sensitivity, resumed_from=resumed_from,
        task_sensitivity=extra.get("task_sensitivity", {}),
        dense_int8_metric=dense_ev.metric if config.weights == "int8" else None,
        factors=factors,
    )


def _sensitivity(decs, shapes, multiple) -> dict[str, float]:
    """The spectrum's relative output error of each matrix cut to keep 0.5 (free, no model run)."""
    from .lowrank import rank_for_keep

    out = {}
    for name, (m, n) in shapes.items():
        r = rank_for_keep(m, n, 0.5, multiple)
        out[name] = decs[name].error(r) if name in decs else 0.0
    return out


def _genetic(config, ladder, evaluator, store, saved, elapsed, out_of_budget, progress_line, seed_costs,
             objective, say, dense_ev, extra):
    def evaluate(genome: Genome) -> Evaluation:
        # Out of time: stop rather than score the rest as infeasible. A made-up result would be
        # cached (and checkpointed) as if measured, a resume with a larger budget would never
        # score those genomes, and the frontier and evaluation counts would include them.
        if out_of_budget(evaluator.dense_seconds):
            raise _BudgetSpent
        return evaluator(ladder.to_ranks(genome))

    def evaluate_all(genomes: list[Genome]) -> list[Evaluation]:
        done: list[Evaluation] = []
        try:
            for g in genomes:
                done.append(evaluate(g))
        except _BudgetSpent:
            for g, ev in zip(genomes, done):  # measured before the time ran out: keep them
                ga.cache[key(g)] = ev
            raise
        return done

    ga = GeneticSearch(len(ladder.names), len(ladder.keeps), evaluate_all,
                       evaluator.tol, GAConfig(population=config.population, generations=config.generations,
                                               seed=config.seed, elite=min(2, config.population - 1)))
    # the dense genome was scored when the evaluator measured the reference (or in int8 after it)
    ga.cache[key(ladder.uniform(0))] = dense_ev
    resumed_from = None
    if saved is not None:
        ga.load_state_dict(saved["ga"])
        extra["task_sensitivity"] = saved.get("task_sensitivity", {})
        resumed_from = ga.generation
        say(f"search: resuming after generation {ga.generation} ({len(ga.cache)} evaluations cached)")

    def cached_eval(genome: Genome) -> Evaluation:
        k = key(genome)
        if k not in ga.cache:
            ga.cache[k] = evaluate(genome)
        return ga.cache[k]

    try:
        best = _run_genetic(ga, config, ladder, cached_eval, seed_costs, objective, say, extra, store, elapsed,
                            out_of_budget, progress_line, evaluator)
    except _BudgetSpent:
        # the budget ran out inside the seeding or a generation: the last checkpoint stands, and
        # the plan is the best one fully scored so far (the GA's best, or a seed)
        say("search: budget spent; keeping the best plan scored so far"
            + (" (the budget ended before the first generation)" if ga.generation < 0 else ""))
        # the measured candidates are saved, so a rerun with a larger budget replays them
        store.save({"strategy": "ga", "elapsed": elapsed(), "ga": ga.state_dict(),
                    "task_sensitivity": extra.get("task_sensitivity", {})})
        scored = [(unkey(k), e) for k, e in ga.cache.items() if e.feasible and e.full]
        best = max(scored, key=lambda ge: (ge[1].gain, -ge[1].proxy, ge[0]))[0] if scored else None
    if best is None:  # cannot happen with a deterministic evaluator: dense is feasible
        best = (0,) * len(ladder.names)
    ev = ga.evaluation(best)
    history = [asdict(r) for r in ga.history]
    frontier = [dict(gain=e.gain, metric=e.metric, feasible=e.feasible, full=e.full, proxy=e.proxy)
                for _, e in sorted(ga.cache.items())]
    ranks = ladder.to_ranks(best)
    levels = {name: ladder.keeps[g] if ranks[name] is not None else 1.0 for name, g in zip(ladder.names, best)}
    return ranks, ev, history, frontier, levels, resumed_from


def _run_genetic(ga, config, ladder, cached_eval, seed_costs, objective, say, extra, store, elapsed, out_of_budget,
                 progress_line, evaluator):
    """Seed the GA (first run only) and run it; returns its best feasible genome.

    Seeds (replayed from the cache on resume): the best uniform level, and the best trade of
    estimated task cost for gain (per matrix, the level maximizing gain - λ·cost, for a
    range of λ), the largest feasible one found by bisection, plus its neighbours."""
    from .sensitivity import lagrangian_genomes

    seeds: list[Genome] = []
    if ga.generation < 0:
        n_levels = len(ladder.keeps)
        u = bisect_largest(n_levels, lambda i: cached_eval(ladder.uniform(i)).feasible)
        seeds.append(ladder.uniform(u))
        costs, source = seed_costs()
        if source == "label-Fisher KL":  # for the bottleneck report: each matrix at the level nearest keep 0.5
            half = min(range(len(ladder.keeps)), key=lambda i: abs(ladder.keeps[i] - 0.5))
            extra["task_sensitivity"] = {name: costs[name][half] for name in ladder.names}
        gains = {name: [objective.gain({name: r}) for r in ladder.ranks[name]] for name in ladder.names}
        costs = {name: [0.0 if r is None else c for r, c in zip(ladder.ranks[name], costs[name])]
                 for name in ladder.names}
        genomes = [g for g in lagrangian_genomes(costs, gains, ladder.names, n=24) if any(g)]
        e = bisect_largest(len(genomes) + 1, lambda i: i == 0 or cached_eval(genomes[i - 1]).feasible)
        if e > 0:
            seeds.append(genomes[e - 1])
            seeds.extend(genomes[max(e - 3, 0): e - 1])
        seeds.extend(genomes[e: e + 2])  # just beyond: infeasible but close, good parents
        if u + 1 < n_levels:
            seeds.append(ladder.uniform(u + 1))
        ga.seeds = list(dict.fromkeys(seeds))
        say(f"search: seeds: uniform keep {ladder.keeps[u]} "
            f"({100 * cached_eval(ladder.uniform(u)).gain:.1f}%), best {source} trade "
            f"{'-' if e == 0 else f'{100 * cached_eval(genomes[e - 1]).gain:.1f}%'} "
            f"(step {e} of {len(genomes)}); {len(ga.cache)} evaluations")

    def checkpoint(g: GeneticSearch) -> None:
        rec = g.history[-1]
        store.save({"strategy": "ga", "elapsed": elapsed(), "ga": g.state_dict(),
                    "task_sensitivity": extra.get("task_sensitivity", {})})
        progress_line(f"generation {g.generation}/{config.generations}", rec.best_gain, rec.best_metric,
                      rec.total_evaluations)

    def should_stop(g: GeneticSearch) -> bool:
        # a generation costs about what the recent ones did (and at least one full evaluation)
        recent = [r.seconds for r in g.history[-3:]] + [evaluator.dense_seconds]
        if out_of_budget(max(recent)):
            say(f"search: stopping after generation {g.generation}: the next one would exceed the budget")
            return True
        return False

    return ga.run(on_generation=checkpoint, should_stop=should_stop)


def _uniform(config, shapes, objective, evaluator, store, saved, elapsed, out_of_budget, progress_line, dense_ev):
    """Bisection on one keep fraction for every matrix (the baseline)."""
    from .lowrank import rank_for_keep

    n = int(round(1.0 / UNIFORM_STEP))
    keeps = [round(1.0 - i * UNIFORM_STEP, 6) for i in range(n)]      # 1.0, 0.975, ..., 0.025
    memo: dict[str, dict] = dict(saved.get("uniform", {})) if saved else {}
    history: list[dict] = list(saved.get("history", [])) if saved else []
    resumed_from = len(history) if saved else None

    def ranks_of(keep: float) -> dict[str, int | None]:
        out = {}
        for name, (m, n_) in shapes.items():
            r = rank_for_keep(m, n_, keep, config.multiple)
            out[name] = r if objective.usable(name, r) else None
        return out

    def feasible(i: int) -> bool:
        k = f"{keeps[i]:.6f}"
        if k not in memo:
            if out_of_budget(evaluator.dense_seconds):
                return False  # out of time: treat the untested level as too deep
            t0 = time.perf_counter()
            memo[k] = asdict(evaluator(ranks_of(keeps[i])))
            best = max((v for v in memo.values() if v["feasible"] and v["full"]), key=lambda v: v["gain"],
                       default=memo[f"{1.0:.6f}"])
            history.append({"generation": len(history) + 1, "keep": keeps[i], "feasible": memo[k]["feasible"],
                            "metric": memo[k]["metric"], "best_gain": best["gain"], "best_metric": best["metric"],
                            "best_fitness": best["gain"], "median_fitness": memo[k]["gain"],
                            "evaluations": 1, "total_evaluations": len(memo), "seconds": time.perf_counter() - t0})
            store.save({"strategy": "uniform", "elapsed": elapsed(), "uniform": memo, "history": history})
            progress_line(f"bisection step {len(history)} (keep {keeps[i]})", best["gain"], best["metric"], len(memo))
        return memo[k]["feasible"]

    memo.setdefault(f"{1.0:.6f}", asdict(dense_ev))
    i = bisect_largest(n, feasible)
    keep = keeps[i]
    ev = Evaluation(**memo[f"{keep:.6f}"])
    ranks = ranks_of(keep)
    frontier = [dict(gain=v["gain"], metric=v["metric"], feasible=v["feasible"], full=v["full"], keep=float(k),
                     proxy=v["proxy"]) for k, v in sorted(memo.items())]
    levels = {name: (keep if ranks[name] is not None else 1.0) for name in shapes}
    return ranks, ev, history, frontier, levels, resumed_from


# ---------------------------------------------------------------- the stage: files in, folder out

def _prepare_out(out: Path, force: bool) -> None:
    """A folder holding this search's state resumes; a finished search or other content needs care."""
    import shutil

    from .checkpoint import describe_folder

    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        kind = describe_folder(out)
        finished_search = kind == "checkpoint" and (out / "plan.json").is_file() and (out / "history.json").is_file()
        if kind == "search" and not force:
            return  # resume
        if (kind == "search" or finished_search) and force:
            shutil.rmtree(out)
        elif finished_search:
            raise ArtifactError(f"output folder {out} already holds a finished search; pass --force to redo it")
        else:
            raise ArtifactError(f"output folder {out} already holds {kind or 'other files'}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def run_search(model_spec, task_spec, out, config: SearchConfig = SearchConfig(), *,
               budget_minutes: float | None = None, force: bool = False, test_limit: int | None = None,
               log: Callable[[str], None] | None = None, progress: bool = False, model=None, tokenizer=None,
               decompositions: tuple[dict, int] | None = None) -> dict:
    """The ``search`` stage: search a plan, refit it with ``config.method``, heal, score test, write ``out``.

    ``out`` ends as a factorized checkpoint folder plus ``plan.json``, ``history.json``,
    ``search_report.md``, ``frontier.png``, ``heatmap.png`` and the final ``search_state.json``.
    While the search runs, ``out`` holds only ``search_state.json``: rerunning the same
    command resumes from it. Returns the summary that is also stored in ``search.json``.
    """
    import shutil

    from .checkpoint import build_manifest, finalize_output, save_checkpoint
    from .evaluate import make_scorer
    from .factorize import factorize_
    from .tasks import TaskSpec, load_task

    say = log or (lambda msg: None)
    task = task_spec if isinstance(task_spec, TaskSpec) else load_task(task_spec)
    _validate_task(task)  # before loading a model: fail in a second, not in a minute
    if "test" not in task.data:
        raise TaskSpecError(f"{task.path}: task '{task.name}' has no 'test' split in [data]: the search scores "
                            "its final plan on test, which it never saw; add data.test")
    if budget_minutes is not None and budget_minutes <= 0:
        raise BudgetError(f"budget must be > 0 minutes, got {budget_minutes}")
    out = Path(out)
    _prepare_out(out, force)
    t0 = time.perf_counter()
    if model is None:
        from .models import load_model

        say(f"search: loading {model_spec}")
        model = load_model(model_spec)
    if tokenizer is None:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(model_spec)
    higher = task.metric != "perplexity"

    test_scorer = make_scorer(tokenizer, task, "test", limit=test_limit, batch_size=config.batch_size)
    dense_test = float(test_scorer.metric(model))
    say(f"search: dense test {task.metric} {dense_test:.4f} on {test_scorer.n} examples (kept for the end)")
    result = search_plan(model, tokenizer, task, config, budget_minutes=budget_minutes,
                         state_path=out / "search_state.json", log=say, progress=progress,
                         decompositions=decompositions)
    plan = result.plan
    say(f"search: plan {100 * plan.linear_param_reduction:.1f}% of linear parameters removed, validation "
        f"{task.metric} {result.metric:.4f} (dense {result.dense_metric:.4f}); refitting with '{config.method}'")

    val_scorer = make_scorer(tokenizer, task, "validation", limit=config.val_limit, batch_size=config.batch_size)
    sign = 1.0 if higher else -1.0
    search_method = plan.meta["search_method"]
    if config.method == search_method:
        # the search's own decompositions, same calibration: the refit is exactly what was scored
        refit = factorize_(model, result.factors)
    else:
        refit = _refit(model, tokenizer, task, plan, config.method, config, progress)
    method_used = config.method
    val_refit = float(val_scorer.metric(refit))
    notes = []
    if sign * (result.dense_metric - val_refit) > result.tolerance_abs + 1e-12 and config.method != search_method:
        # The sequential refit of the same ranks missed the tolerance: put back the factors the
        # search measured (replacing each LowRankLinear keeps the rest of the model as it was).
        notes.append(f"the '{config.method}' refit scored {val_refit:.4f} on validation, beyond the tolerance; "
                     f"kept the '{search_method}' factors the search measured instead")
        say("search: " + notes[-1])
        refit = factorize_(refit, result.factors)
        method_used = search_method
        val_refit = float(val_scorer.metric(refit))
    plan.method = method_used

    heal = None
    if config.heal_steps and plan.factorized:
        from .heal import heal_

        heal = heal_(refit, tokenizer, task, config.heal_steps, lr=config.heal_lr, batch_size=16, seed=config.seed,
                     val_scorer=val_scorer, higher_is_better=higher, log=say)
        say(f"search: healing {config.heal_steps} steps: validation {heal.metric_before:.4f} -> "
            f"{heal.metric_after:.4f} ({'kept' if heal.kept else 'discarded: it scored worse'})")
        val_final = heal.metric_after if heal.kept else heal.metric_before
    else:
        val_final = val_refit
    test_metric = float(test_scorer.metric(refit))

    summary = {
        "model": str(model_spec), "task": task.name, "metric": task.metric,
        "strategy": config.strategy, "objective": config.objective, "method": method_used,
        "tolerance": config.tolerance, "relative": config.relative, "tolerance_abs": result.tolerance_abs,
        "seed": config.seed, "linear_param_reduction": plan.linear_param_reduction,
        "objective_gain": result.gain,
        "weights": config.weights,
        "validation": {"dense": result.dense_metric, "dense_int8": result.dense_int8_metric, "search": result.metric,
                       "refit": val_refit, "final": val_final, "n": val_scorer.n},
        "test": {"dense": dense_test, "pruned": test_metric, "drop": sign * (dense_test - test_metric),
                 "n": test_scorer.n},
        "evaluations": result.evaluations, "full_evaluations": result.full_evaluations,
        "search_seconds": result.seconds, "total_seconds": time.perf_counter() - t0,
        "generations": len(result.history), "resumed_from": result.resumed_from,
        "heal": None if heal is None else asdict(heal), "notes": notes,
    }
    plan.meta.update({"test_metric": test_metric, "dense_test_metric": dense_test, "refit_method": method_used})

    staging = out.with_name(f"{out.name}.final-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    manifest = build_manifest(refit, base_model=str(model_spec), method=method_used, task=task.name,
                              search={k: summary[k] for k in ("strategy", "objective", "tolerance", "relative",
                                                              "validation", "test", "seed")})
    save_checkpoint(refit, tokenizer, staging, manifest)
    try:
        plan.to_json(staging / "plan.json")
        (staging / "history.json").write_text(json.dumps(
            {"strategy": config.strategy, "generations": result.history, "frontier": result.frontier}, indent=1))
        (staging / "search.json").write_text(json.dumps(summary, indent=2))
        from .plots import frontier_png, heatmap_png

        frontier_png(result.frontier, {"gain": result.gain, "metric": result.metric}, result.dense_metric,
                     result.tolerance_abs, staging / "frontier.png", task.metric, config.objective,
                     f"{task.name}: {config.strategy} search, tolerance {config.tolerance:g}"
                     f"{' relative' if config.relative else ''}", higher)
        heatmap_png(result.levels, staging / "heatmap.png",
                    f"{task.name}: keep per matrix ({100 * plan.linear_param_reduction:.1f}% removed)")
        (staging / "search_report.md").write_text(search_report(summary, result, plan))
        if (out / "search_state.json").is_file():  # none when no candidate was scored
            shutil.copy2(out / "search_state.json", staging / "search_state.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finalize_output(staging, out)
    say(f"search: wrote {out} (test {task.metric} {test_metric:.4f}, dense {dense_test:.4f})")
    return summary


def _refit(model, tokenizer, task, plan, method, config: SearchConfig, progress: bool):
    from .prune import prune

    return prune(model, tokenizer, task, plan, method, n_calibration=config.n_calibration,
                 batch_size=config.calibration_batch, multiple=config.multiple, progress=progress).model


def bottlenecks(levels: dict[str, float], sensitivity: dict[str, float], n: int = 8
                ) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """(kept densest, cut most): (name, keep, sensitivity at keep 0.5), ties broken by sensitivity."""
    rows = [(name, keep, sensitivity.get(name, 0.0)) for name, keep in levels.items()]
    densest = sorted(rows, key=lambda r: (-r[1], -r[2], r[0]))[:n]
    cut = sorted(rows, key=lambda r: (r[1], r[2], r[0]))[:n]
    return densest, cut


def search_report(summary: dict, result: SearchResult, plan) -> str:
    from .architectures import layer_index, matrix_type, relative_name

    s = summary
    lines = [
        f"# Search report: {s['task']} on {s['model']}", "",
        f"- strategy **{s['strategy']}**, objective **{s['objective']}**, refit method **{s['method']}**, "
        f"seed {s['seed']}",
        f"- tolerance {s['tolerance']:g}{' (relative)' if s['relative'] else ''} = {s['tolerance_abs']:.4f} "
        f"{s['metric']} on the validation split ({s['validation']['n']} examples)",
        f"- **linear parameters removed: {100 * s['linear_param_reduction']:.1f}%**"
        + (f" (time saved by the cost table: {100 * s['objective_gain']:.1f}%)" if s["objective"] == "latency" else ""),
        f"- {s['evaluations']} candidate evaluations ({s['full_evaluations']} on the full validation split, "
        f"the rest rejected by racing), {len(result.history)} generations/steps, "
        f"{s['search_seconds'] / 60:.1f} min searching, {s['total_seconds'] / 60:.1f} min in all"
        + (f"; resumed after step {s['resumed_from']}" if s["resumed_from"] is not None else ""),
    ]
    if s.get("weights") == "int8":
        lines += [f"- candidates were scored with **simulated int8 weights** (as the int8 export computes): the dense "
                  f"model alone scores {s['validation']['dense_int8']:.4f} that way; the *search* column is int8, "
                  "the others float32"]
    lines += [
        "",
        "| | dense | search (output factors) | refit | final |",
        "|---|---|---|---|---|",
        f"| validation {s['metric']} | {s['validation']['dense']:.4f} | {s['validation']['search']:.4f} | "
        f"{s['validation']['refit']:.4f} | {s['validation']['final']:.4f} |",
        f"| test {s['metric']} ({s['test']['n']} examples, never seen by the search) | {s['test']['dense']:.4f} | | | "
        f"{s['test']['pruned']:.4f} |",
        "",
    ]
    if s["heal"]:
        h = s["heal"]
        lines += [f"Healing: {h['steps']} steps at lr {h['lr']:g} on {h['trainable_params']:,} factor parameters, "
                  f"validation {h['metric_before']:.4f} → {h['metric_after']:.4f}, loss {h['loss_first']:.3f} → "
                  f"{h['loss_last']:.3f}; {'kept' if h['kept'] else 'discarded (it scored worse)'}.", ""]
    for note in s["notes"]:
        lines += [f"Note: {note}", ""]
    task, spec = result.task_sensitivity, result.sensitivity
    densest, cut = bottlenecks(result.levels, task or spec)
    lines += ["## Bottlenecks", "", "Matrices kept densest (the task's knowledge sits there) and cut most. "
              + ("*Task KL* is the label-Fisher estimate of KL(dense ‖ cut) of the label distribution with the "
                 "matrix alone at keep 0.5 (`sensitivity.py`); " if task else "")
              + "*spectrum error* is the relative calibration output error the matrix alone would show at keep 0.5.", ""]
    if task:
        lines += ["| kept densest | keep | task KL | spectrum error | | cut most | keep | task KL | spectrum error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (a, ka, ea), (b, kb, eb) in zip(densest, cut):
            lines.append(f"| `{a}` | {ka:.2f} | {ea:.3g} | {spec.get(a, 0.0):.3f} | | `{b}` | {kb:.2f} | {eb:.3g} | "
                         f"{spec.get(b, 0.0):.3f} |")
    else:
        lines += ["| kept densest | keep | spectrum error | | cut most | keep | spectrum error |",
                  "|---|---|---|---|---|---|---|"]
        for (a, ka, ea), (b, kb, eb) in zip(densest, cut):
            lines.append(f"| `{a}` | {ka:.2f} | {ea:.3f} | | `{b}` | {kb:.2f} | {eb:.3f} |")
    by_type: dict[str, list[float]] = {}
    by_layer: dict[int, list[float]] = {}
    for name, keep in result.levels.items():
        by_type.setdefault(matrix_type(relative_name(name)), []).append(keep)
        by_layer.setdefault(layer_index(name), []).append(keep)
    lines += ["", "Mean keep per matrix type: " + ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in by_type.items()),
              "", "Mean keep per layer: " + ", ".join(f"{l}: {sum(v) / len(v):.2f}" for l, v in sorted(by_layer.items())),
              "", "![frontier](frontier.png)", "", "![keep per matrix](heatmap.png)", "",
              "## Check it on another dataset of the same task", "",
              "A plan searched on one dataset should hold on another of the same task (DESIGN §1), e.g. "
              "sst2 → uci_yelp / uci_amazon / uci_imdb:", "",
              "```", "sieve-edge eval --model OUT --task TASK_FILE_OF_THE_OTHER_DATASET --split test", "```", ""]
    return "\n".join(lines)

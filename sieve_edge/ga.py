"""Genetic-algorithm mechanics over per-matrix keep levels: pure Python, no torch, no files.

A genome is a tuple of ints, one gene per matrix, each an index into a ladder of keep levels
(index 0 = the densest level). This module only breeds, selects and remembers; scoring is
the caller's, in one of two ways:

- ``run()`` / ``step()`` with ``evaluate(genomes) -> [Evaluation]`` given to the constructor;
- ``ask()`` → the candidates of the next generation at once (a scorer may race, batch or
  spread them over workers) → ``tell(genomes, evaluations)``, as many times as needed; the
  generation completes when every candidate is scored. A partial ``tell`` is kept.

Everything it holds (population, every evaluation, the RNG) round-trips through
``state_dict()`` as plain JSON data, so a search stopped after any generation, or inside
one, resumes to exactly the run it would have been.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from .errors import InputError

Genome = tuple[int, ...]


@dataclass(frozen=True)
class GAConfig:
    population: int = 16
    generations: int = 12
    elite: int = 2               # best individuals copied unchanged into the next generation
    tournament: int = 3          # contestants per parent pick: higher = greedier
    crossover: float = 0.8       # probability that a child mixes two parents (else copies one)
    mutation: float | None = None  # per-gene probability; None = 2 / number of genes
    step: float = 0.85           # a mutation moves one ladder step (else jumps to any level)
    penalty: float = 10.0        # fitness lost per unit of metric beyond the tolerance
    stall: int | None = None     # stop after this many generations with no better feasible genome
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.population < 2:
            problems.append(f"population={self.population} (needs >= 2)")
        if self.generations < 0:
            problems.append(f"generations={self.generations} (needs >= 0)")
        if not 0 <= self.elite < self.population:
            problems.append(f"elite={self.elite} (needs 0 <= elite < population)")
        if self.tournament < 1:
            problems.append(f"tournament={self.tournament} (needs >= 1)")
        if not 0.0 <= self.crossover <= 1.0:
            problems.append(f"crossover={self.crossover} (needs 0..1)")
        if self.mutation is not None and not 0.0 < self.mutation <= 1.0:
            problems.append(f"mutation={self.mutation} (needs 0 < p <= 1, or None)")
        if not 0.0 <= self.step <= 1.0:
            problems.append(f"step={self.step} (needs 0..1)")
        if self.penalty < 0:
            problems.append(f"penalty={self.penalty} (needs >= 0)")
        if problems:
            raise InputError("bad genetic-search setting: " + "; ".join(problems))


@dataclass(frozen=True)
class Evaluation:
    """What one candidate scored. ``gain`` is the objective (fraction of parameters or time
    removed, higher is better); ``drop`` is the metric loss against the dense model in the
    tolerance's units; ``proxy`` a smooth divergence from the dense model (lower is better)
    used to break the ties a coarse metric leaves; ``full`` is False when racing decided the
    candidate on a subset of ``rows`` rows (accepted: ``feasible``, or rejected), so its
    metric and drop are estimates; a plan is confirmed on the full split before it is kept."""

    gain: float
    metric: float
    drop: float
    feasible: bool
    proxy: float = 0.0
    full: bool = True
    seconds: float = 0.0
    rows: int = 0                # validation rows scored (0: not recorded)


def fitness(ev: Evaluation, tolerance: float, penalty: float) -> float:
    """Gain when feasible; beyond the tolerance the gain minus a penalty on the excess, so
    the search still sees which infeasible genomes lie close to the boundary."""
    if ev.feasible:
        return ev.gain
    return ev.gain - penalty * max(ev.drop - tolerance, 0.0) - (0.0 if ev.full else 1e-6)


def key(genome: Sequence[int]) -> str:
    return ",".join(map(str, genome))


def unkey(text: str) -> Genome:
    return tuple(int(x) for x in text.split(",")) if text else ()


@dataclass
class GenerationRecord:
    generation: int
    best_fitness: float
    median_fitness: float
    best_gain: float | None      # best feasible genome so far (None: none yet)
    best_metric: float | None
    evaluations: int             # new evaluations this generation (cache hits excluded)
    full_evaluations: int        # of those, how many went past racing to the full split
    total_evaluations: int
    seconds: float               # wall time of this generation


@dataclass
class _Ranked:
    genome: Genome
    ev: Evaluation
    fit: float

    def order(self):
        # Higher fitness first; among equal fitness, the one closer to dense behaviour.
        return (-self.fit, self.ev.proxy, self.genome)


class GeneticSearch:
    """Tournament selection, uniform crossover, step mutation, elitism, an evaluation cache.

    ``evaluate`` receives the not-yet-seen genomes of one generation at once (so it can
    race them) and must be deterministic: a resumed search replays nothing it has cached.
    """

    def __init__(
        self,
        n_genes: int,
        n_levels: int,
        evaluate: Callable[[list[Genome]], list[Evaluation]] | None,
        tolerance: float,
        config: GAConfig = GAConfig(),
        seeds: Sequence[Sequence[int]] = (),
    ):
        if n_genes < 1 or n_levels < 2:
            raise InputError(f"genetic search needs >= 1 gene and >= 2 levels (got {n_genes}, {n_levels})")
        self.n_genes, self.n_levels = n_genes, n_levels
        self.evaluate_fn = evaluate
        self.tolerance = tolerance
        self.config = config
        self.mutation = config.mutation if config.mutation is not None else min(1.0, 2.0 / n_genes)
        self.rng = random.Random(config.seed)
        self.seeds = [self._check(s) for s in seeds]
        self.cache: dict[str, Evaluation] = {}
        self.population: list[Genome] = []
        self.generation = -1         # -1: not initialised; 0: initial population scored
        self.history: list[GenerationRecord] = []
        self.best_feasible: Genome | None = None
        self.stalled = 0
        self._pending: list[Genome] | None = None   # the generation asked for and not yet complete
        self._rng_before_ask = None                  # the RNG as it was before breeding it (for the state)
        self._new: list[str] = []                    # keys scored for the pending generation
        self._pending_seconds = 0.0
        # (search, bred children) -> the candidates to score instead: a surrogate's screen.
        # It may draw from self.rng (restored to before the ask on resume) and must otherwise
        # depend only on state saved with the search, so a resumed ask gives the same list.
        self.proposer: Callable[["GeneticSearch", list[Genome]], list[Genome]] | None = None

    # ---- public -------------------------------------------------------------------------

    def run(self, on_generation: Callable[["GeneticSearch"], None] | None = None,
            should_stop: Callable[["GeneticSearch"], bool] | None = None) -> Genome | None:
        """Run until ``config.generations`` generations after the initial one, a stall, or
        ``should_stop``; call ``on_generation`` after each (checkpointing goes there)."""
        while not self.done():
            if should_stop is not None and self.generation >= 0 and should_stop(self):
                break
            self.step()
            if on_generation is not None:
                on_generation(self)
        return self.best_feasible

    def done(self) -> bool:
        if self.generation >= self.config.generations:
            return True
        return self.config.stall is not None and self.stalled >= self.config.stall

    def step(self) -> GenerationRecord:
        """Score the initial population (generation 0) or breed and score the next one."""
        if self.evaluate_fn is None:
            raise ValueError("step() needs the evaluate function; without one, use ask() and tell()")
        t0 = time.perf_counter()
        todo = self.unscored(self.ask())
        results = self.evaluate_fn(todo) if todo else []
        if len(results) != len(todo):
            raise ValueError(f"evaluate returned {len(results)} results for {len(todo)} genomes")
        record = self.tell(todo, results, seconds=time.perf_counter() - t0)
        assert record is not None
        return record

    def ask(self) -> list[Genome]:
        """The candidates of the next generation (the initial population first), distinct, in
        order; asking again before the generation completes returns the same list."""
        if self._pending is None:
            self._rng_before_ask = self.rng.getstate()
            if self.generation < 0:
                candidates = self._initial()
            else:
                candidates = self._breed()
                if self.proposer is not None:
                    candidates = [self._check(g) for g in self.proposer(self, candidates)]
            self._pending = list(dict.fromkeys(candidates))
            self._new, self._pending_seconds = [], 0.0
        return list(self._pending)

    def unscored(self, genomes: Sequence[Genome]) -> list[Genome]:
        """The genomes not in the evaluation cache (what a scorer has to measure)."""
        return [g for g in dict.fromkeys(genomes) if key(g) not in self.cache]

    def tell(self, genomes: Sequence[Genome], evaluations: Sequence[Evaluation],
             seconds: float = 0.0) -> GenerationRecord | None:
        """Record evaluations (a prefix of ``ask()``'s unscored candidates is fine). Returns the
        generation's record when this completed it, else None."""
        if len(genomes) != len(evaluations):
            raise ValueError(f"{len(evaluations)} evaluations for {len(genomes)} genomes")
        for g, ev in zip(genomes, evaluations):
            k = key(self._check(g))
            if k not in self.cache:
                self._new.append(k)
            self.cache[k] = ev
        self._pending_seconds += seconds
        if self._pending is None or self.unscored(self._pending):
            return None
        candidates = self._pending
        improved = self._update_best(candidates)
        self.stalled = 0 if improved or self.generation < 0 else self.stalled + 1
        self.population = self._select(candidates)
        self.generation += 1
        n_new = len(self._new)
        n_full = sum(1 for k in self._new if self.cache[k].full)
        record = self._record(n_new, n_full, self._pending_seconds)
        self.history.append(record)
        self._pending, self._rng_before_ask, self._new = None, None, []
        return record

    def correct(self, genome: Sequence[int], ev: Evaluation) -> None:
        """Replace a genome's evaluation (a race's estimate by its full-split confirmation)
        and recompute the best feasible genome over everything scored."""
        self.cache[key(self._check(genome))] = ev
        self.refresh_best()

    def refresh_best(self) -> None:
        """The best feasible genome over every evaluation in the cache."""
        self.best_feasible = None
        self._update_best([unkey(k) for k in self.cache])

    def evaluation(self, genome: Sequence[int]) -> Evaluation:
        return self.cache[key(genome)]

    def ranked(self, genomes: Sequence[Genome] | None = None) -> list[tuple[Genome, Evaluation, float]]:
        pool = self.population if genomes is None else genomes
        rows = sorted((self._rank(g) for g in dict.fromkeys(pool)), key=_Ranked.order)
        return [(r.genome, r.ev, r.fit) for r in rows]

    def frontier(self) -> list[tuple[Genome, Evaluation]]:
        """Every fully scored genome, for the accuracy-vs-gain plot."""
        return [(unkey(k), ev) for k, ev in self.cache.items() if ev.full]

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        # inside a generation: the RNG before it was bred, so a resume breeds the same one and
        # finds the candidates scored so far in the cache
        version, internal, gauss = self._rng_before_ask if self._pending is not None else self.rng.getstate()
        return {
            "generation": self.generation,
            "stalled": self.stalled,
            "n_genes": self.n_genes,
            "n_levels": self.n_levels,
            "population": [list(g) for g in self.population],
            "best_feasible": None if self.best_feasible is None else list(self.best_feasible),
            "rng": [version, list(internal), gauss],
            "cache": {k: asdict(ev) for k, ev in self.cache.items()},
            "history": [asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["n_genes"], state["n_levels"]) != (self.n_genes, self.n_levels):
            raise InputError(
                f"search state has {state['n_genes']} genes x {state['n_levels']} levels, "
                f"this search {self.n_genes} x {self.n_levels}"
            )
        self.generation = state["generation"]
        self.stalled = state["stalled"]
        self.population = [tuple(g) for g in state["population"]]
        self.best_feasible = None if state["best_feasible"] is None else tuple(state["best_feasible"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.cache = {k: Evaluation(**v) for k, v in state["cache"].items()}
        self.history = [GenerationRecord(**r) for r in state["history"]]
        self._pending, self._rng_before_ask, self._new = None, None, []

    # ---- mechanics ----------------------------------------------------------------------

    def _check(self, genome: Sequence[int]) -> Genome:
        g = tuple(int(x) for x in genome)
        if len(g) != self.n_genes or any(not 0 <= x < self.n_levels for x in g):
            raise InputError(f"seed genome of length {len(g)} with levels outside 0..{self.n_levels - 1}")
        return g

    def _initial(self) -> list[Genome]:
        """Dense (always feasible) + the seeds + mutants of seeds, to the population size."""
        size = self.config.population
        pool = list(dict.fromkeys([(0,) * self.n_genes, *self.seeds]))[:size]
        parents = pool[1:] or pool
        tries = 0
        while len(pool) < size and tries < 50 * size:
            tries += 1
            child = self._mutate(self.rng.choice(parents), rate=max(self.mutation, 4.0 / self.n_genes))
            if child not in pool:
                pool.append(child)
        while len(pool) < size:  # tiny search spaces: fill with random genomes
            pool.append(tuple(self.rng.randrange(self.n_levels) for _ in range(self.n_genes)))
        return pool

    def _breed(self) -> list[Genome]:
        cfg = self.config
        ranked = sorted((self._rank(g) for g in self.population), key=_Ranked.order)
        elites = [r.genome for r in ranked[: cfg.elite]]
        if self.best_feasible is not None and self.best_feasible not in elites and cfg.elite > 0:
            elites[-1] = self.best_feasible
        children: list[Genome] = list(dict.fromkeys(elites))
        seen = set(children)
        tries = 0
        while len(children) < cfg.population:
            tries += 1
            a = self._tournament(ranked)
            if self.rng.random() < cfg.crossover:
                b = self._tournament(ranked)
                child = self._crossover(a, b)
            else:
                child = a
            child = self._mutate(child)
            if child in seen and tries < 20 * cfg.population:
                continue  # a duplicate adds no information; breed another
            seen.add(child)
            children.append(child)
        return children

    def _tournament(self, ranked: list[_Ranked]) -> Genome:
        picks = [self.rng.randrange(len(ranked)) for _ in range(self.config.tournament)]
        return ranked[min(picks)].genome  # ranked is sorted best first

    def _crossover(self, a: Genome, b: Genome) -> Genome:
        return tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b))

    def _mutate(self, genome: Genome, rate: float | None = None) -> Genome:
        rate = self.mutation if rate is None else rate
        out = list(genome)
        for i in range(self.n_genes):
            if self.rng.random() >= rate:
                continue
            if self.rng.random() < self.config.step:
                out[i] = min(max(out[i] + self.rng.choice((-1, 1)), 0), self.n_levels - 1)
            else:
                out[i] = self.rng.randrange(self.n_levels)
        return tuple(out)

    def _update_best(self, genomes: list[Genome]) -> bool:
        improved = False
        for g in genomes:
            ev = self.cache[key(g)]
            if not ev.feasible:  # full, or accepted by racing (confirmed on the full split at the end)
                continue
            if self.best_feasible is None or self._better_feasible(g, self.best_feasible):
                self.best_feasible, improved = g, True
        return improved

    def _better_feasible(self, a: Genome, b: Genome) -> bool:
        ea, eb = self.cache[key(a)], self.cache[key(b)]
        return (ea.gain, -ea.proxy, a) > (eb.gain, -eb.proxy, b)

    def _select(self, candidates: list[Genome]) -> list[Genome]:
        # Generational replacement: the children (elites among them) are the population.
        return list(dict.fromkeys(candidates))

    def _rank(self, genome: Genome) -> _Ranked:
        ev = self.cache[key(genome)]
        return _Ranked(genome, ev, fitness(ev, self.tolerance, self.config.penalty))

    def _record(self, n_new: int, n_full: int, seconds: float) -> GenerationRecord:
        fits = [self._rank(g).fit for g in self.population]
        best = self.cache[key(self.best_feasible)] if self.best_feasible is not None else None
        return GenerationRecord(
            generation=self.generation,
            best_fitness=max(fits),
            median_fitness=statistics.median(fits),
            best_gain=best.gain if best else None,
            best_metric=best.metric if best else None,
            evaluations=n_new,
            full_evaluations=n_full,
            total_evaluations=len(self.cache),
            seconds=seconds,
        )

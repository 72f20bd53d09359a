"""A cheap model of a plan's metric drop, and the GA's screen built on it.

The surrogate proposes, the real model decides. Its parts:

- base: per matrix and per ladder level, an estimated cost of cutting that one matrix
  (the label-Fisher KL of the sensitivity stage, or the spectrum error where that does not
  apply); a plan's base score is the sum over its matrices (the costs are additive to first
  order);
- a learned scale per matrix: ridge regression, in relative terms, of the KL divergence each
  measured candidate showed on the sum of its scaled costs, pulled toward scale 1 so that a
  matrix no measurement has told apart keeps its prior;
- a learned per-plan map from that score to the metric drop: isotonic (monotone) regression
  over every measured candidate, so the nonlinearity between KL and lost accuracy, and the
  interactions the sum misses on average, come from measurements.

It is refit after every generation from every candidate scored so far. ``SurrogateScreen``
is the ``GeneticSearch.proposer``: per generation it runs a small GA on the surrogate alone
(thousands of plans, no model run), then hands the real evaluator the most promising plans
not yet measured (highest predicted objective within the predicted tolerance) plus a few of
the plain GA's children for exploration. The plans it proposes stay within a trust region
of the best feasible plan measured so far (at most ``trust_radius`` more gain), which widens
after a generation that found a better plan and narrows after one that did not: an inner GA
run on an imperfect surrogate otherwise proposes, generation after generation, the plans
whose cost it underestimates most, far beyond anything measured feasible. Everything it
uses is in its ``state_dict`` (saved with the search state), the GA's history or the GA's
RNG, so a resumed search asks the same plans.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from ..ga import Evaluation, GAConfig, GeneticSearch, Genome, fitness, key, unkey

RIDGE = 0.02           # pull of each matrix's scale toward 1, relative to the mean information per matrix
INNER_POPULATION = 48  # the surrogate GA, per real generation
INNER_GENERATIONS = 30
TRUST_START = 0.1      # gain (fraction of the objective) the screen may propose beyond the best feasible plan
TRUST_MIN = 0.01       # the narrowest trust region; TRUST_MAX the widest
TRUST_MAX = 1.0


def trust_radius(best_gains: Sequence[float | None]) -> float:
    """The trust region's radius after generations whose best feasible gains so far were
    ``best_gains`` (the GA's history, generation 0 first): it starts at ``TRUST_START``,
    doubles after a generation that raised the best feasible gain, halves after one that
    did not (a derived quantity, so a resumed search has the same radius)."""
    radius, best = TRUST_START, None
    for i, g in enumerate(best_gains):
        if i > 0:
            improved = g is not None and (best is None or g > best + 1e-12)
            radius = min(2 * radius, TRUST_MAX) if improved else max(radius / 2, TRUST_MIN)
        if g is not None:
            best = g if best is None else max(best, g)
    return radius


def isotonic(xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]) -> list[tuple[float, float, float]]:
    """Weighted isotonic (non-decreasing) regression by pool-adjacent-violators.
    Returns blocks (x_low, x_high, value) in increasing x."""
    pts = sorted(zip(xs, ys, ws))
    blocks: list[list[float]] = []  # [x_low, x_high, weighted sum, weight]
    for x, y, w in pts:
        w = max(w, 1e-9)
        blocks.append([x, x, y * w, w])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][3] >= blocks[-1][2] / blocks[-1][3]:
            hi = blocks.pop()
            blocks[-1][1], blocks[-1][2], blocks[-1][3] = hi[1], blocks[-1][2] + hi[2], blocks[-1][3] + hi[3]
    return [(b[0], b[1], b[2] / b[3]) for b in blocks]


def _interpolate(blocks: list, x: float) -> float:
    """The isotonic fit at ``x``: flat inside a block, linear between blocks; beyond the
    largest measured score, the last value grown in proportion (never flat-optimistic)."""
    if not blocks:
        return 0.0
    if x <= blocks[0][1]:
        return blocks[0][2]
    for (lo0, hi0, v0), (lo1, hi1, v1) in zip(blocks, blocks[1:]):
        if x <= lo1:
            return v0 + (v1 - v0) * (x - hi0) / max(lo1 - hi0, 1e-30)
        if x <= hi1:
            return v1
    last_x, last_v = blocks[-1][1], blocks[-1][2]
    return last_v * x / last_x if last_v > 0 and last_x > 0 else last_v


class Surrogate:
    """Predicted metric drop of a genome from additive per-matrix costs, refit on measurements.

    ``costs[name][level]``: the estimated cost of that matrix at that ladder level (0 for
    level 0). ``names`` gives the gene order.
    """

    def __init__(self, costs: dict[str, Sequence[float]], names: Sequence[str], source: str = "label-Fisher KL"):
        self.names = list(names)
        self.costs = {n: [max(float(c), 0.0) for c in costs[n]] for n in self.names}
        self.source = source
        self.scale = [1.0] * len(self.names)
        self.blocks: list[tuple[float, float, float]] = []
        self.n_fit = 0

    def score(self, genome: Sequence[int]) -> float:
        """The scaled additive cost of a plan (a KL estimate when the costs are label-Fisher)."""
        return sum(s * self.costs[n][g] for s, n, g in zip(self.scale, self.names, genome))

    def predict(self, genome: Sequence[int]) -> float:
        """Predicted metric drop (tolerance units); before any fit, the score itself."""
        z = self.score(genome)
        return _interpolate(self.blocks, z) if self.blocks else z

    def fit(self, measured: dict[str, Evaluation]) -> None:
        """Refit on every measured genome (``key(genome) -> Evaluation``); a raced candidate
        counts in proportion to the rows it was scored on."""
        import numpy as np

        items = sorted(measured.items())
        if not items:
            return
        genomes = [unkey(k) for k, _ in items]
        evs = [e for _, e in items]
        full_rows = max((e.rows for e in evs), default=0) or 1
        weights = [1.0 if e.full or not e.rows else e.rows / full_rows for e in evs]
        x = np.array([[self.costs[n][g] for n, g in zip(self.names, genome)] for genome in genomes])  # (P, M)
        kl = np.array([e.proxy for e in evs])
        usable = (kl > 0) & (x.sum(1) > 0)
        if self.source == "label-Fisher KL" and usable.sum() >= 3:
            # relative least squares: each row divided by its measured KL; ridge toward scale 1
            xr = x[usable] / kl[usable, None] * np.sqrt(np.array(weights)[usable])[:, None]
            yr = np.sqrt(np.array(weights)[usable])
            gram = xr.T @ xr
            lam = RIDGE * max(np.trace(gram) / gram.shape[0], 1e-12)
            w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xr.T @ yr + lam * np.ones(gram.shape[0]))
            self.scale = [float(v) for v in np.clip(w, 0.05, 20.0)]
        z = [self.score(g) for g in genomes]
        self.blocks = isotonic(z, [e.drop for e in evs], weights)
        self.n_fit = len(items)

    def state_dict(self) -> dict:
        return {"names": self.names, "costs": self.costs, "source": self.source, "scale": self.scale,
                "blocks": [list(b) for b in self.blocks], "n_fit": self.n_fit}

    @classmethod
    def from_state(cls, state: dict) -> "Surrogate":
        s = cls(state["costs"], state["names"], state["source"])
        s.scale = [float(v) for v in state["scale"]]
        s.blocks = [tuple(b) for b in state["blocks"]]
        s.n_fit = int(state["n_fit"])
        return s


class SurrogateScreen:
    """``GeneticSearch.proposer``: screen thousands of plans on the surrogate, measure the best.

    ``gain_of(genome)``: the objective gain (exact, cheap); ``tolerance``: in metric units.
    Per generation: the plain GA's children seed a surrogate-only GA (``INNER_POPULATION`` x
    ``INNER_GENERATIONS`` plans, genomes already measured carry their real evaluation);
    the real candidates are the outer elites, then the unmeasured plans of best predicted
    fitness, then ``explore`` of the plain children not chosen (what the surrogate may
    misjudge gets measured too). On the surrogate, a plan of more gain than the best
    feasible one plus ``trust_radius`` counts as beyond the tolerance by its excess gain, and
    the picks are spread over that region's gains (a parallel line search toward the frontier).
    """

    def __init__(self, surrogate: Surrogate, gain_of: Callable[[Genome], float], tolerance: float,
                 penalty: float = 10.0, explore: int = 2):
        self.surrogate = surrogate
        self.gain_of = gain_of
        self.tol = tolerance
        self.penalty = penalty
        self.explore = explore
        self.screened = 0            # plans scored on the surrogate, in total
        self.base, self.radius = 0.0, math.inf  # the trust region: best feasible gain, how far beyond it
        self._gains: dict[Genome, float] = {}
        self._level_gains = None

    @property
    def limit(self) -> float:
        """The trust region's upper gain this generation."""
        return self.base + self.radius

    def _gain(self, g: Genome) -> float:
        if len(self._gains) > 100_000:
            self._gains.clear()
        if g not in self._gains:
            self._gains[g] = self.gain_of(g)
        return self._gains[g]

    def estimate(self, genomes: list[Genome]) -> list[Evaluation]:
        out = []
        for g in genomes:
            drop, gain = self.surrogate.predict(g), self._gain(g)
            if gain > self.limit:  # outside the trust region: as if beyond the tolerance by the excess
                drop = max(drop, self.tol + gain - self.limit)
            out.append(Evaluation(gain, math.nan, drop, drop <= self.tol, self.surrogate.score(g), False))
        self.screened += len(genomes)
        return out

    def __call__(self, ga: GeneticSearch, children: list[Genome]) -> list[Genome]:
        from ..sensitivity import lagrangian_genomes

        size = ga.config.population
        elites = children[:ga.config.elite]
        self.radius = trust_radius([r.best_gain for r in ga.history])
        self.base = 0.0 if ga.best_feasible is None else ga.evaluation(ga.best_feasible).gain
        # the surrogate's own best trades of cost for gain (exact for its additive part) start
        # the inner search beside the real population and the plain children
        sur = self.surrogate
        costs = {n: [s * c for c in sur.costs[n]] for s, n in zip(sur.scale, sur.names)}
        gains = {n: [self.gain_of(tuple(lv if m == n else 0 for m in sur.names)) for lv in range(ga.n_levels)]
                 for n in sur.names} if self._level_gains is None else self._level_gains
        self._level_gains = gains
        trades = lagrangian_genomes(costs, gains, sur.names, n=24)
        pool = max(INNER_POPULATION, 2 * size + 2)
        inner = GeneticSearch(ga.n_genes, ga.n_levels, self.estimate, self.tol,
                              GAConfig(population=pool, generations=INNER_GENERATIONS,
                                       elite=2, seed=ga.rng.getrandbits(32), penalty=self.penalty),
                              seeds=list(dict.fromkeys([*trades, *ga.population, *children]))[:pool - 1])
        inner.cache.update(ga.cache)  # measured plans are known, not guessed
        inner.run()
        scored = [(unkey(k), ev) for k, ev in inner.cache.items() if k not in ga.cache]
        scored.sort(key=lambda ge: (-fitness(ge[1], self.tol, self.penalty), ge[1].proxy, ge[0]))
        chosen = list(dict.fromkeys(elites))
        n_explore = min(self.explore, max(size - len(chosen) - 1, 0))
        # spread over the trust region: the i-th of n picks is the best plan predicted within
        # the tolerance whose gain is at most base + radius * i / n, so one generation brackets
        # the frontier instead of measuring n plans at the region's edge
        n_pick = size - n_explore - len(chosen)
        within = [g for g, ev in scored if ev.feasible]
        for i in range(n_pick, 0, -1):
            cap = self.base + self.radius * i / n_pick + 1e-12
            g = next((g for g in within if g not in chosen and self._gain(g) <= cap), None)
            if g is not None:
                chosen.append(g)
        for g, _ in scored:
            if len(chosen) >= size - n_explore:
                break
            if g not in chosen:
                chosen.append(g)
        for g in children:
            if len(chosen) >= size:
                break
            if g not in chosen and key(g) not in ga.cache:
                chosen.append(g)
        for g, _ in scored:  # tiny search spaces: fill up from the screened plans
            if len(chosen) >= size:
                break
            if g not in chosen:
                chosen.append(g)
        return chosen

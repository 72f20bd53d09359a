"""The surrogate-guided GA on a tiny model's matrices with a known synthetic drop function:
it finds the known optimum in fewer real evaluations than the plain GA, and resumes exactly."""
from __future__ import annotations

import math
import random

import pytest

from sieve_edge.ga import Evaluation, GAConfig, GeneticSearch, key
from sieve_edge.search import Budget, Ladder, ParamObjective, SearchConfig, SearchState
from sieve_edge.search.drivers import SearchContext, run_genetic
from sieve_edge.search.surrogate import TRUST_MIN, TRUST_START, Surrogate, SurrogateScreen, isotonic, trust_radius
from tiny import make_model

TOL = 0.01


class Problem:
    """The tiny llama's matrices on the default ladder, with a known drop function of the
    form the surrogate assumes: matrix m cut to level l costs ``units[m][l]`` (an integer
    number of 0.001-nat units of label KL, additive over matrices); a plan loses no accuracy
    up to a total of ``CAPACITY``, two points past it, and more the further it goes. The optimum (largest gain
    within the capacity) is a knapsack, solved exactly by dynamic programming. The costs
    the surrogate starts from (its "Fisher" estimates) are off by up to 3x per matrix."""

    CAPACITY = 40

    def __init__(self, seed: int = 0):
        from sieve_edge.factorize import linear_shapes

        self.shapes = linear_shapes(make_model())
        self.objective = ParamObjective(self.shapes)
        self.config = SearchConfig(tolerance=TOL, population=10, generations=40, multiple=2, seed=0)
        self.ladder = Ladder(self.shapes, self.config.ladder, self.config.multiple, self.objective)
        rng = random.Random(seed)
        n_levels = len(self.ladder.keeps)
        self.units = {}
        for n in self.ladder.names:
            w = rng.choice([0.5, 1, 2, 4, 8])
            self.units[n] = [0 if r is None else round(w * lv ** 1.5) for lv, r in enumerate(self.ladder.ranks[n])]
        self.estimate = {n: [0.001 * u * math.exp(rng.uniform(-1.1, 1.1)) for u in self.units[n]]
                         for n in self.ladder.names}
        for n in self.ladder.names:   # the per-matrix error, plus a little per level
            f = math.exp(rng.uniform(-1.1, 1.1))
            self.estimate[n] = [0.001 * u * f * math.exp(rng.uniform(-0.15, 0.15)) for u in self.units[n]]
        best = {0: 0.0}               # units used -> best gain
        for n in self.ladder.names:
            nxt = {}
            for used, g in best.items():
                for u, r in zip(self.units[n], self.ladder.ranks[n]):
                    if used + u <= self.CAPACITY:
                        v = g + self.objective.gain({n: r})
                        if v > nxt.get(used + u, -1.0):
                            nxt[used + u] = v
            best = nxt
        self.optimum = max(best.values())

    def level(self, name: str, rank) -> int:
        return self.ladder.ranks[name].index(rank) if rank is not None else 0


class SyntheticEvaluator:
    """The ``score(candidates, budget)`` seam with the known drop function; counts real
    evaluations and notes when the optimum was first measured."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.tol = TOL
        self.dense_seconds = 0.0
        self.calls = 0
        self.found_at = None

    def __call__(self, ranks) -> Evaluation:
        self.calls += 1
        used = sum(self.p.units[n][self.p.level(n, r)] for n, r in ranks.items())
        drop = 0.0 if used <= self.p.CAPACITY else 0.02 + 0.002 * (used - self.p.CAPACITY)
        gain = self.p.objective.gain(ranks)
        ev = Evaluation(gain, 0.9 - drop, drop, drop <= TOL + 1e-12, 0.001 * used, True, 0.0, 100)
        if ev.feasible and gain >= self.p.optimum - 1e-12 and self.found_at is None:
            self.found_at = self.calls
        return ev

    def score(self, candidates, budget=None):
        return [self(r) for r in candidates]

    def confirm(self, ranks):
        return self(ranks)


def search(surrogate: bool, state_path=None, generations: int | None = None, problem: Problem | None = None):
    p = problem or Problem()
    cfg = SearchConfig(**{**p.config.__dict__, "surrogate": surrogate,
                          **({} if generations is None else {"generations": generations})})
    ev = SyntheticEvaluator(p)
    store = SearchState(state_path, cfg.fingerprint())
    saved = store.load()
    ctx = SearchContext(cfg, p.ladder, p.objective, ev, store, Budget(None).start(),
                        Evaluation(0.0, 0.9, 0.0, True, 0.0, True), "accuracy", lambda msg: None)
    costs = None if saved else (p.estimate, "label-Fisher KL")
    return run_genetic(ctx, saved, costs), ev, p


def test_the_known_optimum_is_not_trivial():
    p = Problem()
    assert 0.1 < p.optimum < 0.9
    dense_all = sum(p.units[n][-1] for n in p.ladder.names)
    assert dense_all > 3 * p.CAPACITY     # cutting everything deepest is far from feasible


def test_surrogate_guided_ga_finds_the_known_optimum_in_fewer_real_evaluations():
    out_s, ev_s, p = search(surrogate=True)
    out_p, ev_p, _ = search(surrogate=False)
    assert ev_s.found_at is not None, "the surrogate-guided GA never measured the optimum"
    assert out_s.evaluation.gain == pytest.approx(p.optimum)
    plain = ev_p.found_at if ev_p.found_at is not None else ev_p.calls + 1
    assert ev_s.found_at < plain, (ev_s.found_at, plain)   # the same seed, seeding and generations


def _timeless(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_surrogate_guided_ga_is_deterministic():
    a, ev_a, _ = search(surrogate=True, generations=4)
    b, ev_b, _ = search(surrogate=True, generations=4)
    assert a.ranks == b.ranks and _timeless(a.history) == _timeless(b.history) and ev_a.calls == ev_b.calls


def test_resume_with_the_surrogate_is_exact(tmp_path, monkeypatch):
    # stop after generation 2 (the state holds the surrogate as fitted then), resume to 6
    import sieve_edge.search.drivers as D

    whole, ev_whole, _ = search(surrogate=True, generations=6)

    class Stop(Exception):
        pass

    def kill(stage, point):
        if point == "generation-2":
            raise Stop

    monkeypatch.setattr(D, "kill_point", kill)
    state = tmp_path / "state.json"
    with pytest.raises(Stop):
        search(surrogate=True, state_path=state, generations=6)
    monkeypatch.setattr(D, "kill_point", lambda stage, point: None)
    resumed, ev_resumed, _ = search(surrogate=True, state_path=state, generations=6)
    assert resumed.resumed_from == 2
    assert resumed.ranks == whole.ranks and _timeless(resumed.history) == _timeless(whole.history)
    assert resumed.frontier == whole.frontier


def test_isotonic_is_monotone_and_fits_the_mean():
    blocks = isotonic([0, 1, 2, 3], [0.0, 0.2, 0.1, 0.5], [1, 1, 1, 1])
    values = [b[2] for b in blocks]
    assert values == sorted(values) and values[1] == pytest.approx(0.15)


def test_surrogate_state_round_trips_and_refits_toward_measurements():
    p = Problem()
    s = Surrogate(p.estimate, p.ladder.names)
    rng = random.Random(1)
    measured = {}
    ev = SyntheticEvaluator(p)
    for _ in range(40):
        g = tuple(rng.randrange(len(p.ladder.keeps)) for _ in p.ladder.names)
        measured[key(g)] = ev(p.ladder.to_ranks(g))
    before = sum(abs(math.log(s.score(g) / m.proxy)) for g, m in
                 ((tuple(map(int, k.split(","))), m) for k, m in measured.items()) if m.proxy > 0)
    s.fit(measured)
    after = sum(abs(math.log(max(s.score(g), 1e-30) / m.proxy)) for g, m in
                ((tuple(map(int, k.split(","))), m) for k, m in measured.items()) if m.proxy > 0)
    assert after < before                                  # the scales learned the estimates' errors
    t = Surrogate.from_state(s.state_dict())
    g = tuple(rng.randrange(len(p.ladder.keeps)) for _ in p.ladder.names)
    assert t.predict(g) == s.predict(g) and t.score(g) == s.score(g)


def test_screen_returns_a_full_generation_of_distinct_unmeasured_plans():
    p = Problem()
    s = Surrogate(p.estimate, p.ladder.names)
    screen = SurrogateScreen(s, lambda g: p.objective.gain(p.ladder.to_ranks(g)), TOL)
    ga = GeneticSearch(len(p.ladder.names), len(p.ladder.keeps), None, TOL, GAConfig(population=8, seed=0))
    ev = SyntheticEvaluator(p)
    todo = ga.unscored(ga.ask())
    ga.tell(todo, [ev(p.ladder.to_ranks(g)) for g in todo])
    ga.proposer = screen
    nxt = ga.ask()
    assert len(nxt) == 8 == len(set(nxt))
    assert screen.screened > 500                          # it looked at many more plans than it asks for
    assert sum(key(g) not in ga.cache for g in nxt) >= 8 - ga.config.elite


def test_trust_radius_widens_after_a_better_plan_and_narrows_after_none():
    assert trust_radius([]) == trust_radius([0.3]) == TRUST_START
    assert trust_radius([0.3, 0.3]) == pytest.approx(TRUST_START / 2)
    assert trust_radius([0.3, 0.3, 0.4]) == pytest.approx(TRUST_START)
    assert trust_radius([None, 0.2]) == pytest.approx(2 * TRUST_START)   # the first feasible plan is progress
    assert trust_radius([0.3] * 30) == TRUST_MIN


def test_screen_proposes_within_the_trust_region_when_the_surrogate_sees_no_cost():
    """A surrogate that predicts no drop for any plan (the worst underestimate) would have the
    screen propose the deepest plans; within the trust region it proposes plans of at most the
    best measured feasible gain plus the radius, spread over that range, save the elites and
    the exploration children."""
    p = Problem()
    zero = {n: [0.0] * len(p.ladder.keeps) for n in p.ladder.names}
    gain_of = lambda g: p.objective.gain(p.ladder.to_ranks(g))  # noqa: E731
    screen = SurrogateScreen(Surrogate(zero, p.ladder.names), gain_of, TOL, explore=2)
    ga = GeneticSearch(len(p.ladder.names), len(p.ladder.keeps), None, TOL, GAConfig(population=10, seed=0))
    ev = SyntheticEvaluator(p)
    todo = ga.unscored(ga.ask())
    ga.tell(todo, [ev(p.ladder.to_ranks(g)) for g in todo])
    best = ga.cache[key(ga.best_feasible)].gain
    ga.proposer = screen
    children = ga._breed()
    ga.rng.seed(1)
    proposed = screen(ga, children)
    assert screen.limit == pytest.approx(best + TRUST_START)
    free = set(children)   # the elites and the exploration picks are plain children
    screened = [g for g in proposed if g not in free]
    assert len(screened) >= 10 - ga.config.elite - 2
    gains = sorted(gain_of(g) for g in screened)
    assert gains[-1] <= best + TRUST_START + 1e-9
    assert gains[0] < best + TRUST_START / 2 < gains[-1]  # spread over the region, not all at its edge
    deepest = gain_of(tuple([len(p.ladder.keeps) - 1] * len(p.ladder.names)))
    assert deepest > best + 2 * TRUST_START     # the region excluded something the surrogate would pick

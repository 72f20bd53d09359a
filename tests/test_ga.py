"""GA mechanics on a synthetic fitness: no model, milliseconds per run."""
from __future__ import annotations

import json

import pytest

from sieve_edge.errors import InputError
from sieve_edge.ga import Evaluation, GAConfig, GeneticSearch, fitness, key

N_GENES, N_LEVELS, TOL = 12, 5, 0.05
# Uneven sensitivities, like real matrices: a few "bottlenecks" cost a lot per level.
SENS = [0.001, 0.002, 0.03, 0.001, 0.004, 0.02, 0.0015, 0.001, 0.05, 0.002, 0.003, 0.001]
SIZE = [4, 1, 2, 4, 1, 1, 2, 4, 1, 2, 1, 4]


def synthetic(genomes):
    """Gain = size-weighted share of levels cut; drop = sum of sensitivity x level^1.5."""
    out = []
    for g in genomes:
        gain = sum(s * lv for s, lv in zip(SIZE, g)) / (sum(SIZE) * (N_LEVELS - 1))
        drop = sum(s * lv ** 1.5 for s, lv in zip(SENS, g))
        out.append(Evaluation(gain=gain, metric=0.9 - drop, drop=drop, feasible=drop <= TOL, proxy=drop))
    return out


def run(seed=0, generations=8, **kw):
    ga = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, GAConfig(population=10, generations=generations,
                                                                   seed=seed, **kw))
    best = ga.run()
    return ga, best


def test_deterministic_for_a_seed():
    a, best_a = run(seed=3)
    b, best_b = run(seed=3)
    assert best_a == best_b
    assert [r.best_fitness for r in a.history] == [r.best_fitness for r in b.history]
    c, best_c = run(seed=4)
    assert a.population != c.population  # the seed matters


def test_best_never_violates_tolerance_and_improves_on_dense():
    for seed in range(4):
        ga, best = run(seed=seed)
        ev = ga.evaluation(best)
        assert ev.feasible and ev.full and ev.drop <= TOL
        assert ev.gain > 0.3
        # the best is the best feasible of everything ever scored
        assert ev.gain == max(e.gain for _, e in ga.frontier() if e.feasible)


def test_infeasible_everywhere_but_dense_returns_dense():
    def harsh(genomes):
        return [Evaluation(gain=sum(g) / 100, metric=0.0, drop=0.0 if not any(g) else 1.0,
                           feasible=not any(g)) for g in genomes]

    ga = GeneticSearch(N_GENES, N_LEVELS, harsh, TOL, GAConfig(population=6, generations=3))
    assert ga.run() == (0,) * N_GENES


def test_elitism_keeps_the_best():
    ga = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, GAConfig(population=10, generations=10, elite=2))
    best_so_far = -1.0
    while not ga.done():
        ga.step()
        fits = [fitness(ga.evaluation(g), TOL, ga.config.penalty) for g in ga.population]
        assert max(fits) >= best_so_far - 1e-12      # the population's best never gets worse
        best_so_far = max(fits)
        assert ga.best_feasible in ga.population     # the best feasible genome survives


def test_seeds_enter_the_initial_population():
    seed = tuple([1] * N_GENES)
    ga = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, GAConfig(population=6, generations=0), seeds=[seed])
    ga.run()
    assert seed in ga.population and (0,) * N_GENES in ga.population


def test_cache_avoids_rescoring():
    calls = []

    def counting(genomes):
        calls.extend(genomes)
        return synthetic(genomes)

    ga = GeneticSearch(N_GENES, N_LEVELS, counting, TOL, GAConfig(population=8, generations=6))
    ga.run()
    assert len(calls) == len(set(calls)) == len(ga.cache)


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [0, 3])
def test_resume_after_forced_stop_equals_uninterrupted(stop_after):
    cfg = GAConfig(population=10, generations=7, seed=11)
    full = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, cfg)
    best_full = full.run()

    saved = {}

    def checkpoint(ga):
        saved["state"] = json.loads(json.dumps(ga.state_dict()))  # through JSON, as on disk
        if ga.generation == stop_after:
            raise Stop

    first = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, cfg)
    with pytest.raises(Stop):
        first.run(on_generation=checkpoint)

    # a fresh process: new object, state from "disk"; the half-bred generation is redone
    resumed = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, cfg)
    resumed.load_state_dict(saved["state"])
    assert resumed.run() == best_full
    assert resumed.population == full.population
    assert [r.best_fitness for r in resumed.history] == [r.best_fitness for r in full.history]


def test_state_mismatch_is_an_error():
    ga, _ = run(generations=1)
    other = GeneticSearch(N_GENES + 1, N_LEVELS, synthetic, TOL, GAConfig())
    with pytest.raises(InputError, match="genes"):
        other.load_state_dict(ga.state_dict())


def test_stall_stops_early():
    ga, _ = run(generations=50, stall=2)
    assert ga.generation < 50


@pytest.mark.parametrize("kwargs", [dict(population=1), dict(elite=10, population=10), dict(crossover=1.5),
                                    dict(mutation=0.0), dict(tournament=0), dict(generations=-1)])
def test_bad_settings(kwargs):
    with pytest.raises(InputError, match="bad genetic-search setting"):
        GAConfig(**kwargs)


def test_bad_seed_genome():
    with pytest.raises(InputError, match="seed genome"):
        GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, seeds=[(9,) * N_GENES])


def test_key_roundtrip():
    from sieve_edge.ga import unkey
    g = (0, 3, 1)
    assert unkey(key(g)) == g


def test_ask_tell_in_parts_with_a_resume_inside_each_generation_equals_run():
    cfg = GAConfig(population=10, generations=6, seed=5)
    full = GeneticSearch(N_GENES, N_LEVELS, synthetic, TOL, cfg)
    best_full = full.run()

    ga = GeneticSearch(N_GENES, N_LEVELS, None, TOL, cfg)
    resumes = 0
    while not ga.done():
        todo = ga.unscored(ga.ask())
        assert ga.ask() == ga.ask()                       # asking again hands out the same generation
        half = len(todo) // 2
        if ga.tell(todo[:half], synthetic(todo[:half])) is not None:
            continue                                      # nothing was left to score
        # a new process in the middle of the generation: the state (through JSON) breeds it again
        # and finds the first half in the cache
        state = json.loads(json.dumps(ga.state_dict()))
        ga = GeneticSearch(N_GENES, N_LEVELS, None, TOL, cfg)
        ga.load_state_dict(state)
        rest = ga.unscored(ga.ask())
        assert rest == todo[half:]
        record = ga.tell(rest, synthetic(rest))
        assert record is not None and record.evaluations == len(rest)
        resumes += 1
    assert resumes >= 5
    assert ga.best_feasible == best_full
    assert [r.best_fitness for r in ga.history] == [r.best_fitness for r in full.history]
    with pytest.raises(ValueError, match="without one, use ask"):
        ga.step()

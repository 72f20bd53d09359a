"""Refit tries (sieve_edge.search.climb): which larger measured plans are refit, which is kept."""
import pytest

from sieve_edge.errors import ArtifactError
from sieve_edge.search.climb import Candidate, candidates, climb


def plans(*gain_drop):
    return [Candidate({"m": i}, g, 0.9 - d, d, True) for i, (g, d) in enumerate(gain_drop)]


def run(cands, refit, *, start_gap=0.02, start_drop=0.01, tolerance=0.05, tries=8, **kw):
    tried, kept = [], []

    def refit_drop(c):
        tried.append(c.gain)
        return refit(c)

    best, record = climb(sorted(cands, key=lambda c: -c.gain), start_gain=0.3, start_gap=start_gap,
                         start_drop=start_drop, tolerance=tolerance, tries=tries, refit_drop=refit_drop,
                         keep=lambda c: kept.append(c.gain), **kw)
    return best, record, tried, kept


@pytest.mark.parametrize("passes_up_to", [0.31, 0.35, 0.45, 0.6, 0.9])
def test_keeps_the_largest_plan_whose_refit_passes_when_refits_pass_up_to_a_gain(passes_up_to):
    """Every plan is expected to pass (a large gap); refits pass up to ``passes_up_to`` and miss beyond:
    the climb keeps the largest plan that passes, never one that failed, and every plan kept
    was passed to ``keep`` in increasing order."""
    cands = plans(*[(g, 0.03 + (g - 0.3)) for g in (0.32, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.9)])
    best, record, tried, kept = run(cands, lambda c: 0.01 if c.gain <= passes_up_to else 0.2, start_gap=5.0)
    want = max((c.gain for c in cands if c.gain <= passes_up_to), default=None)
    assert (best.gain if best else None) == want
    assert all(t["passed"] == (t["drop"] <= 0.05) for t in record)
    assert kept == sorted(kept) and (kept[-1] if kept else None) == want
    assert all(t["gain"] <= passes_up_to for t in record if t["passed"])


def test_the_first_try_is_the_largest_plan_expected_to_pass_and_the_gap_is_relearned():
    """Expected drop = searched drop − mean refit gap: with a gap of 0.02 and a tolerance of
    0.05 only plans searched at ≤ 0.07 are expected; a try whose refit drops far less than its
    searched drop widens the gap, which makes larger plans expected."""
    cands = plans((0.35, 0.06), (0.4, 0.07), (0.5, 0.12), (0.6, 0.2))
    best, record, tried, _ = run(cands, lambda c: 0.01, start_gap=0.02, tries=1)
    assert tried == [0.4] and best.gain == 0.4 and record[0]["best_bet"] is False
    assert record[0]["predicted_drop"] == pytest.approx(0.05)
    # gap 0.06: 0.5 (0.06) not expected, 0.4 is
    assert run(cands, lambda c: 0.01, start_gap=0.06, tries=1)[2] == [0.4]
    # gap 0.1: 0.5 (0.02) expected, 0.6 (0.1) not
    assert run(cands, lambda c: 0.01, start_gap=0.1, tries=1)[2] == [0.5]
    # gap 0.16: 0.6 (0.04), the largest
    assert run(cands, lambda c: 0.01, start_gap=0.16, tries=1)[2] == [0.6]
    # relearned: after 0.4 (gap 0.06), the mean of (0.02, 0.06) = 0.04 makes 0.5 (0.12 - 0.04 = 0.08)
    # not expected; with start gap 0.06 the mean of (0.06, 0.06) makes it 0.06, still not; with
    # 0.1 first, 0.5 passes (gap 0.11), mean 0.105: 0.6 (0.095) not expected, a bisection (0.6 alone)
    _, record, tried, _ = run(cands, lambda c: 0.01, start_gap=0.1, tries=2)
    assert tried == [0.5, 0.6] and [t["best_bet"] for t in record] == [False, True]


@pytest.mark.parametrize("bound", [False, True])
def test_a_start_gap_measured_otherwise_leaves_the_mean_once_a_try_measured_one(bound):
    """Healed tries, an unhealed start: the start's gap (0.02) picks the first try (0.4,
    expected 0.05), whose refit drops 0.005 (a gap of 0.065). As a bound the start gap then
    leaves the mean: 0.5 (searched 0.11) is expected at 0.045, a plan expected to pass; kept in
    the mean (0.0425) it is expected at 0.0675, tried only as a bisection."""
    cands = plans((0.4, 0.07), (0.5, 0.11), (0.6, 0.2))
    _, record, tried, _ = run(cands, lambda c: 0.005, tries=2, start_gap_bound=bound)
    assert tried == [0.4, 0.5]
    assert record[1]["predicted_drop"] == pytest.approx(0.045 if bound else 0.0675)
    assert record[1]["best_bet"] is (not bound)


def test_a_failed_try_bounds_the_next_from_above_and_tries_are_capped():
    cands = plans((0.35, 0.0), (0.4, 0.0), (0.45, 0.0), (0.5, 0.0), (0.6, 0.0))
    best, record, tried, kept = run(cands, lambda c: 0.01 if c.gain < 0.45 else 0.2, start_gap=5.0)
    assert tried == [0.6, 0.5, 0.45, 0.4] and best.gain == 0.4 and kept == [0.4]
    best, record, tried, kept = run(cands, lambda c: 0.2, start_gap=5.0, tries=2)
    assert tried == [0.6, 0.5] and best is None and kept == [] and len(record) == 2


def test_when_no_plan_is_expected_the_climb_bisects_between_passed_and_failed():
    """A try whose refit drops more than the search measured (a negative gap) leaves no plan
    expected to pass; the climb then bisects between the largest passed (the searched 0.3)
    and the smallest failed (0.5): the plan nearest 0.4, 0.4 itself, which fails too; then
    0.35, the one left below it."""
    cands = plans((0.35, 0.0), (0.4, 0.0), (0.5, 0.0))
    best, record, tried, _ = run(cands, lambda c: 0.2, start_gap=0.0)
    assert tried == [0.5, 0.4, 0.35] and best is None and record[0]["predicted_drop"] == 0.0
    assert [t["best_bet"] for t in record] == [False, True, True]
    # a plan that passes in between is kept, and the bisection goes on above it
    best, record, tried, _ = run(plans((0.35, 0.0), (0.4, 0.0), (0.45, 0.0), (0.5, 0.0)),
                                 lambda c: 0.01 if c.gain <= 0.4 else 0.2, start_gap=0.0)
    assert tried == [0.5, 0.4, 0.45] and best.gain == 0.4


def test_nothing_expected_at_first_the_climb_bisects_on_the_gain():
    """No plan is expected from the start (searched drops far beyond the tolerance): the climb
    still refits, by bisection on the gain (the reviews_long case: a 64.2% plan searched 12.7
    points down refit within 1.3), and keeps what passes; nothing passing keeps nothing."""
    cands = plans((0.4, 0.3), (0.5, 0.5))
    best, record, tried, _ = run(cands, lambda c: 0.01, start_gap=0.0)
    assert tried == [0.4, 0.5] and best.gain == 0.5 and all(t["best_bet"] for t in record)
    best, record, tried, kept = run(cands, lambda c: 0.2, start_gap=0.0)
    assert tried == [0.4] and best is None and kept == []
    assert run(cands, lambda c: 0.01, start_gap=0.0, tries=0)[2] == []


def test_after_a_refit_at_the_dense_metric_the_climb_bisects_on_the_gain():
    """The searched plan's refit scored the dense metric (drop 0): its gap of 0.01 is only a
    lower bound and no plan is expected to pass, so the climb bisects on the gain: the plan
    nearest halfway between 0.3 and the largest left (0.9), 0.6; it passes at the dense
    metric again, so next the one nearest (0.6 + 0.9) / 2, 0.78, which loses 0.2; then the one
    left between 0.6 and 0.78, 0.7, which passes."""
    cands = plans((0.35, 0.09), (0.4, 0.08), (0.6, 0.3), (0.7, 0.3), (0.78, 0.3), (0.9, 0.5))
    best, record, tried, kept = run(cands, lambda c: {0.6: 0.0, 0.78: 0.2, 0.7: 0.03}[c.gain], start_gap=0.01,
                                    start_drop=0.0, tries=4)
    assert tried == [0.6, 0.78, 0.7] and best.gain == 0.7 and kept == [0.6, 0.7]
    assert [t["best_bet"] for t in record] == [True, True, True] and record[1]["passed"] is False
    # equally near: the smaller searched drop, then the smaller gain
    best, record, tried, _ = run(plans((0.5, 0.3), (0.7, 0.2), (0.9, 0.5)), lambda c: 0.2, start_gap=0.01,
                                 start_drop=0.0, tries=3)
    assert tried == [0.7, 0.5] and best is None  # 0.7 first; then the one left below it
    # a searched plan whose refit kept a drop (> 0) is not capped, but no plan is expected: the same bisection
    best, record, tried, _ = run(cands, lambda c: 0.0, start_gap=0.01, start_drop=0.001, tries=1)
    assert tried == [0.6] and record[0]["best_bet"] is True


def test_after_a_refit_at_the_dense_metric_bisection_goes_past_a_short_expected_step():
    """sms_spam's shape: the searched plan refit at the dense metric, and a plan just above it is
    expected to pass (0.35: 0.04 - 0.01). The gap is a lower bound there, so the climb bisects
    past that short step to the plan nearest (0.3 + 0.9) / 2 = 0.6; that refit lost 0.02 (not
    capped) and 0.9 is not expected (0.5 minus the mean gap 0.145 is beyond 0.05): the
    bisection above 0.6 leaves 0.9 alone, which fails."""
    cands = plans((0.35, 0.04), (0.4, 0.3), (0.6, 0.3), (0.9, 0.5))
    best, record, tried, kept = run(cands, lambda c: 0.02 if c.gain < 0.8 else 0.2, start_gap=0.01,
                                    start_drop=0.0, tries=4)
    assert tried[0] == 0.6 and record[0]["best_bet"] is True and best.gain == 0.6
    assert tried == [0.6, 0.9] and kept == [0.6]


def test_after_a_refit_at_the_dense_metric_a_larger_expected_plan_is_tried_first():
    """When the expected plan is the larger step, it is tried, not the bisection's plan."""
    cands = plans((0.35, 0.0), (0.6, 0.3), (0.9, 0.04))
    best, record, tried, _ = run(cands, lambda c: 0.01, start_gap=0.01, start_drop=0.0, tries=1)
    assert tried == [0.9] and record[0]["best_bet"] is False and best.gain == 0.9


def test_candidates_come_from_the_measured_record_above_the_searched_gain():
    measured = {"names": ["a", "b"], "plans": [
        {"ranks": [4, None], "gain": 0.5, "metric": 0.8, "drop": 0.1, "feasible": False, "full": False, "rows": 12},
        {"ranks": [8, 8], "gain": 0.3, "metric": 0.85, "drop": 0.05, "feasible": True, "full": True, "rows": 40},
        {"ranks": [2, 2], "gain": 0.7, "metric": 0.6, "drop": 0.3, "feasible": False, "full": True, "rows": 40}]}
    got = candidates(measured, 0.3)
    assert [c.gain for c in got] == [0.7, 0.5]
    assert got[1].ranks == {"a": 4, "b": None} and not got[1].full
    with pytest.raises(ArtifactError, match=r"out/result.json.*'measured'.*rerun the search stage"):
        candidates(None, 0.3, "out/result.json")


def made_halfway(calls):
    """A ``make`` for plans whose ranks are {"m": gain}: the plan of gain ``target`` exactly."""
    def make(low, high, target):
        calls.append((low["m"], high["m"], target))
        return {"m": target}, target
    return make


def climb_with_make(cands, refit, tries=8, start_drop=0.01):
    calls, tried = [], []
    best, record = climb(sorted(cands, key=lambda c: -c.gain), start_gain=0.3, start_gap=0.0, start_drop=start_drop,
                         tolerance=0.05, tries=tries, refit_drop=lambda c: tried.append(c.gain) or refit(c),
                         start_ranks={"m": 0.3}, make=made_halfway(calls))
    return best, record, tried, calls


def test_with_nothing_measured_between_passed_and_failed_the_climb_makes_the_plan_halfway():
    """sms_spam at 1 point: nothing measured between the searched plan (passed) and 0.9
    (failed). The climb makes the plan halfway between the largest passed and the smallest
    failed, from their ranks, and bisects so until the interval is narrower than twice
    RESOLUTION; made plans have no searched or expected drop, and refits up to 0.52 pass."""
    best, record, tried, calls = climb_with_make([Candidate({"m": 0.9}, 0.9, 0.5, 0.4, True)],
                                                 lambda c: 0.01 if c.gain <= 0.52 else 0.2)
    assert tried == pytest.approx([0.9, 0.6, 0.45, 0.525, 0.4875, 0.50625])
    assert best.gain == pytest.approx(0.50625) and best.made and best.ranks == {"m": best.gain}
    assert calls[:2] == [(0.3, 0.9, pytest.approx(0.6)), (0.3, 0.6, pytest.approx(0.45))]
    assert [t["made"] for t in record] == [False] + [True] * 5
    assert all(t["search_drop"] is None and t["predicted_drop"] is None and t["best_bet"] for t in record[1:])
    # without ``make`` (or the searched plan's ranks) the climb ends after 0.9, as before
    best, record = climb([Candidate({"m": 0.9}, 0.9, 0.5, 0.4, True)], start_gain=0.3, start_gap=0.0,
                         start_drop=0.01, tolerance=0.05, tries=8, refit_drop=lambda c: 0.2, make=made_halfway([]))
    assert len(record) == 1 and best is None


def test_a_measured_plan_in_the_middle_half_is_tried_before_a_made_one():
    """Between 0.3 (passed) and 0.9 (expected, tried first, failed): a measured 0.5 lies in the
    middle half (0.45 to 0.75) and is tried; a measured 0.32 alone does not, so the plan is
    made at 0.6."""
    refit = {0.9: 0.2}
    cands = [Candidate({"m": g}, g, 0.5, d, True) for g, d in ((0.9, 0.04), (0.5, 0.4))]
    _, record, tried, _ = climb_with_make(cands, lambda c: refit.get(c.gain, 0.01), tries=2)
    assert tried == [0.9, 0.5] and not record[1]["made"]
    cands = [Candidate({"m": g}, g, 0.5, d, True) for g, d in ((0.9, 0.04), (0.32, 0.4))]
    _, record, tried, _ = climb_with_make(cands, lambda c: refit.get(c.gain, 0.01), tries=2)
    assert tried == pytest.approx([0.9, 0.6]) and record[1]["made"]


def test_made_tries_do_not_teach_the_gap():
    """A made plan has no searched drop: its try leaves the mean gap as it was. 0.9 (expected:
    searched 0.04) fails at 0.2, a gap of -0.16, mean -0.08; 0.8 (searched 0.3) lies outside
    the middle half of 0.3..0.9, so 0.6 is made and passes; then 0.8, in the middle half of
    0.6..0.9, is tried, expected at 0.3 + 0.08 with the gap the made try left alone."""
    cands = [Candidate({"m": g}, g, 0.5, d, True) for g, d in ((0.9, 0.04), (0.8, 0.3))]
    _, record, tried, _ = climb_with_make(cands, lambda c: 0.2 if c.gain > 0.7 else 0.01, tries=3)
    assert tried == pytest.approx([0.9, 0.6, 0.8]) and [t["made"] for t in record] == [False, True, False]
    assert record[2]["predicted_drop"] == pytest.approx(0.38)


def test_between_moves_every_matrix_from_one_plan_toward_the_other():
    """``between`` on real shapes: the plan's gain is near the target and strictly between the
    two plans', every matrix keeps a fraction between its two ends (up to rounding to the
    multiple), a dense matrix in one plan may become factorized, and equal plans give None."""
    from sieve_edge.lowrank import keep_of_rank
    from sieve_edge.search.climb import between
    from sieve_edge.search.objectives import ParamObjective

    shapes = {"q": (576, 576), "up": (1536, 576), "down": (576, 1536), "o": (576, 576)}
    low = {"q": 192, "up": None, "down": 256, "o": 64}
    high = {"q": 32, "up": 64, "down": 64, "o": 128}
    gain = ParamObjective(shapes).gain
    for target in (0.45, 0.6, 0.7):
        ranks, g = between(shapes, 8, low, high, target)
        assert g == pytest.approx(gain(ranks)) and gain(low) < g < gain(high)
        assert abs(g - target) < 0.01
        for n, (m, k) in shapes.items():
            a, b, x = (keep_of_rank(m, k, r[n]) for r in (low, high, ranks))
            assert min(a, b) - 8 * (m + k) / (m * k) <= x <= max(a, b) + 8 * (m + k) / (m * k)
            assert x is not None and (ranks[n] is None or ranks[n] % 8 == 0)
        assert ranks["up"] is not None  # dense in low, factorized on the way
    assert between(shapes, 8, low, low, 0.5) is None
    assert between(shapes, 8, low, high, 0.6) == between(shapes, 8, low, high, 0.6)


def test_between_moves_whole_matrices_when_rounding_leaves_nothing_in_between():
    """Two plans one rung apart on two matrices: every shared step rounds to one of them, so
    whole matrices move instead, one at a time; one matrix moved lies between the two."""
    from sieve_edge.search.climb import between
    from sieve_edge.search.objectives import ParamObjective

    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    low, high = {"a": 4, "b": 4, "c": 2}, {"a": 2, "b": 2, "c": 2}
    ranks, g = between(shapes, 2, low, high, 0.9)
    gain = ParamObjective(shapes).gain
    assert ranks == {"a": 2, "b": 4, "c": 2} and gain(low) < g == gain(ranks) < gain(high)

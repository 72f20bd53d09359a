"""Refit tries (sieve_edge.search.climb): which larger measured plans are refit, which is kept."""
import pytest

from sieve_edge.errors import ArtifactError
from sieve_edge.search.climb import Candidate, candidates, climb


def plans(*gain_drop):
    return [Candidate({"m": i}, g, 0.9 - d, d, True) for i, (g, d) in enumerate(gain_drop)]


def run(cands, refit, *, start_gap=0.02, start_drop=0.01, tolerance=0.05, tries=8):
    tried, kept = [], []

    def refit_drop(c):
        tried.append(c.gain)
        return refit(c)

    best, record = climb(sorted(cands, key=lambda c: -c.gain), start_gain=0.3, start_gap=start_gap,
                         start_drop=start_drop, tolerance=tolerance, tries=tries, refit_drop=refit_drop, keep=lambda c: kept.append(c.gain))
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


def test_a_failed_try_bounds_the_next_from_above_and_tries_are_capped():
    cands = plans((0.35, 0.0), (0.4, 0.0), (0.45, 0.0), (0.5, 0.0), (0.6, 0.0))
    best, record, tried, kept = run(cands, lambda c: 0.01 if c.gain < 0.45 else 0.2, start_gap=5.0)
    assert tried == [0.6, 0.5, 0.45, 0.4] and best.gain == 0.4 and kept == [0.4]
    best, record, tried, kept = run(cands, lambda c: 0.2, start_gap=5.0, tries=2)
    assert tried == [0.6, 0.5] and best is None and kept == [] and len(record) == 2


def test_when_no_plan_is_expected_the_climb_bisects_between_passed_and_failed():
    """A try whose refit drops more than the search measured (a negative gap) leaves no plan
    expected to pass; the climb then bisects between the largest passed (the searched 0.3)
    and the smallest failed (0.5): the plan nearest (0.3 + 0.4) / 2, 0.35, which fails too."""
    cands = plans((0.35, 0.0), (0.4, 0.0), (0.5, 0.0))
    best, record, tried, _ = run(cands, lambda c: 0.2, start_gap=0.0)
    assert tried == [0.5, 0.35] and best is None and record[0]["predicted_drop"] == 0.0
    assert [t["best_bet"] for t in record] == [False, True]


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

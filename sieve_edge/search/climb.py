"""Refit tries: after the search, larger plans it measured are refit with the final method,
and the largest whose refit stays within the tolerance is kept.

Why: the search scores ``output`` factors (every matrix projected on the dense model's own
activations, one decomposition shared by all candidates), while the checkpoint is refit with
``sieve`` (each matrix fit on the inputs the already-pruned layers below it produce). The
sequential fit absorbs part of the error the layers below make, so its score at the same
ranks is often higher than the one the search saw, and the searched plan then leaves part of
the tolerance unused. Each try is a whole refit (a calibration pass and a sequential fit),
far more than a candidate's evaluation, so the tries are few and chosen by prediction:

- the refit gap of a plan is its searched drop minus its refit drop; the first is measured on
  the searched plan, every try adds one;
- the next try is the largest untried plan between the largest that passed (the searched
  plan at first) and the smallest that failed whose searched drop minus the mean gap so far
  is within the tolerance (a racing estimate stands in for a drop the search did not score
  in full: the refit is scored on the whole split anyway);
- when no plan is expected to pass, the climb bisects on the gain instead of stopping: it
  tries the plan nearest halfway between the largest that passed and the smallest that
  failed (the largest left to try while none has failed). The searched drops of larger
  plans say little about their refits: on sms_spam a 90% plan whose searched factors fell
  to the majority class refit to within 1.3 points; on reviews_long a 64.2% plan searched at
  12.7 points refit to 1.3, better than the searched 62.9% plan's 3.3;
- right after a refit that scored the dense metric (or better), whose gap is only a lower
  bound, it bisects too unless the expected plan is larger still: the mean gap is then an
  underestimate and its expected plan a short step (on sms_spam at 5 points the climb went
  32.5% -> 35.2% -> 42.6% -> 90.1%, every refit before the last at the dense metric);
- between the largest plan that passed and the smallest that failed, the search may have
  measured nothing near the middle (on sms_spam at 1 point: nothing between 42.8%, passed,
  and 90.0%, failed). The climb then makes the plan halfway itself (``between``): per
  matrix, the kept fraction moves from the passed plan's toward the failed plan's by one
  shared step, chosen so that the plan removes the middle of the two gains. Such a plan has
  no searched drop, so it is never expected to pass, only tried as a bisection, and its try
  teaches the gap nothing. It is made when no untried measured plan lies in the middle half
  of that interval, and only while the interval is wider than twice ``RESOLUTION``;
- with ``--heal-steps`` the tries are healed before they are judged but the searched plan's
  refit is not: its gap only bounds a healed one from below, so it guides the first try and
  leaves the mean once a try has measured a gap;
- ``tries`` refits, or no plan left between the largest passed and the smallest failed,
  end it. A plan whose refit misses the tolerance is never kept, so a wrong guess costs
  one refit's time, not accuracy.

This module holds the choice; the climb stage does the refits (``ClimbStage``), starting
from the fit stage's refit of the searched plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ArtifactError

# The choice rule's version: the climb stage's key carries it, so finished tries an older
# rule chose are redone, not reused. 2: bisects on the gain when no plan is expected to pass
# (1 stopped there); 3: bisects toward the smallest plan that failed, and makes a plan
# halfway when the search measured none near there; 4: a start gap measured otherwise than
# the tries' (healed tries, an unhealed start) leaves the mean once a try measured a gap.
RULE = 4
# a plan made between two tries lies at least this far (in gain) from each
RESOLUTION = 0.01


@dataclass
class Candidate:
    """A plan the search measured (its ranks, objective gain and searched drop), or one the
    climb made between two tries (``made``: no searched metric or drop)."""

    ranks: dict[str, int | None]
    gain: float
    metric: float | None  # the searched validation metric; an estimate when not ``full``
    drop: float | None    # the same in the tolerance's units (dense minus metric)
    full: bool
    made: bool = False


def candidates(measured: dict | None, above: float, where: str = "result.json") -> list[Candidate]:
    """The plans of a search result's ``measured`` record with a gain above ``above``, largest
    gain first (the smaller searched drop first among equal gains)."""
    if not measured or "names" not in measured or "plans" not in measured:
        raise ArtifactError(f"{where}: the search result lists no measured plans ('measured'); it was written by "
                            "an older sieve-edge: rerun the search stage (it resumes its finished state)")
    names = measured["names"]
    out = [Candidate(dict(zip(names, p["ranks"])), float(p["gain"]), float(p["metric"]), float(p["drop"]),
                     bool(p["full"]))
           for p in measured["plans"] if p["gain"] > above]
    out.sort(key=lambda c: (-c.gain, c.drop))
    return out


def between(shapes: dict[str, tuple[int, int]], multiple: int, low: dict[str, int | None],
            high: dict[str, int | None], target: float) -> tuple[dict[str, int | None], float] | None:
    """(ranks, parameter gain) of the plan between ``low`` and ``high`` whose gain is nearest
    ``target``, or None when every such plan equals one of the two.

    Per matrix the kept fraction moves from ``low``'s toward ``high``'s by the same share t
    (a matrix dense in one plan keeps 1.0 there), and the rank is the one keeping that
    fraction, rounded to ``multiple`` (None: dense). Before rounding the parameters kept are
    linear in t, so t is found by bisection. When rounding leaves no t whose plan differs from
    both (few matrices differ by a rung or two), whole matrices take ``high``'s rank one more
    at a time instead, in the order of ``shapes``."""
    from ..lowrank import keep_of_rank, rank_for_keep
    from .objectives import ParamObjective

    objective = ParamObjective(shapes)
    ends = {n: (keep_of_rank(m, k, low.get(n)), keep_of_rank(m, k, high.get(n))) for n, (m, k) in shapes.items()}

    def at(t: float) -> dict[str, int | None]:
        return {n: rank_for_keep(m, k, min(1.0, a + t * (b - a)), multiple)
                for n, (m, k) in shapes.items() for a, b in [ends[n]]}

    g_low, g_high = objective.gain(low), objective.gain(high)
    if abs(g_high - g_low) < 1e-12:
        return None
    lo, hi, seen = 0.0, 1.0, []
    for _ in range(40):
        t = (lo + hi) / 2
        ranks = at(t)
        g = objective.gain(ranks)
        seen.append((abs(g - target), t, ranks, g))
        if (g < target) == (g_low < g_high):
            lo = t
        else:
            hi = t
    ends_ranks = ({n: low.get(n) for n in shapes}, {n: high.get(n) for n in shapes})
    inside = [x for x in seen if x[2] not in ends_ranks]
    if not inside:
        # coarse ranks (few matrices differ, or a large multiple) round every t to one of the two
        # plans: then whole matrices move to ``high``'s rank, one more at a time, in shapes' order
        ranks = dict(ends_ranks[0])
        for n in (n for n in shapes if low.get(n) != high.get(n)):
            ranks = {**ranks, n: high.get(n)}
            g = objective.gain(ranks)
            if ranks not in ends_ranks:
                inside.append((abs(g - target), len(inside), ranks, g))
    if not inside:
        return None
    _, _, ranks, g = min(inside, key=lambda x: (x[0], x[1]))
    return ranks, g


def climb(cands: list[Candidate], *, start_gain: float, start_gap: float, start_drop: float, tolerance: float,
          tries: int, refit_drop: Callable[[Candidate], float], keep: Callable[[Candidate], None] = lambda c: None,
          log: Callable[[str], None] = lambda m: None, start_ranks: dict[str, int | None] | None = None,
          make: Callable[[dict, dict, float], tuple[dict, float] | None] | None = None,
          start_gap_bound: bool = False) -> tuple[Candidate | None, list[dict]]:
    """(the largest candidate whose refit passed, or None; a record of every try).

    ``refit_drop(c)`` refits ``c`` and returns its drop on the validation split; ``keep(c)``,
    called right after a try that passed, keeps that refit (the climb stage writes it out).
    ``start_gain``, ``start_gap``, ``start_drop``: the searched plan's gain, refit gap
    (searched drop minus refit drop) and refit drop. ``tolerance`` in the drops' units.

    The next try is the largest plan expected to pass (searched drop minus the mean gap
    within the tolerance). When none is, the climb bisects on the gain (``best_bet`` in the
    record): the plan nearest halfway between the largest that passed and the smallest that
    failed, or the largest left to try while none failed (the smaller searched drop, then
    the smaller gain, among equally near ones). A
    refit that scores at least the dense model (drop <= 0) only bounds its gap from below;
    right after one the bisection's plan is tried whenever it is larger than the expected
    one.

    ``make(low_ranks, high_ranks, target)`` (e.g. ``between`` with the model's shapes) gives
    a plan between two others with a gain near ``target``; with it and ``start_ranks`` (the
    searched plan's), once a try has failed the bisection tries a plan made halfway between
    the largest passed and the smallest failed when no untried measured plan lies in the
    middle half of that interval (``made`` in the record).

    ``start_gap_bound``: the start's gap was not measured as the tries' are (the tries are
    healed before they are judged, the searched plan's refit was not), so it only bounds
    theirs from below: it guides the first choice and leaves the mean once a try measured a
    gap."""
    tol = tolerance + 1e-12
    gaps = [start_gap]
    provisional = start_gap_bound
    capped = start_drop <= 0.0
    lower, upper = start_gain, float("inf")
    lower_ranks, upper_ranks = start_ranks, None
    best, record, tried = None, [], set()
    while len(record) < tries:
        gap = sum(gaps) / len(gaps)
        bracket = [j for j, c in enumerate(cands) if j not in tried and lower < c.gain < upper]
        i = next((j for j in bracket if cands[j].drop - gap <= tol), None)
        c, best_bet, expected = None if i is None else cands[i], False, None
        if capped or i is None:
            # no plan expected to pass, or the mean gap only a lower bound: the searched drops do
            # not say which refit passes; bisect on the gain, the plan nearest halfway between the
            # largest that passed and the smallest that failed (the largest left to try while none
            # failed), unless the expected plan is larger; one made halfway when none measured
            # lies in the middle half of that interval
            half = None
            if bracket:
                top = upper if upper < float("inf") else max(cands[j].gain for j in bracket)
                target = (lower + top) / 2
                half = min(bracket, key=lambda j: (abs(cands[j].gain - target), cands[j].drop, cands[j].gain))
            pick = None if half is None else cands[half]
            middle = (lower + upper) / 2
            if make is not None and lower_ranks is not None and upper_ranks is not None \
                    and upper - lower > 2 * RESOLUTION \
                    and (pick is None or abs(pick.gain - middle) > (upper - lower) / 4):
                made = make(lower_ranks, upper_ranks, middle)
                if made is not None and lower + RESOLUTION <= made[1] <= upper - RESOLUTION:
                    pick, half = Candidate(made[0], made[1], None, None, False, made=True), None
            if pick is not None and (c is None or pick.gain > c.gain):
                expected = None if c is None else c.gain
                c, i, best_bet = pick, half, True
        if c is None:
            log("refit: no untried plan left between the largest that passed and the smallest that failed")
            break
        if i is not None:
            tried.add(i)
        predicted = None if c.made else c.drop - gap
        why = ("; a bisection on the gain: " + ("no plan is expected to pass" if expected is None else
               f"the last refit scored the dense metric (its gap a lower bound), past the expected "
               f"{100 * expected:.1f}%"))
        searched = ("made halfway between the largest passed and the smallest failed, never searched" if c.made else
                    f"searched drop {c.drop:+.4f}{'' if c.full else ', racing estimate'}; expected after the refit "
                    f"{predicted:+.4f}")
        log(f"refit: trying the plan removing {100 * c.gain:.1f}% ({searched}{why if best_bet else ''})")
        drop = float(refit_drop(c))
        ok = drop <= tol
        if not c.made:
            if provisional:
                gaps, provisional = [], False
            gaps.append(c.drop - drop)
        capped = drop <= 0.0
        record.append({"gain": c.gain, "search_drop": c.drop, "search_full": c.full, "predicted_drop": predicted,
                       "best_bet": best_bet, "made": c.made, "drop": drop, "passed": ok})
        log(f"refit: plan {100 * c.gain:.1f}%: drop {drop:+.4f} after the refit "
            f"({'within' if ok else 'BEYOND'} the tolerance {tolerance:.4f})")
        if ok:
            keep(c)
            lower, lower_ranks, best = c.gain, c.ranks, c
        else:
            upper, upper_ranks = c.gain, c.ranks
    return best, record

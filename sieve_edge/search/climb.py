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
  tries the plan nearest halfway between the largest that passed and the largest left to
  try. The searched drops of larger plans say little about their refits: on sms_spam a 90%
  plan whose searched factors fell to the majority class refit to within 1.3 points; on
  reviews_long a 64.2% plan searched at 12.7 points refit to 1.3, better than the searched
  62.9% plan's 3.3;
- right after a refit that scored the dense metric (or better), whose gap is only a lower
  bound, it bisects too unless the expected plan is larger still: the mean gap is then an
  underestimate and its expected plan a short step (on sms_spam at 5 points the climb went
  32.5% -> 35.2% -> 42.6% -> 90.1%, every refit before the last at the dense metric);
- ``tries`` refits, or no plan left between the largest passed and the smallest failed,
  end it. A plan whose refit misses the tolerance is never kept, so a wrong guess costs
  one refit's time, not accuracy.

This module holds the choice; the fit stage does the refits (``FitStage``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ArtifactError

# The choice rule's version: the fit stage's key carries it when refit tries are on, so a
# finished fit whose tries an older rule chose is redone, not reused. 2: bisects on the gain
# when no plan is expected to pass (1 stopped there).
RULE = 2


@dataclass
class Candidate:
    """A plan the search measured: its ranks, objective gain and searched drop."""

    ranks: dict[str, int | None]
    gain: float
    metric: float        # the searched validation metric; an estimate when not ``full``
    drop: float          # the same in the tolerance's units (dense minus metric)
    full: bool


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


def climb(cands: list[Candidate], *, start_gain: float, start_gap: float, start_drop: float, tolerance: float,
          tries: int, refit_drop: Callable[[Candidate], float], keep: Callable[[Candidate], None] = lambda c: None,
          log: Callable[[str], None] = lambda m: None) -> tuple[Candidate | None, list[dict]]:
    """(the largest candidate whose refit passed, or None; a record of every try).

    ``refit_drop(c)`` refits ``c`` and returns its drop on the validation split; ``keep(c)``,
    called right after a try that passed, keeps that refit (the fit stage writes it out).
    ``start_gain``, ``start_gap``, ``start_drop``: the searched plan's gain, refit gap
    (searched drop minus refit drop) and refit drop. ``tolerance`` in the drops' units.

    The next try is the largest plan expected to pass (searched drop minus the mean gap
    within the tolerance). When none is, the climb bisects on the gain (``best_bet`` in the
    record): the plan nearest halfway between the largest that passed and the largest left
    to try (the smaller searched drop, then the smaller gain, among equally near ones). A
    refit that scores at least the dense model (drop <= 0) only bounds its gap from below;
    right after one the bisection's plan is tried whenever it is larger than the expected
    one."""
    tol = tolerance + 1e-12
    gaps = [start_gap]
    capped = start_drop <= 0.0
    lower, upper = start_gain, float("inf")
    best, record, tried = None, [], set()
    while len(record) < tries:
        gap = sum(gaps) / len(gaps)
        bracket = [j for j, c in enumerate(cands) if j not in tried and lower < c.gain < upper]
        i = next((j for j in bracket if cands[j].drop - gap <= tol), None)
        best_bet, expected = False, None
        if bracket and (capped or i is None):
            # no plan expected to pass, or the mean gap only a lower bound: the searched drops do
            # not say which refit passes; bisect on the gain, the plan nearest halfway between the
            # largest that passed and the largest left to try (unless the expected plan is larger)
            target = (lower + max(cands[j].gain for j in bracket)) / 2
            half = min(bracket, key=lambda j: (abs(cands[j].gain - target), cands[j].drop, cands[j].gain))
            if i is None or cands[half].gain > cands[i].gain:
                expected = None if i is None else cands[i].gain
                i, best_bet = half, True
        if i is None:
            log("refit: no untried plan left between the largest that passed and the smallest that failed")
            break
        tried.add(i)
        c = cands[i]
        predicted = c.drop - gap
        why = ("; a bisection on the gain: " + ("no plan is expected to pass" if expected is None else
               f"the last refit scored the dense metric (its gap a lower bound), past the expected "
               f"{100 * expected:.1f}%"))
        log(f"refit: trying the plan removing {100 * c.gain:.1f}% (searched drop {c.drop:+.4f}"
            f"{'' if c.full else ', racing estimate'}; expected after the refit {predicted:+.4f}"
            f"{why if best_bet else ''})")
        drop = float(refit_drop(c))
        ok = drop <= tol
        gaps.append(c.drop - drop)
        capped = drop <= 0.0
        record.append({"gain": c.gain, "search_drop": c.drop, "search_full": c.full, "predicted_drop": predicted,
                       "best_bet": best_bet, "drop": drop, "passed": ok})
        log(f"refit: plan {100 * c.gain:.1f}%: drop {drop:+.4f} after the refit "
            f"({'within' if ok else 'BEYOND'} the tolerance {tolerance:.4f})")
        if ok:
            keep(c)
            lower, best = c.gain, c
        else:
            upper = c.gain
    return best, record

"""Candidate scoring: rank dicts in, ``Evaluation``s out, one model whose ranks switch in place.

``CandidateEvaluator.score(candidates, budget)`` is the seam a parallel or surrogate-assisted
scorer replaces: it takes a list of rank dicts (one per candidate, ``None`` = dense) and
returns their Evaluations in the same order, or a shorter prefix when the search budget ran
out before the rest could be scored (an unscored candidate is never reported as measured).

Racing (classification): the dense model's label log-probabilities on the validation split
are computed once (and kept on disk beside the search state, so a resumed search does not
recompute them). A candidate is then scored on growing prefixes of one seeded random order
of the split (``race_size`` rows, then twice as many, ... up to all) and stops as soon as a
one-sided test decides it (``race_decision``): clearly beyond the tolerance (rejected) or
clearly within it (accepted). What it scored is kept, so the confirmation of an accepted
candidate on the whole split only scores the rows it has not seen.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..ga import Evaluation

REFERENCE = "dense_reference.safetensors"   # the dense label log-probs, in the search's scratch


@dataclass(frozen=True)
class RaceDecision:
    """What one racing look concluded: "reject", "accept" or "more" (score more rows)."""

    verdict: str
    mean: float        # mean paired drop on the rows scored (tolerance units)
    bound: float       # the z-scaled standard error the verdict used


def race_decision(drops: Sequence[float], n_total: int, tol: float, z: float) -> RaceDecision:
    """The racing test on ``drops``: per row, the dense model's score minus the candidate's
    (1 / 0 / -1 for accuracy), on a simple random sample of ``len(drops)`` of ``n_total`` rows.

    The full-split drop D is estimated by the sample mean m with standard error
    ``s/√n·√(1 - n/N)`` (finite-population correction: the sample is drawn without
    replacement from a split of N rows), where s² is at least ``tol·(1 - tol)``: the least
    variance a candidate whose drop is exactly the tolerance can have, so a sample that
    happens to show no disagreement is not taken as proof. Reject when ``m - z·se > tol``,
    accept when ``m + z·se <= tol``; each is wrong with probability about Φ(-z) (2.3% at
    z = 2) under the normal approximation. On the whole split (n = N) the verdict is exact.
    """
    n = len(drops)
    if n == 0:
        return RaceDecision("more", 0.0, math.inf)
    mean = sum(drops) / n
    if n >= n_total:
        return RaceDecision("accept" if mean <= tol + 1e-12 else "reject", mean, 0.0)
    var = sum((d - mean) ** 2 for d in drops) / (n - 1) if n > 1 else 0.0
    var = max(var, tol * (1.0 - tol) if 0.0 < tol < 1.0 else 0.25)
    bound = z * math.sqrt(var / n * (1.0 - n / n_total))
    if mean - bound > tol:
        return RaceDecision("reject", mean, bound)
    if mean + bound <= tol:
        return RaceDecision("accept", mean, bound)
    return RaceDecision("more", mean, bound)


def race_stages(n_total: int, first: int) -> list[int]:
    """Rows scored after each look: ``first``, doubling, ending at ``n_total`` (one look when
    racing is off or the split is small)."""
    if first <= 0 or first >= n_total:
        return [n_total]
    out, n = [], first
    while n < n_total:
        out.append(n)
        n *= 2
    return out + [n_total]


class CandidateEvaluator:
    """Scores rank dicts on the validation split with one model whose ranks switch in place.

    Holds the dense model's label log-probabilities (N, L) as the reference for the smooth
    proxy (KL of label distributions) and for racing (paired per-example correctness).
    ``reference_path``: where those are cached (safetensors, with what they were computed on).
    """

    def __init__(self, model, scorer, objective, tolerance_abs: float, race_size: int, race_z: float,
                 higher_is_better: bool = True, seed: int = 0, reference_path: str | Path | None = None,
                 reference_identity: dict | None = None, log=None):
        import torch

        self.torch = torch
        self.model, self.scorer, self.objective = model, scorer, objective
        self.tol = tolerance_abs
        self.z = race_z
        self.sign = 1.0 if higher_is_better else -1.0
        self.classification = hasattr(scorer, "label_logprobs") and getattr(scorer, "labels", None) is not None
        n = scorer.n
        self.n = n
        # one seeded random order of the split: its prefixes are simple random samples (the
        # racing test's premise), and file order (often sorted by label) does not matter
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if n else torch.arange(0)
        self.stages = race_stages(n, race_size) if self.classification else [n]
        self.n_evaluations = 0
        self.n_full = 0
        self.rows_scored = 0
        self.seconds = 0.0
        self._partial: dict[str, tuple[int, object]] = {}   # candidate -> (rows scored, their log-probs)
        from ..factorize import set_ranks_

        self._set_ranks = set_ranks_
        set_ranks_(model, {})
        say = log or (lambda msg: None)
        t0 = time.perf_counter()
        if self.classification:
            self.labels = self._labels()
            cached = _read_reference(reference_path, reference_identity, scorer)
            if cached is not None:
                self.ref_lp, self.dense_seconds = cached
                say(f"search: dense label log-probabilities read from {Path(reference_path).name}")
            else:
                self.ref_lp = self._logprobs(self.order)[self._inverse()]    # (N, L) in split order
                self.dense_seconds = time.perf_counter() - t0
                _write_reference(reference_path, reference_identity, scorer, self.ref_lp, self.dense_seconds)
            self.ref_ok = (self.ref_lp.argmax(-1) == self.labels).double()   # (N,)
            self.dense_metric = self._metric(self.ref_lp, torch.arange(n))
        else:
            self.dense_metric = float(scorer.metric(model))
            self.dense_seconds = time.perf_counter() - t0

    # -- helpers
    def _inverse(self):
        inv = self.torch.empty_like(self.order)
        inv[self.order] = self.torch.arange(len(self.order))
        return inv

    def _labels(self):
        labels = self.scorer.labels
        return labels if isinstance(labels, self.torch.Tensor) else self.torch.tensor(list(labels))

    def _logprobs(self, subset):
        with self.torch.no_grad():
            lp = self.scorer.label_logprobs(self.model, subset=subset)
        return lp.double()

    def _metric(self, lp, subset) -> float:
        from ..evaluate import accuracy_from_logprobs

        return accuracy_from_logprobs(lp, self.labels[subset])

    def _kl(self, lp, subset) -> float:
        # KL(dense || candidate) of label distributions renormalized over the labels
        p = self.torch.log_softmax(self.ref_lp[subset], -1)
        q = self.torch.log_softmax(lp, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    # -- the one entry point
    def __call__(self, ranks: dict[str, int | None], confirm: bool = False) -> Evaluation:
        """Score one candidate, racing it unless ``confirm`` (then: on the whole split, reusing
        the rows an earlier race of the same candidate scored)."""
        t0 = time.perf_counter()
        self._set_ranks(self.model, ranks)
        gain = self.objective.gain(ranks)
        self.n_evaluations += 1
        try:
            if not self.classification:
                metric = float(self.scorer.metric(self.model))
                drop = self.sign * (self.dense_metric - metric)
                self.n_full += 1
                self.rows_scored += self.n
                return Evaluation(gain, metric, drop, drop <= self.tol + 1e-12, 0.0, True,
                                  time.perf_counter() - t0, self.n)
            k = _ranks_key(ranks)
            done, lp = self._partial.pop(k, (0, None))
            stages = [self.n] if confirm else self.stages
            for upto in stages:
                if upto <= done:
                    continue
                new = self._logprobs(self.order[done:upto])                         # (upto - done, L)
                self.rows_scored += upto - done
                lp = new if lp is None else self.torch.cat([lp, new])
                done = upto
                rows = self.order[:done]
                d = self.ref_ok[rows] - (lp.argmax(-1) == self.labels[rows]).double()  # paired drop per row
                verdict = race_decision(d.tolist(), self.n, self.tol, self.z)
                if verdict.verdict != "more":
                    break
            full = done >= self.n
            drop = float(d.mean())          # accuracy: higher is better, so dense minus candidate
            # the full split's dense accuracy less the paired drop on the rows raced: on a subset
            # the candidate can beat the dense model, so the estimate is kept within [0, 1]
            metric = min(1.0, max(0.0, self.dense_metric - drop))
            if full:
                self.n_full += 1
            else:
                self._partial[k] = (done, lp)
                while len(self._partial) > 256:      # the oldest races are unlikely to be confirmed
                    self._partial.pop(next(iter(self._partial)))
            return Evaluation(gain, metric, drop, verdict.verdict == "accept", self._kl(lp, rows), full,
                              time.perf_counter() - t0, done)
        finally:
            self.seconds += time.perf_counter() - t0

    def score(self, candidates: Sequence[dict[str, int | None]], budget=None) -> list[Evaluation]:
        """One Evaluation per candidate, in order; a prefix when ``budget`` (a ``Budget``) ends
        first: a candidate is started only if about one full evaluation still fits, plus, when
        racing, one more to confirm the chosen plan on the whole split."""
        out = []
        reserve = self.dense_seconds * (2 if len(self.stages) > 1 else 1)
        for ranks in candidates:
            if budget is not None and not budget.allows(reserve):
                break
            out.append(self(ranks))
        return out

    def confirm(self, ranks: dict[str, int | None]) -> Evaluation:
        """The candidate on the whole split: the final accept/reject of a plan."""
        return self(ranks, confirm=True)


def _ranks_key(ranks: dict[str, int | None]) -> str:
    return json.dumps(sorted(ranks.items()))


def _reference_meta(identity: dict | None, scorer) -> str:
    return json.dumps({"identity": identity or {}, "rows": scorer.record(), "n": scorer.n}, sort_keys=True,
                      default=str)


def _read_reference(path, identity, scorer):
    """(the cached dense label log-probs (N, L) float64, the seconds they took) if ``path``
    holds them for these rows, else None."""
    if path is None or identity is None or not Path(path).is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("meta") != _reference_meta(identity, scorer):
                return None
            return f.get_tensor("logprobs").double(), float(f.metadata()["seconds"])
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        return None


def _write_reference(path, identity, scorer, lp, seconds: float) -> None:
    if path is None or identity is None:
        return
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    save_file({"logprobs": lp.contiguous()}, str(tmp), metadata={"meta": _reference_meta(identity, scorer),
                                                                 "seconds": f"{seconds:.6f}"})
    os.replace(tmp, path)

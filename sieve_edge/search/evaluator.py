"""Candidate scoring: rank dicts in, ``Evaluation``s out, one model whose ranks switch in place.

``CandidateEvaluator.score(candidates)`` is the seam a parallel or surrogate-assisted scorer
replaces: it takes a list of rank dicts (one per candidate, ``None`` = dense) and returns
their Evaluations in the same order, or a shorter prefix when the search budget ran out
before the rest could be scored (an unscored candidate is never reported as measured).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

from ..ga import Evaluation


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
        from ..factorize import set_ranks_

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
        from ..evaluate import accuracy_from_logprobs

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


    def score(self, candidates: Sequence[dict[str, int | None]], budget=None) -> list[Evaluation]:
        """One Evaluation per candidate, in order; a prefix when ``budget`` (a ``Budget``) ends
        first: a candidate is started only if about one full evaluation still fits."""
        out = []
        for ranks in candidates:
            if budget is not None and not budget.allows(self.dense_seconds):
                break
            out.append(self(ranks))
        return out

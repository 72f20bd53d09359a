"""Search: a keep level per matrix under an accuracy tolerance (LLM-Sieve's genetic algorithm).

The package, by job:

- ``config``      ``SearchConfig`` (every setting, checked), ``SearchResult``, the resumable ``SearchState``
- ``objectives``  what a candidate gains: ``ParamObjective``, ``TimeObjective`` (ms per example) and its ``MatmulTable``
- ``evaluator``   ``CandidateEvaluator``: rank dicts in, Evaluations out (racing, KL proxy)
- ``ladder``      keep levels → ranks per matrix (``Ladder``), ``bisect_largest``
- ``budget``      ``Budget``: the time spent searching (not preparing)
- ``drivers``     ``search_plan`` (in memory) and its GA / uniform-bisection drivers
- ``report``      ``search_report.md`` and the plots
- ``stage``       calibrate → sensitivity → search → reference → refit as stages, ``run_search``
- ``distributed`` ``RayWorkers`` / ``RayEvaluator``: candidates scored on Ray actors (optional extra)
"""
from .budget import Budget
from .config import (DEFAULT_LADDER, OBJECTIVES, STRATEGIES, WEIGHTS, SearchConfig, SearchResult,
                     SearchState)
from .drivers import SearchContext, search_plan, tolerance_in_units
from .evaluator import CandidateEvaluator
from .ladder import Ladder, bisect_largest
from .objectives import (LatencyObjective, MatmulTable, ParamObjective, RuntimeMatmulTable, TimeObjective,
                         TorchMatmulTable, make_time_objective, plan_times)
from .report import bottlenecks, search_report
from .stage import run_search, search_stages

__all__ = [
    "Budget", "CandidateEvaluator", "DEFAULT_LADDER", "Ladder", "LatencyObjective", "MatmulTable", "OBJECTIVES",
    "ParamObjective", "RuntimeMatmulTable", "STRATEGIES", "SearchConfig", "SearchContext", "SearchResult",
    "SearchState", "TimeObjective", "TorchMatmulTable", "WEIGHTS", "bisect_largest", "bottlenecks",
    "make_time_objective", "plan_times", "run_search", "search_plan", "search_report", "search_stages",
    "tolerance_in_units",
]

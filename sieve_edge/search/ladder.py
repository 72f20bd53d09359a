"""Keep levels → ranks per matrix, and the bisection both strategies use."""
from __future__ import annotations

from typing import Callable, Sequence

from ..ga import Genome


class Ladder:
    """Per matrix, the rank of each ladder level (level 0 = dense); unusable ranks snap to dense."""

    def __init__(self, shapes: dict[str, tuple[int, int]], keeps: Sequence[float], multiple: int, objective):
        from ..lowrank import rank_for_keep

        self.names = list(shapes)
        self.keeps = tuple(keeps)
        self.ranks: dict[str, list[int | None]] = {}
        for name, (m, n) in shapes.items():
            row = []
            for k in keeps:
                r = rank_for_keep(m, n, k, multiple)
                row.append(r if objective.usable(name, r) else None)
            self.ranks[name] = row

    def to_ranks(self, genome: Sequence[int]) -> dict[str, int | None]:
        return {name: self.ranks[name][g] for name, g in zip(self.names, genome)}

    def uniform(self, level: int) -> Genome:
        return (level,) * len(self.names)

    def max_rank(self, name: str) -> int | None:
        rs = [r for r in self.ranks[name] if r is not None]
        return max(rs) if rs else None


def bisect_largest(n: int, feasible: Callable[[int], bool]) -> int:
    """Largest i in [0, n) with feasible(i), assuming feasible is monotone (true then false)
    and feasible(0) holds. About log2(n) calls."""
    lo, hi = 0, n  # feasible(lo) known true; every i >= hi known false
    if n > 1 and feasible(n - 1):
        return n - 1
    hi = n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


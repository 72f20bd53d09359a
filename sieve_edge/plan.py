"""RankPlan: the rank of every matrix (None = dense), the noun the search hands to prune."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .factorize import linear_param_reduction
from .lowrank import keep_of_rank, rank_for_keep

PLAN_FORMAT = "sieve-edge/plan"
PLAN_VERSION = 1


@dataclass
class RankPlan:
    shapes: dict[str, tuple[int, int]]       # every registry matrix, (out, in)
    ranks: dict[str, int | None]             # None = stays dense
    method: str | None = None
    multiple: int = 8
    keep: dict[str, float] = field(default_factory=dict)  # requested keep level per matrix, if any
    meta: dict = field(default_factory=dict)  # how the plan was made (search settings, scores)

    @classmethod
    def from_keep(cls, shapes: dict[str, tuple[int, int]], keep: float | dict[str, float],
                  multiple: int = 8, method: str | None = None) -> "RankPlan":
        """A plan from one keep fraction for every matrix, or a keep fraction per matrix."""
        levels = {name: keep for name in shapes} if isinstance(keep, (int, float)) else dict(keep)
        unknown = sorted(set(levels) - set(shapes))
        if unknown:
            raise InputError(f"plan names matrices this model does not have: {', '.join(unknown[:5])}")
        ranks = {}
        for name, (m, n) in shapes.items():
            k = float(levels.get(name, 1.0))
            if not 0.0 < k <= 1.0:
                raise InputError(f"keep level for {name} must be in (0, 1], got {k}")
            ranks[name] = rank_for_keep(m, n, k, multiple)
        return cls(dict(shapes), ranks, method, multiple, {n: float(levels.get(n, 1.0)) for n in shapes})

    @property
    def factorized(self) -> dict[str, int]:
        return {n: r for n, r in self.ranks.items() if r is not None}

    @property
    def linear_param_reduction(self) -> float:
        return linear_param_reduction(self.shapes, self.ranks)

    def keep_of(self, name: str) -> float:
        m, n = self.shapes[name]
        return keep_of_rank(m, n, self.ranks.get(name))

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_VERSION,
            "method": self.method,
            "multiple": self.multiple,
            "linear_param_reduction": round(self.linear_param_reduction, 6),
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "ranks": dict(self.ranks),
            "keep": dict(self.keep),
            "meta": self.meta,
        }

    def to_json(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "RankPlan":
        if d.get("format") != PLAN_FORMAT:
            raise InputError(f"{source}: not a sieve-edge plan (key 'format' must be '{PLAN_FORMAT}')")
        if d.get("format_version") != PLAN_VERSION:
            raise InputError(f"{source}: plan format_version {d.get('format_version')} is not supported "
                             f"(this sieve-edge reads {PLAN_VERSION})")
        for key in ("shapes", "ranks"):
            if not isinstance(d.get(key), dict):
                raise InputError(f"{source}: key '{key}' must be a table of matrix name -> value")
        shapes = {n: (int(s[0]), int(s[1])) for n, s in d["shapes"].items()}
        ranks = {}
        for n, r in d["ranks"].items():
            if n not in shapes:
                raise InputError(f"{source}: ranks names '{n}', which is not in 'shapes'")
            if r is not None and (not isinstance(r, int) or r <= 0):
                raise InputError(f"{source}: rank of '{n}' must be a positive integer or null, got {r!r}")
            ranks[n] = r
        return cls(shapes, ranks, d.get("method"), int(d.get("multiple", 8)),
                   {n: float(v) for n, v in (d.get("keep") or {}).items()}, d.get("meta") or {})

    @classmethod
    def from_json(cls, path: str | Path) -> "RankPlan":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, str(path))

    def check_model(self, shapes: dict[str, tuple[int, int]], source: str = "plan") -> None:
        """The plan must describe exactly this model's matrices."""
        if set(shapes) != set(self.shapes) or any(tuple(shapes[n]) != tuple(self.shapes[n]) for n in shapes):
            missing = sorted(set(shapes) - set(self.shapes))[:3]
            extra = sorted(set(self.shapes) - set(shapes))[:3]
            raise InputError(f"{source} was made for another model (missing {missing}, extra {extra}, "
                             "or different shapes)")

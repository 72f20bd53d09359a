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
        """A plan from its JSON form, checked key by key (every error names ``source`` and the key)."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: a plan must be a JSON object with keys {', '.join(_KEYS)}, "
                             f"got a JSON {_json_type(d)}")
        if d.get("format") != PLAN_FORMAT:
            raise InputError(f"{source}: not a sieve-edge plan (key 'format' must be '{PLAN_FORMAT}')")
        if d.get("format_version") != PLAN_VERSION:
            raise InputError(f"{source}: plan format_version {d.get('format_version')} is not supported "
                             f"(this sieve-edge reads {PLAN_VERSION})")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise InputError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                             f"{', '.join(_KEYS)}")
        for key in ("shapes", "ranks"):
            if not isinstance(d.get(key), dict):
                raise InputError(f"{source}: key '{key}' must be a table of matrix name -> value, "
                                 f"got a JSON {_json_type(d.get(key))}")
        shapes = {}
        for n, s in d["shapes"].items():
            if not (isinstance(s, list) and len(s) == 2 and all(_positive_int(x) for x in s)):
                raise InputError(f"{source}: shapes['{n}'] must be [out, in], two positive integers, got {s!r}")
            shapes[n] = (s[0], s[1])
        ranks = {}
        for n, r in d["ranks"].items():
            if n not in shapes:
                raise InputError(f"{source}: ranks names '{n}', which is not in 'shapes'")
            if r is not None and not _positive_int(r):
                raise InputError(f"{source}: rank of '{n}' must be a positive integer or null, got {r!r}")
            if r is not None and r > min(shapes[n]):
                raise InputError(f"{source}: rank of '{n}' is {r}, larger than its {shapes[n][0]} x {shapes[n][1]} "
                                 f"matrix allows (at most {min(shapes[n])}); use a smaller rank, or null for dense")
            ranks[n] = r
        keep = d.get("keep") or {}
        if not isinstance(keep, dict):
            raise InputError(f"{source}: key 'keep' must be a table of matrix name -> keep fraction in (0, 1], "
                             f"got a JSON {_json_type(keep)}")
        for n, k in keep.items():
            if n not in shapes:
                raise InputError(f"{source}: keep names '{n}', which is not in 'shapes'")
            if not (isinstance(k, (int, float)) and not isinstance(k, bool) and 0.0 < k <= 1.0):
                raise InputError(f"{source}: keep of '{n}' must be a number in (0, 1] (a fraction of the dense "
                                 f"parameters), got {k!r}")
        multiple = d.get("multiple", 8)
        if not _positive_int(multiple):
            raise InputError(f"{source}: key 'multiple' must be a positive integer, got {multiple!r}")
        method = d.get("method")
        if method is not None and not isinstance(method, str):
            raise InputError(f"{source}: key 'method' must be a string or null, got {method!r}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise InputError(f"{source}: key 'meta' must be a table, got a JSON {_json_type(meta)}")
        return cls(shapes, ranks, method, multiple, {n: float(v) for n, v in keep.items()}, meta)

    @classmethod
    def from_json(cls, path: str | Path) -> "RankPlan":
        path = Path(path)
        if path.is_dir():
            raise InputError(f"plan '{path}' is a folder; pass the plan.json file inside it")
        if not path.is_file():
            raise InputError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start}); a plan is a JSON file") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def check_model(self, shapes: dict[str, tuple[int, int]], source: str = "plan") -> None:
        """The plan must describe exactly this model's matrices (names and shapes)."""
        extra = sorted(set(self.shapes) - set(shapes))
        if extra:
            example = next(iter(shapes), "?")
            raise InputError(f"{source} was made for another model: it names {len(extra)} matrices this model does "
                             f"not have ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); "
                             f"this model's names look like '{example}'")
        missing = sorted(set(shapes) - set(self.shapes))
        if missing:
            raise InputError(f"{source} was made for another model: it lacks {len(missing)} of this model's "
                             f"matrices ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        for n, shape in shapes.items():
            if tuple(shape) != tuple(self.shapes[n]):
                raise InputError(f"{source} was made for another model: '{n}' is {list(self.shapes[n])} in the "
                                 f"plan, {list(shape)} in this model")


_KEYS = ("format", "format_version", "method", "multiple", "linear_param_reduction", "shapes", "ranks", "keep",
         "meta")


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _json_type(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(x), type(x).__name__)

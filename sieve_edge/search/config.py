"""The search's settings, its result, and its resumable state on disk."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import ArtifactError, BudgetError, InputError
from ..stages import write_json_atomic

STATE_FORMAT = "sieve-edge/search-state"
STATE_VERSION = 3                # 3: racing accepts on subsets; the surrogate is in the state
DEFAULT_LADDER = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
STRATEGIES = ("ga", "uniform")
OBJECTIVES = ("params", "time", "latency")  # latency: the earlier name of time
HEAL_KL_ROWS = 512  # train prompts the dense label distribution is distilled from (--heal kl)
HEALS = ("ce", "kl")    # healing loss: answer cross-entropy on train, or KL to the dense label distribution
WEIGHTS = ("fp32", "int8")  # int8: candidates scored with simulated int8 weights (NNCF INT8_ASYM)
UNIFORM_STEP = 0.025  # keep resolution of the uniform bisection
BEFORE_FIRST_GENERATION = "the budget ended before generation 1"


@dataclass(frozen=True)
class SearchConfig:
    """Every setting that changes the result; it is fingerprinted into the resumable state."""

    tolerance: float = 0.01          # metric drop allowed on the validation split
    relative: bool = False           # tolerance as a fraction of the dense metric
    method: str = "sieve"            # refit method of the final checkpoint
    strategy: str = "ga"             # ga | uniform
    objective: str = "params"        # params | time (latency = time)
    target: str | None = None        # target profile whose runtime and workload the time objective measures
    seed: int = 0
    population: int = 16
    generations: int = 12
    ladder: tuple[float, ...] = DEFAULT_LADDER
    sensitivity_examples: int = 64  # validation examples for the task-sensitivity seeds; 0 = spectrum
    multiple: int = 8                # ranks rounded to this multiple (fast CPU kernels)
    n_calibration: int = 512         # calibration examples for the search decompositions and the refit
    calibration_batch: int = 16
    val_limit: int | None = 300      # validation examples scored per candidate
    race_size: int = 64              # first racing subset (doubled at each look); 0 = no racing
    race_z: float = 2.0              # one-sided z of the racing tests (accept and reject)
    surrogate: bool = True           # GA: screen each generation's candidates on the surrogate
    batch_size: int = 32
    latency_tokens: int = 20         # prompt length of the time objective without a target's [workload]
    heal_steps: int = 0
    heal_lr: float = 1e-4
    heal: str = "ce"                 # ce | kl (see HEALS)
    heal_rank: int = 0               # 0: healing trains the factors; R: rank-R adapters on them, merged
    weights: str = "fp32"            # precision candidates are scored in: int8 simulates the export's int8
    holdout: int = 0                 # validation rows beyond val_limit that confirm the chosen plan (0: none)
    heal_slack: float = 0.0          # the search explores tolerance + slack; healing must win the slack back
    refit_tries: int = 0             # larger measured plans refit with `method` after the search (see climb.py)

    @property
    def search_tolerance(self) -> float:
        """The tolerance candidates are held to while searching: ``tolerance + heal_slack``
        (rounded, so that 0.01 + 0.04 is the 0.05 of a search run at 0.05)."""
        return round(self.tolerance + self.heal_slack, 12) if self.heal_slack else self.tolerance

    def __post_init__(self):
        if not (isinstance(self.tolerance, (int, float)) and 0.0 < self.tolerance < 1.0):
            raise BudgetError(f"tolerance must be in (0, 1) (0.01 = one point, or 1% with --relative), "
                              f"got {self.tolerance}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy '{self.strategy}' is not allowed; choose one of {', '.join(STRATEGIES)}")
        if self.heal not in HEALS:
            raise InputError(f"heal '{self.heal}' is not allowed; choose one of {', '.join(HEALS)}")
        if not (isinstance(self.heal_rank, int) and self.heal_rank >= 0):
            raise InputError(f"heal_rank must be an integer >= 0 (0 trains the factors), got {self.heal_rank!r}")
        if not (isinstance(self.race_z, (int, float)) and self.race_z > 0):
            raise InputError(f"race_z must be > 0, got {self.race_z}")
        if self.weights not in WEIGHTS:
            raise InputError(f"weights '{self.weights}' is not allowed; choose one of {', '.join(WEIGHTS)}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective '{self.objective}' is not allowed; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "latency":
            object.__setattr__(self, "objective", "time")
        from ..lowrank import METHODS
        if self.method not in METHODS:
            raise InputError(f"method '{self.method}' is not allowed; choose one of {', '.join(METHODS)}")
        ladder = tuple(float(k) for k in self.ladder)
        if len(ladder) < 2 or ladder[0] != 1.0 or any(not 0.0 < k <= 1.0 for k in ladder) \
                or any(b >= a for a, b in zip(ladder, ladder[1:])):
            raise InputError(f"keep ladder must start at 1.0 and strictly decrease within (0, 1], got {self.ladder}")
        for name in ("population", "n_calibration", "calibration_batch", "batch_size", "latency_tokens", "multiple"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.generations < 0 or self.race_size < 0 or self.heal_steps < 0 or self.sensitivity_examples < 0:
            raise InputError("generations, race_size, heal_steps and sensitivity_examples must be >= 0")
        if not (isinstance(self.heal_slack, (int, float)) and 0.0 <= self.heal_slack < 1.0 - self.tolerance):
            raise BudgetError(f"heal slack must be >= 0 and keep tolerance + slack below 1, got {self.heal_slack} "
                              f"with tolerance {self.tolerance}")
        if self.heal_slack and not self.heal_steps:
            raise InputError(f"heal slack {self.heal_slack} lets the search accept plans healing must bring back "
                             "within the tolerance: it needs --heal-steps >= 1")
        if self.heal_slack and self.holdout:
            raise InputError("--heal-slack and --holdout do not combine yet: the holdout confirms unhealed plans; "
                             "use one of them")
        if not isinstance(self.refit_tries, int) or self.refit_tries < 0:
            raise InputError(f"refit_tries must be an integer >= 0 (0: keep the searched plan), got {self.refit_tries}")
        if self.refit_tries and self.method == self.search_method:
            raise InputError(f"--refit-tries refits larger plans with --method, but method '{self.method}' is the one "
                             "the search scores with: its refit is the searched factors. Use --method sieve")
        if self.refit_tries and self.objective != "params":
            raise InputError("--refit-tries works with --objective params for now: the time objective's cost "
                             "table is the search's and would not describe a larger plan")
        if self.holdout < 0:
            raise InputError(f"holdout must be >= 0 (validation rows held out of the search), got {self.holdout}")
        if self.val_limit is not None and self.val_limit < 1:
            raise InputError(f"val_limit must be >= 1 or None, got {self.val_limit}")

    @property
    def search_method(self) -> str:
        """The decomposition candidates are scored with: the refit method when it needs only the
        dense statistics, else `output` (`sieve` is sequential: one calibration per plan)."""
        return self.method if self.method in ("svd", "input-pca", "output") else "output"

    def fingerprint(self) -> dict:
        """The settings a resumed search must share with the one that wrote the state."""
        d = asdict(self)
        # after the search proper: free to change on a rerun (the holdout check and the healed
        # choice rerun on the finished GA state; the search stage keys them on its own; the refit
        # tries are the climb stage's). With a
        # heal slack the GA is the search at tolerance + slack: its state is that search's.
        for k in ("heal_steps", "heal_lr", "heal", "heal_rank", "holdout", "heal_slack", "refit_tries"):
            d.pop(k)
        d["tolerance"] = self.search_tolerance
        d["ladder"] = list(self.ladder)
        return d


@dataclass
class SearchResult:
    plan: "object"                    # RankPlan
    strategy: str
    objective: str
    dense_metric: float
    metric: float                     # validation metric of the plan (search decompositions)
    gain: float                       # objective value of the plan
    tolerance_abs: float              # the tolerance in metric units
    evaluations: int
    full_evaluations: int
    seconds: float                    # time searching (what the budget counts)
    history: list[dict] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)   # {gain, reduction, metric, feasible}
    levels: dict[str, float] = field(default_factory=dict)  # keep level per matrix
    sensitivity: dict[str, float] = field(default_factory=dict)  # spectrum error at keep 0.5
    task_sensitivity: dict[str, float] = field(default_factory=dict)  # label-Fisher KL at keep 0.5 (GA)
    dense_int8_metric: float | None = None  # validation metric of the dense model in simulated int8
    resumed_from: int | None = None   # generation a resumed search started from
    stopped: str = "done"             # done | stalled | budget | BEFORE_FIRST_GENERATION
    times: dict | None = None         # time objective: workload, table, dense and plan ms per example
    factors: dict = field(default_factory=dict, repr=False)  # name -> (B, A) the plan was scored with
    holdout: dict | None = None       # the held-out rows' scores of the plans tried (config.holdout)
    healing: dict | None = None       # the healed tries of the plans beyond the tolerance (config.heal_slack)
    # every plan scored (gain > 0): {"names": [...], "plans": [{"ranks": [rank or None per name],
    # "gain", "metric", "drop", "feasible", "full", "rows"}]}, largest gain first (what refit tries pick from)
    measured: dict | None = None

    def to_dict(self) -> dict:
        """Everything but the plan and the factors (those are files of their own)."""
        # emptied first: asdict() deep-copies every value, the factor tensors included
        d = asdict(replace(self, plan=None, factors={}))
        return {k: v for k, v in d.items() if k not in ("plan", "factors")}


class SearchState:
    """The resumable state file: what was searched (model and task), with which settings, and
    the per-strategy payload; written atomically after every generation.

    ``identity`` names the model and task content (the calibration stage's key covers the
    model weights and the task's calibration data; the validation data is hashed beside it).
    A state left by a search of another model or task, or with other settings, is never
    resumed: ``on_mismatch="error"`` raises an ``ArtifactError`` saying what differs,
    ``"restart"`` logs it and starts over (the state is overwritten at the first save).
    """

    def __init__(self, path: Path | None, fingerprint: dict, identity: dict | None = None,
                 on_mismatch: str = "error", log: Callable[[str], None] | None = None):
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        self.identity = identity or {}
        self.on_mismatch = on_mismatch
        self.say = log or (lambda msg: None)

    def mismatch(self, state: dict) -> str | None:
        """Why ``state`` cannot be resumed by this search, or None."""
        if state.get("format_version") != STATE_VERSION:
            return f"sieve-edge with search state version {state.get('format_version')} left this state"
        old_id = state.get("identity") or {}
        if old_id != self.identity:
            diff = sorted(k for k in set(old_id) | set(self.identity) if old_id.get(k) != self.identity.get(k))
            return f"a search of another model or task ({', '.join(diff)} differ) left this state"
        if state.get("fingerprint") != self.fingerprint:
            old, new = state.get("fingerprint") or {}, self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return f"a search with other settings ({', '.join(diff)}) left this state"
        return None

    def read(self) -> dict | None:
        """The state file as written, checked for format; None when there is none."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{self.path}: search state is not valid JSON ({e}); delete it to start over") from e
        if state.get("format") != STATE_FORMAT:
            raise ArtifactError(f"{self.path}: not a sieve-edge search state")
        return state

    def load(self) -> dict | None:
        state = self.read()
        if state is None:
            return None
        problem = self.mismatch(state)
        if problem is None:
            return state
        if self.on_mismatch == "restart":
            self.say(f"search: {problem}; starting over")
            return None
        raise ArtifactError(f"{self.path}: {problem}; rerun with the same model, task and settings to resume, "
                            "or use --force / another --out to start over")

    def save(self, payload: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                                      "identity": self.identity, "fingerprint": self.fingerprint, **payload})

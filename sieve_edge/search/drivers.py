"""The in-memory search: ``search_plan`` (model, task → ``RankPlan``) and its two drivers.

Why it is affordable on 2 CPU cores:
- every matrix is decomposed once (``output`` projection on the task's activations) and
  wrapped in a ``SearchLinear``: a candidate plan is a dict of ranks set in place, and its
  evaluation is one batched label-likelihood pass over a pre-tokenized validation split;
- racing: a candidate first runs on a small subset of the validation split and goes on to
  the rest only if a one-sided paired test cannot already reject it;
- ranking among equal metrics uses a smooth proxy, the KL divergence of the label
  distribution from the dense model's;
- the population is seeded from the task's own sensitivity of every matrix at every level
  (label Fisher) or, where that does not apply, the spectrum error, plus the best uniform
  level, so the GA starts at least as good as the uniform baseline.

The drivers take one ``SearchContext`` (settings, ladder, scorer, state file, budget) and
return an ``Outcome``. Candidates are scored through ``SearchContext.score`` (a list of
rank dicts in, Evaluations out): that is the seam for another scorer.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import BudgetError, InputError, TaskSpecError
from ..ga import Evaluation, GAConfig, GeneticSearch, Genome, key, unkey
from ..stages import kill_point
from . import budget as budget_clock
from .budget import Budget
from .config import BEFORE_FIRST_GENERATION, UNIFORM_STEP, SearchConfig, SearchResult, SearchState
from .evaluator import REFERENCE, CandidateEvaluator
from .ladder import Ladder, bisect_largest
from .objectives import ParamObjective, make_time_objective, plan_times


OFFLOAD_WITH_WORKERS = (
    "--offload and --workers/--ray do not go together: each Ray actor loads the whole model and the search "
    "bases into its own memory, which is what --offload avoids; use one process with --offload, or workers "
    "on machines where the model fits")


class _BudgetSpent(Exception):
    """No time is left to score the next candidate: the step in progress is dropped."""


@dataclass
class SearchContext:
    """What a driver works with."""

    config: SearchConfig
    ladder: Ladder
    objective: object                 # ParamObjective | TimeObjective
    evaluator: CandidateEvaluator     # .score(list of rank dicts, budget) -> [Evaluation], .dense_seconds, .tol
    store: SearchState
    budget: Budget
    dense: Evaluation                 # the dense model as candidates are scored (int8 when simulated)
    metric: str                       # the task's metric name, for the log
    log: Callable[[str], None]

    def score(self, genomes: list[Genome]) -> list[Evaluation]:
        """Evaluations of ``genomes`` in order; a prefix when the budget ran out."""
        return self.evaluator.score([self.ladder.to_ranks(g) for g in genomes], self.budget)

    def save(self, payload: dict) -> None:
        self.store.save({"elapsed": self.budget.elapsed(), **payload})

    def progress(self, tag: str, gain: float | None, metric: float | None, evals: int) -> None:
        left = self.budget.left()
        rem = "" if left is None else f", budget left {left / 60:.1f} min"
        g = "-" if gain is None else f"{100 * gain:.1f}%"
        mt = "-" if metric is None else f"{metric:.4f}"
        self.log(f"{tag}: best {self.objective.name} reduction {g}, {self.metric} {mt}, "
                 f"{evals} evaluations, searching {self.budget.elapsed() / 60:.1f} min{rem}")


@dataclass
class Outcome:
    """What a driver found: the plan's ranks and evaluation, and how the search went."""

    ranks: dict[str, int | None]
    evaluation: Evaluation
    history: list[dict]
    frontier: list[dict]
    levels: dict[str, float]
    resumed_from: int | None = None
    stopped: str = "done"
    task_sensitivity: dict[str, float] = field(default_factory=dict)
    # every plan measured feasible on the whole validation split, (ranks, levels, evaluation),
    # largest gain first: what a holdout check walks down when the chosen plan fails it
    feasible: list[tuple[dict, dict, Evaluation]] = field(default_factory=list)
    # the plans racing accepted on a subset and never scored in full (their metric an estimate),
    # largest gain first: what a healed choice may also try (``heal_choice``)
    accepted: list[tuple[dict, dict, Evaluation]] = field(default_factory=list)
    # every plan scored that cuts something, (ranks, evaluation), feasible or not: what the fit
    # stage's refit tries pick from (``measured_record``)
    measured: list[tuple[dict, Evaluation]] = field(default_factory=list)


# ---------------------------------------------------------------- genetic algorithm

def run_genetic(ctx: SearchContext, saved: dict | None, costs: tuple[dict[str, list[float]], str] | None
                ) -> Outcome:
    """Seed (first run only) and run the GA, one generation's candidates scored at once;
    with ``config.surrogate`` each generation's candidates are screened on the surrogate.

    ``costs`` = (name -> estimated cost per ladder level, what it is): the seeds' and the
    surrogate's base; needed only when the state holds no finished seeding (None otherwise:
    the surrogate, costs included, is in the state)."""
    from .surrogate import Surrogate, SurrogateScreen

    config, ladder = ctx.config, ctx.ladder
    gaconf = GAConfig(population=config.population, generations=config.generations, seed=config.seed,
                      elite=min(2, config.population - 1))
    ga = GeneticSearch(len(ladder.names), len(ladder.keeps), None, ctx.evaluator.tol, gaconf)
    # the dense genome was scored when the evaluator measured the reference (or in int8 after it)
    ga.cache[key(ladder.uniform(0))] = ctx.dense
    resumed_from, task_sensitivity = None, _at_half(costs, ladder)
    surrogate = None
    if saved is not None:
        ga.load_state_dict(saved["ga"])
        task_sensitivity = saved.get("task_sensitivity", {})
        resumed_from = ga.generation
        if saved.get("surrogate"):
            surrogate = Surrogate.from_state(saved["surrogate"])
        ctx.log(f"search: resuming after generation {ga.generation} ({len(ga.cache)} evaluations cached)")
    if config.surrogate and surrogate is None and costs is not None:
        surrogate = Surrogate({n: _dense_zero(costs[0][n], ladder.ranks[n]) for n in ladder.names}, ladder.names,
                              costs[1])
    screen = None
    if config.surrogate and surrogate is not None:
        gains = {n: [ctx.objective.gain({n: r}) for r in ladder.ranks[n]] for n in ladder.names}
        additive = isinstance(ctx.objective, ParamObjective)

        def gain_of(genome: Genome) -> float:
            if additive:  # parameters removed add up over matrices
                return sum(gains[n][g] for n, g in zip(ladder.names, genome))
            return ctx.objective.gain(ladder.to_ranks(genome))

        screen = SurrogateScreen(surrogate, gain_of, ctx.evaluator.tol, gaconf.penalty,
                                 explore=max(1, config.population // 8))
        ga.proposer = screen

    def save() -> None:
        ctx.save({"strategy": "ga", "ga": ga.state_dict(), "task_sensitivity": task_sensitivity,
                  "surrogate": None if surrogate is None else surrogate.state_dict()})

    def measured(genome: Genome) -> Evaluation:
        k = key(genome)
        if k not in ga.cache:
            got = ctx.score([genome])
            if not got:
                raise _BudgetSpent
            ga.cache[k] = got[0]
        return ga.cache[k]

    stopped, cut_short = "done", False
    try:
        if ga.generation < 0:
            _seed(ga, ctx, measured, costs)
        while not ga.done():
            if ga.generation >= 0 and _next_generation_too_long(ga, ctx):
                ctx.log(f"search: stopping after generation {ga.generation}: not a quarter of the next one fits "
                        "the budget left")
                stopped = "budget"
                break
            todo = ga.unscored(ga.ask())
            t0 = budget_clock.now()  # the budget's clock: a generation's cost is in its units
            got = ctx.score(todo)
            record = ga.tell(todo[:len(got)], got, seconds=budget_clock.now() - t0)
            if record is None:
                raise _BudgetSpent
            if surrogate is not None:
                # refit only between generations: the next ask must be reproducible from the state
                surrogate.fit(ga.cache)
            save()
            kill_point("search", f"generation-{ga.generation}")
            ctx.progress(f"generation {ga.generation}/{config.generations}", record.best_gain, record.best_metric,
                         record.total_evaluations)
        else:
            stopped = "stalled" if ga.generation < config.generations else "done"
    except _BudgetSpent:
        # Out of time inside the seeding or a generation: stop rather than score the rest as
        # infeasible (a made-up result would be cached as if measured). What was measured is
        # saved, so a rerun with a larger budget replays it and continues.
        stopped, cut_short = "budget", True
        ctx.log("search: budget spent; keeping the best plan scored so far")
        save()
    if stopped == "budget" and ga.generation < 1:
        stopped = BEFORE_FIRST_GENERATION
        ctx.log(f"search: {BEFORE_FIRST_GENERATION}")
    # the best feasible plan over everything scored (seeds a cut-short run had no time to breed
    # from included), confirmed on the whole split: racing only proposes a plan, never keeps it
    ga.refresh_best()
    best = _confirmed_best(ga, ctx)
    save()
    ev = ga.evaluation(best)
    frontier = [dict(gain=e.gain, metric=e.metric, feasible=e.feasible, full=e.full, proxy=e.proxy, rows=e.rows)
                for _, e in sorted(ga.cache.items())]

    def plan_of(genome: Genome) -> tuple[dict, dict]:
        ranks = ladder.to_ranks(genome)
        return ranks, {n: ladder.keeps[g] if ranks[n] is not None else 1.0 for n, g in zip(ladder.names, genome)}

    ranks, levels = plan_of(best)
    if screen is not None:
        ctx.log(f"search: the surrogate screened {screen.screened} plans this run "
                f"({surrogate.n_fit} measured plans in its last fit)")
    def listed(full: bool) -> list:
        return [(*plan_of(genome), e) for genome, e in sorted(
            ((unkey(k), e) for k, e in ga.cache.items() if e.feasible and e.full == full),
            key=lambda ge: (-ge[1].gain, ge[1].proxy, ge[0]))]

    return Outcome(ranks, ev, [asdict(r) for r in ga.history], frontier, levels, resumed_from, stopped,
                   task_sensitivity, listed(True), listed(False),
                   [(ladder.to_ranks(unkey(k)), e) for k, e in sorted(ga.cache.items()) if e.gain > 0])


MAX_CONFIRMATIONS = 8  # racing-accepted plans checked on the full split before falling back


def _confirmed_best(ga: GeneticSearch, ctx: SearchContext) -> Genome:
    """The best feasible genome whose feasibility was measured on the whole validation split:
    racing-accepted ones are confirmed (best first, ``MAX_CONFIRMATIONS`` at most, while the
    budget allows: scoring keeps one full evaluation in reserve for it); a failed one is
    corrected in the cache."""
    for _ in range(MAX_CONFIRMATIONS):
        best = ga.best_feasible
        if best is None or ga.evaluation(best).full:
            break
        if not ctx.budget.allows(ctx.evaluator.dense_seconds):
            ctx.log("search: no time left to confirm the best racing-accepted plan; keeping the best plan "
                    "measured on the whole split")
            break
        got = ctx.evaluator.confirm(ctx.ladder.to_ranks(best))
        ctx.log(f"search: confirming the best plan on the whole split: {ctx.metric} {got.metric:.4f}, drop "
                f"{got.drop:+.4f} ({'within' if got.feasible else 'BEYOND'} the tolerance)")
        ga.correct(best, got)
    best = ga.best_feasible
    if best is None or not ga.evaluation(best).full:
        full = [(unkey(k), e) for k, e in ga.cache.items() if e.feasible and e.full]
        best = max(full, key=lambda ge: (ge[1].gain, -ge[1].proxy, ge[0]))[0] if full else ctx.ladder.uniform(0)
    return best


HOLDOUT_MAX_TRIES = 8  # holdout scores per search: the chosen plan, then a bisection of the rest


def holdout_scorer(tokenizer, task, config: SearchConfig, scorer, model=None):
    """(a scorer, the row indices of it the search never saw): ``config.holdout`` validation rows
    beyond the search's ``val_limit`` rows, drawn as the task's ``[data] sample`` draws them."""
    from ..evaluate import make_scorer

    if config.val_limit is None:
        raise InputError(f"--holdout {config.holdout} needs --val-limit: without it the search scores every "
                         f"validation row of task '{task.name}' and none is left to hold out")
    big = make_scorer(tokenizer, task, "validation", limit=config.val_limit + config.holdout,
                      batch_size=config.batch_size, model=model)
    seen = {(ex.file, ex.line) for ex in scorer.examples}
    # at most val_limit of the val_limit + holdout rows drawn are the search's, whatever the draw
    rows = [i for i, ex in enumerate(big.examples) if (ex.file, ex.line) not in seen][:config.holdout]
    if len(rows) < config.holdout:
        raise InputError(f"--holdout {config.holdout}: the validation split of task '{task.name}' "
                         f"({task.split_path('validation')}) has {big.sample['of']} rows; the search scores "
                         f"{scorer.n} (--val-limit), which leaves {len(rows)} to hold out; lower --holdout or "
                         "--val-limit")
    return big, rows


def _from_chosen(outcome: Outcome, plans: list | None = None) -> list[tuple[dict, dict, Evaluation]]:
    """The plans (default: those the search measured feasible in full), largest first, that
    cut something: the search's own first and then those below it (any listed before it only
    tie it), each set of ranks once (genomes whose levels round to the same ranks are one plan)."""
    plans = [p for p in (outcome.feasible if plans is None else plans) if p[2].gain > 0]
    chosen = next((i for i, p in enumerate(plans) if p[0] == outcome.ranks), None)
    if chosen is None:
        plans.insert(0, (outcome.ranks, outcome.levels, outcome.evaluation))
        chosen = 0
    seen, out = set(), []
    for p in plans[chosen:]:
        k = tuple(sorted(p[0].items()))
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def holdout_choice(outcome: Outcome, model, scorer, rows: list[int], dense: float, tol_abs: float,
                   higher_is_better: bool, dense_ev: Evaluation, log) -> tuple[Outcome, dict]:
    """The largest plan measured feasible by the search whose drop on the held-out rows is also
    within the tolerance, and a record of every holdout score.

    A search that measures many plans near the tolerance keeps the one validation favoured by
    chance (its selection bias); rows it never saw give the chosen plan an unbiased score. The
    chosen plan is tried first; if it fails, a bisection over the rest (largest gain first,
    assuming a smaller plan drops less) finds the largest that passes in
    ``HOLDOUT_MAX_TRIES`` scores at most; the dense model (no cut) when none passes. ``dense``:
    the float32 dense model's metric on the rows, the reference the tolerance is held to."""
    from ..factorize import set_ranks_

    sign = 1.0 if higher_is_better else -1.0
    tries: list[dict] = []
    plans = _from_chosen(outcome)

    def passes(i: int) -> bool:
        ranks, _, ev = plans[i]
        set_ranks_(model, ranks)
        try:
            got = float(scorer.metric(model, rows))
        finally:
            set_ranks_(model, {})
        drop = sign * (dense - got)
        ok = drop <= tol_abs + 1e-12
        tries.append({"gain": ev.gain, "search_metric": ev.metric, "metric": got, "drop": drop, "passed": ok})
        log(f"search: holdout ({len(rows)} rows) plan {100 * ev.gain:.1f}%: {got:.4f}, drop {drop:+.4f} "
            f"({'within' if ok else 'BEYOND'} the tolerance)")
        return ok

    found = None
    if plans and outcome.evaluation.gain > 0:
        if passes(0):
            found = 0
        else:  # bisection for the first passing index of plans[1:], pass assumed monotone in the index
            lo, hi = 1, len(plans) - 1
            while lo <= hi and len(tries) < HOLDOUT_MAX_TRIES:
                mid = (lo + hi) // 2
                if passes(mid):
                    found, hi = mid, mid - 1
                else:
                    lo = mid + 1
    record = {"rows": len(rows), "dense": dense, "tries": tries, "passed": found is not None,
              "search_gain": outcome.evaluation.gain}
    if found == 0 or outcome.evaluation.gain <= 0:
        return outcome, record
    if found is None:
        log("search: no plan the search measured held the tolerance on the holdout rows; keeping the dense model")
        plan = ({n: None for n in outcome.ranks}, {n: 1.0 for n in outcome.ranks}, dense_ev)
    else:
        plan = plans[found]
        log(f"search: the holdout keeps the plan removing {100 * plan[2].gain:.1f}% (the search chose "
            f"{100 * outcome.evaluation.gain:.1f}%)")
    return replace(outcome, ranks=plan[0], levels=plan[1], evaluation=plan[2]), record


HEAL_MAX_TRIES = 3     # healed tries per search (each is --heal-steps steps and one full evaluation)
HEAL_MAX_CONFIRMS = 3  # racing-accepted plans scored in full in search of a larger unhealed fallback
HEAL_MAX_RESCORES = 8  # racing-accepted plans scored in full before they are healed (one evaluation each)
HEAL_MIN_GAIN = 0.01   # a try must remove at least this much more than the fallback (a heal is minutes)


def _swap_low_rank(model, ranks: dict[str, int | None]) -> dict:
    """Replace each cut SearchLinear by a LowRankLinear of its searched factors at the plan's
    rank (the rest stay dense); returns what to put back (``_swap_back``)."""
    from .. import architectures as arch
    from ..factorize import SearchLinear, make_low_rank, set_ranks_

    set_ranks_(model, {})
    swapped = {}
    for name, r in ranks.items():
        module = arch.get_module(model, name)
        if r is None or not isinstance(module, SearchLinear):
            continue
        arch.set_module(model, name, make_low_rank(module.dense, module.Bt[:r].T, module.A[:r]))
        swapped[name] = module
    return swapped


def _fake_quant_(model, names) -> None:
    """int8 weights (per output row, as NNCF's INT8_ASYM) for the LowRankLinear pairs named."""
    import torch

    from .. import architectures as arch
    from ..factorize import fake_quant_int8

    with torch.no_grad():
        for name in names:
            module = arch.get_module(model, name)
            for part in (module.first, module.second):
                part.weight.copy_(fake_quant_int8(part.weight).to(part.weight.dtype))


def _swap_back(model, swapped: dict) -> None:
    from .. import architectures as arch

    arch.set_modules(model, swapped)


def heal_choice(outcome: Outcome, model, tokenizer, task, scorer, config: SearchConfig, tol_abs: float,
                dense: float, higher_is_better: bool, dense_ev: Evaluation, log,
                confirm: Callable[[dict], Evaluation], teacher=None, train_scorer=None) -> tuple[Outcome, dict]:
    """The largest plan the search found feasible at ``tolerance + heal_slack`` that, once
    healed (``config.heal_steps`` steps of ``heal_`` on its searched factors), scores within
    the tolerance on the validation split; and a record of what was tried.

    Healing wins back part of what a cut costs, so a plan somewhat beyond the tolerance may
    heal back within it. The candidates are the plans the search accepted (in full or by
    racing), each set of ranks once, at most the search's own plan.
    - Fallback: the largest plan within the tolerance unhealed, measured in full (racing-
      accepted plans whose estimate is within it are scored in full first, largest first,
      ``HEAL_MAX_CONFIRMS`` at most); the dense model when there is none.
    - Tries (``HEAL_MAX_TRIES`` at most) of the plans beyond the tolerance that remove at
      least ``HEAL_MIN_GAIN`` more than the fallback: the search's own plan first. Each try is scored in full unhealed (``confirm``) if racing
      only estimated it, then healed and scored: its heal gain is the unhealed drop minus the
      healed drop. Every next try is the largest untried plan between the largest that passed
      and the smallest that failed (a smaller plan is assumed to heal to a smaller drop) whose
      unhealed drop minus the mean heal gain so far is within the tolerance; a racing estimate
      is scored in full before it is healed (``HEAL_MAX_RESCORES`` at most) and skipped if its
      full drop no longer predicts a pass. No plan expected to pass ends it.
    ``dense``: the float32 dense metric on the split, the reference the tolerance is held to."""
    from ..heal import heal_

    sign = 1.0 if higher_is_better else -1.0
    tol = tol_abs + 1e-12
    pool = [list(p) for p in _from_chosen(outcome, sorted(outcome.feasible + outcome.accepted,
                                                         key=lambda p: -p[2].gain))]  # [ranks, levels, evaluation]
    confirmed: list[dict] = []

    def full(p: list) -> Evaluation:
        if not p[2].full:
            got = confirm(p[0])
            confirmed.append({"gain": got.gain, "estimate": p[2].metric, "metric": got.metric, "drop": got.drop})
            log(f"search: plan {100 * got.gain:.1f}% in full: {got.metric:.4f}, drop {got.drop:+.4f} "
                f"(racing estimated {p[2].metric:.4f})")
            p[2] = got
        return p[2]

    fallback = next((p for p in pool if p[2].full and p[2].drop <= tol), None)
    for p in [p for p in pool if not p[2].full and p[2].drop <= tol][:HEAL_MAX_CONFIRMS]:
        if fallback is not None and p[2].gain <= fallback[2].gain:
            break
        if full(p).drop <= tol:
            fallback = p
            break
    if fallback is None:
        fallback = [{n: None for n in outcome.ranks}, {n: 1.0 for n in outcome.ranks}, dense_ev]
    cands = [p for p in pool if p[2].gain >= fallback[2].gain + HEAL_MIN_GAIN and p[2].drop > tol]
    tries: list[dict] = []
    lower, upper, best, heal_gains = fallback[2].gain, float("inf"), None, []

    def passes(p: list, predicted: float | None) -> bool:
        ev = full(p)
        log(f"search: healing the plan removing {100 * ev.gain:.1f}% (validation {ev.metric:.4f}, drop "
            f"{ev.drop:+.4f}): {config.heal_steps} {config.heal} steps on its searched factors")
        swapped = _swap_low_rank(model, p[0])
        try:
            h = heal_(model, tokenizer, task, config.heal_steps, lr=config.heal_lr, batch_size=16, seed=config.seed,
                      higher_is_better=higher_is_better, log=log, loss=config.heal, teacher=teacher,
                      train_scorer=train_scorer, rank=config.heal_rank)
            if config.weights == "int8":  # scored as the export computes: the healed factors in int8 too
                _fake_quant_(model, swapped)
            got = float(scorer.metric(model))
        finally:
            _swap_back(model, swapped)
        drop = sign * (dense - got)
        ok = drop <= tol
        heal_gains.append(ev.drop - drop)
        tries.append({"gain": ev.gain, "search_metric": ev.metric, "search_drop": ev.drop, "predicted_drop": predicted,
                      "metric": got, "drop": drop, "passed": ok, "seconds": h.seconds, "loss_first": h.loss_first,
                      "loss_last": h.loss_last})
        log(f"search: healed plan {100 * ev.gain:.1f}%: validation {got:.4f}, drop {drop:+.4f} "
            f"({'within' if ok else 'BEYOND'} the tolerance {tol_abs:.4f}; healing won back {ev.drop - drop:+.4f})")
        return ok

    tried: set[int] = set()
    rescored = 0
    while cands and len(tries) < HEAL_MAX_TRIES:
        predicted = None
        if not tries:
            i = 0
        else:
            g = sum(heal_gains) / len(heal_gains)
            # a racing estimate stands in for the plan's full score until it is picked
            i = next((j for j, p in enumerate(cands) if j not in tried and lower < p[2].gain < upper
                      and p[2].drop - g <= tol), None)
            if i is None:
                log(f"search: no untried plan is expected to heal within the tolerance (mean heal gain {g:+.4f})")
                break
            if not cands[i][2].full:  # scored in full first: a heal costs far more than an evaluation
                if rescored >= HEAL_MAX_RESCORES:
                    log("search: no racing estimate left to score in full for the next try")
                    break
                rescored += 1
                if full(cands[i]).drop - g > tol:
                    tried.add(i)
                    continue
            predicted = cands[i][2].drop - g
        tried.add(i)
        if passes(cands[i], predicted):
            lower, best = cands[i][2].gain, cands[i]
        else:
            upper = min(upper, cands[i][2].gain)
    plan = best if best is not None else fallback
    record = {"slack": config.heal_slack, "tolerance_abs": tol_abs, "steps": config.heal_steps,
              "loss": config.heal, "lr": config.heal_lr, "rank": config.heal_rank,
              "search_gain": outcome.evaluation.gain,
              "fallback_gain": fallback[2].gain, "confirmed": confirmed, "tries": tries, "healed": best is not None,
              "gain": plan[2].gain,
              # what the refit of this plan is held to before it is healed again: its searched drop
              "refit_tolerance_abs": None if best is None else plan[2].drop}
    if best is not None:
        log(f"search: keeping the plan removing {100 * plan[2].gain:.1f}%, within the tolerance once healed")
    elif cands:
        what = (f"the largest plan within the tolerance unhealed ({100 * fallback[2].gain:.1f}%)"
                if fallback[2].gain > 0 else "the dense model (no plan measured was within the tolerance unhealed)")
        log(f"search: no healed plan tried held the tolerance; keeping {what}")
    return replace(outcome, ranks=plan[0], levels=plan[1], evaluation=plan[2]), record


def _dense_zero(costs: list[float], ranks: list) -> list[float]:
    # a level whose rank snaps to dense costs nothing
    return [0.0 if r is None else c for r, c in zip(ranks, costs)]


def _at_half(costs: tuple[dict[str, list[float]], str] | None, ladder: Ladder) -> dict[str, float]:
    """For the bottleneck report: each matrix's label-Fisher cost at the level nearest keep 0.5."""
    if costs is None or costs[1] != "label-Fisher KL":
        return {}
    half = min(range(len(ladder.keeps)), key=lambda i: abs(ladder.keeps[i] - 0.5))
    return {name: costs[0][name][half] for name in ladder.names}


def _next_generation_too_long(ga: GeneticSearch, ctx: SearchContext) -> bool:
    """Whether not even a quarter of the next generation fits the budget left.

    A partial generation is worth starting: its candidates come best first (the surrogate's
    screen orders them by predicted fitness), every one scored counts toward the best plan,
    and scoring stops by itself when the next candidate would not fit (keeping one full
    evaluation in reserve to confirm the chosen plan). A candidate costs what the recent
    generations' did on average (racing settles most on a subset), at least a full evaluation
    when none is known."""
    recent = ga.history[-3:]
    n = sum(r.evaluations for r in recent)
    per_candidate = sum(r.seconds for r in recent) / n if n else ctx.evaluator.dense_seconds
    quarter = max(1, ga.config.population // 4)
    return not ctx.budget.allows(quarter * per_candidate + ctx.evaluator.dense_seconds)


def _seed(ga: GeneticSearch, ctx: SearchContext, measured: Callable[[Genome], Evaluation],
          costs: tuple[dict[str, list[float]], str] | None) -> None:
    """Seeds (replayed from the cache on resume): the best uniform level, and the best trade
    of estimated task cost for gain (per matrix, the level maximizing gain - λ·cost, for a
    range of λ), the largest feasible one found by bisection, plus its neighbours."""
    from ..sensitivity import lagrangian_genomes

    ladder = ctx.ladder
    n_levels = len(ladder.keeps)
    seeds: list[Genome] = []
    u = bisect_largest(n_levels, lambda i: measured(ladder.uniform(i)).feasible)
    seeds.append(ladder.uniform(u))
    if costs is None:
        raise ValueError("the GA's first run needs the seed costs")
    table, source = costs
    gains = {name: [ctx.objective.gain({name: r}) for r in ladder.ranks[name]] for name in ladder.names}
    table = {name: [0.0 if r is None else c for r, c in zip(ladder.ranks[name], table[name])]
             for name in ladder.names}
    genomes = [g for g in lagrangian_genomes(table, gains, ladder.names, n=24) if any(g)]
    e = bisect_largest(len(genomes) + 1, lambda i: i == 0 or measured(genomes[i - 1]).feasible)
    if e > 0:
        seeds.append(genomes[e - 1])
        seeds.extend(genomes[max(e - 3, 0): e - 1])
    seeds.extend(genomes[e: e + 2])  # just beyond: infeasible but close, good parents
    if u + 1 < n_levels:
        seeds.append(ladder.uniform(u + 1))
    ga.seeds = list(dict.fromkeys(seeds))
    ctx.log(f"search: seeds: uniform keep {ladder.keeps[u]} ({100 * measured(ladder.uniform(u)).gain:.1f}%), "
            f"best {source} trade {'-' if e == 0 else f'{100 * measured(genomes[e - 1]).gain:.1f}%'} "
            f"(step {e} of {len(genomes)}); {len(ga.cache)} evaluations")


# ---------------------------------------------------------------- uniform bisection

def run_uniform(ctx: SearchContext, saved: dict | None) -> Outcome:
    """Bisection on one keep fraction for every matrix (the baseline)."""
    from ..lowrank import rank_for_keep

    config, shapes = ctx.config, ctx.objective.shapes
    memo: dict[str, dict] = dict(saved.get("uniform", {})) if saved else {}
    history: list[dict] = list(saved.get("history", [])) if saved else []
    resumed_from = len(history) if saved else None
    stopped = {"why": "done"}

    def ranks_of(keep: float) -> dict[str, int | None]:
        out = {}
        for name, (m, n_) in shapes.items():
            r = rank_for_keep(m, n_, keep, config.multiple)
            out[name] = r if ctx.objective.usable(name, r) else None
        return out

    # 1.0, then every UNIFORM_STEP level whose ranks the decompositions hold: those go as deep
    # as the ladder's first level below 1.0 needs (0.9 by default), so the bisection starts there
    deepest = ladder_max_ranks(shapes, config)
    fine = (round(1.0 - i * UNIFORM_STEP, 6) for i in range(1, int(round(1.0 / UNIFORM_STEP))))
    keeps = [1.0] + [k for k in fine if all(r is None or r <= deepest[name] for name, r in ranks_of(k).items())]
    n = len(keeps)

    def feasible(i: int) -> bool:
        k = f"{keeps[i]:.6f}"
        if k not in memo:
            t0 = time.perf_counter()
            got = ctx.evaluator.score([ranks_of(keeps[i])], ctx.budget)
            if not got:
                stopped["why"] = "budget"
                return False  # out of time: treat the untested level as too deep
            memo[k] = asdict(got[0])
            best = max((v for v in memo.values() if v["feasible"]), key=lambda v: v["gain"],
                       default=memo[f"{1.0:.6f}"])
            history.append({"generation": len(history) + 1, "keep": keeps[i], "feasible": memo[k]["feasible"],
                            "metric": memo[k]["metric"], "best_gain": best["gain"], "best_metric": best["metric"],
                            "best_fitness": best["gain"], "median_fitness": memo[k]["gain"],
                            "evaluations": 1, "total_evaluations": len(memo), "seconds": time.perf_counter() - t0})
            ctx.save({"strategy": "uniform", "uniform": memo, "history": history})
            ctx.progress(f"bisection step {len(history)} (keep {keeps[i]})", best["gain"], best["metric"], len(memo))
        return memo[k]["feasible"]

    memo.setdefault(f"{1.0:.6f}", asdict(ctx.dense))
    i = bisect_largest(n, feasible)
    for _ in range(MAX_CONFIRMATIONS):
        # racing only proposes: the chosen level is confirmed on the whole split (a failed one
        # is corrected and the bisection goes on below it, from what it already measured)
        k = f"{keeps[i]:.6f}"
        if memo[k]["full"] or not memo[k]["feasible"] or not ctx.budget.allows(ctx.evaluator.dense_seconds):
            break
        got = ctx.evaluator.confirm(ranks_of(keeps[i]))
        memo[k] = asdict(got)
        ctx.log(f"search: confirming keep {keeps[i]} on the whole split: {ctx.metric} {got.metric:.4f} "
                f"({'within' if got.feasible else 'BEYOND'} the tolerance)")
        ctx.save({"strategy": "uniform", "uniform": memo, "history": history})
        if got.feasible:
            break
        i = bisect_largest(i, feasible)
    if not memo[f"{keeps[i]:.6f}"]["full"]:  # confirmations ran out: the deepest level measured in full
        i = max((j for j in range(n) if memo.get(f"{keeps[j]:.6f}", {}).get("full")
                 and memo[f"{keeps[j]:.6f}"]["feasible"]), default=0)
    if stopped["why"] == "budget":
        ctx.log(f"search: budget spent after {len(history)} bisection steps; keeping keep {keeps[i]}")
        ctx.save({"strategy": "uniform", "uniform": memo, "history": history})
    def plan_of(keep: float) -> tuple[dict, dict]:
        ranks = ranks_of(keep)
        return ranks, {name: (keep if ranks[name] is not None else 1.0) for name in shapes}

    keep = keeps[i]
    ev = Evaluation(**memo[f"{keep:.6f}"])
    ranks, levels = plan_of(keep)
    frontier = [dict(gain=v["gain"], metric=v["metric"], feasible=v["feasible"], full=v["full"], keep=float(k),
                     proxy=v["proxy"]) for k, v in sorted(memo.items())]
    def listed(full: bool) -> list:
        return [(*plan_of(float(k)), Evaluation(**v)) for k, v in sorted(memo.items(), key=lambda kv: -kv[1]["gain"])
                if v["feasible"] and v["full"] == full]

    return Outcome(ranks, ev, history, frontier, levels, resumed_from, stopped["why"], feasible=listed(True),
                   accepted=listed(False), measured=[(ranks_of(float(k)), Evaluation(**v))
                                                     for k, v in sorted(memo.items()) if v["gain"] > 0])


# ---------------------------------------------------------------- search_plan

def validate_task(task) -> None:
    if "validation" not in task.data:
        declared = ", ".join(s for s in ("train", "calibration", "validation", "test") if s in task.data) or "none"
        raise TaskSpecError(
            f"{task.path}: task '{task.name}' has no 'validation' split in [data] (declared: {declared}); "
            "search scores candidates on validation and keeps test unseen: add data.validation"
        )


def tolerance_in_units(config: SearchConfig, dense_metric: float, tolerance: float | None = None) -> float:
    """``tolerance`` (default ``config.tolerance``) in the metric's units."""
    tolerance = config.tolerance if tolerance is None else tolerance
    return tolerance * abs(dense_metric) if config.relative else tolerance


def spectrum_sensitivity(decs, shapes, multiple) -> dict[str, float]:
    """The spectrum's relative output error of each matrix cut to keep 0.5 (free, no model run)."""
    from ..lowrank import rank_for_keep

    out = {}
    for name, (m, n) in shapes.items():
        r = rank_for_keep(m, n, 0.5, multiple)
        out[name] = decs[name].error(r) if name in decs else 0.0
    return out


def make_objective(config: SearchConfig, shapes: dict[str, tuple[int, int]], log=None, groups=(), task=None):
    """Parameters removed, or time per example removed per the target's cost table (measured
    once per target, then cached); ``groups`` are the matrices the export fuses."""
    if config.objective == "params":
        return ParamObjective(shapes)
    from ..lowrank import rank_for_keep

    wanted = {name: {rank_for_keep(m, n, k, config.multiple) for k in config.ladder}
              for name, (m, n) in shapes.items()}
    return make_time_objective(config, shapes, groups, task, wanted, log)


def ladder_max_ranks(shapes: dict[str, tuple[int, int]], config: SearchConfig) -> dict[str, int]:
    """Per matrix, the deepest rank any ladder level needs (what the decomposition must keep)."""
    from ..lowrank import rank_for_keep

    out = {}
    for name, (m, n) in shapes.items():
        rs = [r for r in (rank_for_keep(m, n, k, config.multiple) for k in config.ladder) if r is not None]
        out[name] = max(rs) if rs else 1
    return out


def search_plan(model, tokenizer, task, config: SearchConfig = SearchConfig(), *,
                budget_minutes: float | None = None, state_path: str | Path | None = None,
                log: Callable[[str], None] | None = None, progress: bool = False,
                decompositions: tuple[dict, int] | None = None,
                seed_costs: dict[str, list[float]] | None = None,
                state_identity: dict | None = None, on_state_mismatch: str = "error",
                workers=None, offload=None) -> SearchResult:
    """Find a keep level per matrix: the largest objective gain within the tolerance.

    The model is modified during the search and restored (dense) before returning. With
    ``state_path`` the search checkpoints itself after every generation (or every
    uniform-bisection step) and a rerun of the same model, task and settings resumes from
    it (``state_identity`` names model and task; default: a hash of the model's weights and
    of the task's files). ``budget_minutes`` bounds the search proper: scoring candidates
    and breeding, not calibration, decomposition, the sensitivity pass or the dense model's
    scores; when it ends, the best plan scored so far is returned (at worst the dense one).
    ``decompositions`` = (name -> Decomposition, calibration tokens) made on the same
    calibration settings, deep enough for the ladder (``calibrate.decompose_all`` or the
    calibrate stage's folder). ``seed_costs`` = name -> label-Fisher KL per ladder level
    (the sensitivity stage's output); without it the GA measures it when it applies.
    ``workers`` (a ``distributed.RayWorkers``): score candidates on Ray actors instead of
    this process; the plan is the same. ``offload`` (a folder, or an ``offload.OffloadedSearch``):
    keep the matrices and their search bases in files there, read one module at a time during
    the forward pass; the plan is the same (``decompositions`` may then be a
    ``calibrate.DecompositionFiles``, read one matrix at a time).
    """
    from .. import architectures as arch
    from ..calibrate import DecompositionFiles, decompose_all
    from ..evaluate import make_scorer, model_device
    from ..factorize import attach_search_, detach_search_, linear_shapes, simulate_int8_
    from ..plan import RankPlan
    from ..tasks import calibration_batches

    say = log or (lambda msg: None)
    validate_task(task)
    if offload is not None and workers is not None:
        raise InputError(OFFLOAD_WITH_WORKERS)
    if budget_minutes is not None and budget_minutes <= 0:
        raise BudgetError(f"budget must be > 0 minutes, got {budget_minutes}")
    shapes = linear_shapes(model)
    objective = make_objective(config, shapes, say, arch.linear_groups(model), task)
    if state_path is not None and state_identity is None:
        from ..stages import model_fingerprint, task_fingerprint

        state_identity = {"model": model_fingerprint(model), "task": task_fingerprint(task)}
    store = SearchState(state_path, config.fingerprint(), state_identity, on_state_mismatch, say)
    saved = store.load()
    if saved is not None and saved.get("strategy") != config.strategy:
        saved = None
    ladder = Ladder(shapes, config.ladder, config.multiple, objective)

    search_method = config.search_method
    if decompositions is not None:
        decs, tokens = decompositions
        lazy = isinstance(decs, DecompositionFiles)  # read when asked: never all in memory
        if set(decs) != set(shapes) or (decs.method != search_method if lazy else
                                        any(d.method != search_method for d in decs.values())):
            raise InputError(f"given decompositions must cover every matrix with method '{search_method}'")
        if not lazy:
            decs = dict(decs)  # the caller keeps its own; ours is dropped once attached
    else:
        say(f"search: calibrating on {config.n_calibration} {task.name} examples and decomposing "
            f"{len(shapes)} matrices ({search_method})")
        batches = None if search_method == "svd" else list(
            calibration_batches(task, tokenizer, config.n_calibration, config.calibration_batch))
        deepest = ladder_max_ranks(shapes, config)
        decs, tokens = decompose_all(model, batches, search_method, max_rank=lambda name, m, n: deepest[name],
                                     progress=progress)
    sensitivity = spectrum_sensitivity(decs, shapes, config.multiple)
    # spectrum error of every matrix at every ladder level (monotone in the level): the fallback seeds
    errors = {name: [0.0 if r is None else decs[name].error(r) for r in ladder.ranks[name]] for name in shapes}

    scorer = make_scorer(tokenizer, task, "validation", limit=config.val_limit, batch_size=config.batch_size,
                         model=model)
    if config.holdout:  # checked before anything is scored: a split too small is an input error
        hold_scorer, hold_rows = holdout_scorer(tokenizer, task, config, scorer, model)
    heal_teacher = (None, None)
    if config.heal_slack:
        if offload is not None:
            raise InputError("--heal-slack does not work with --offload yet: healing trains factors in memory")
        if config.heal == "kl":  # the dense label distribution on train prompts, while the model is dense
            heal_teacher = kl_teacher(model, tokenizer, task, config)
    # Ray actors get the dense model and the decompositions before this process wraps its own
    shared = workers.share(model, decs, say) if workers is not None else None
    if offload is not None:
        from ..offload import OffloadedSearch

        if not isinstance(offload, OffloadedSearch):
            offload = OffloadedSearch(offload, model_device(model))
        if offload.attached:
            say(f"search: the {len(shapes)} matrices and their search bases are offloaded in {offload.folder} "
                "already (the sensitivity stage's files, read one matrix at a time during the forward pass)")
        else:
            say(f"search: offloading the {len(shapes)} matrices and their search bases to {offload.folder} "
                "(read one matrix at a time during the forward pass)")
        offload.attach(model, decs)
        say(f"search: {offload.resident_bytes(model) / 2**30:.2f} GiB of the model stays in memory, "
            f"{sum(f.stat().st_size for f in offload.folder.glob('*.dat')) / 2**30:.2f} GiB offloaded")
    else:
        attach_search_(model, decs)
    del decs  # the SearchLinear modules hold their own copies of the bases, in the model's dtype
    undo_int8 = None
    pool = None
    try:
        costs = None
        if config.strategy == "ga" and (saved is None or saved["ga"]["generation"] < 0):
            if seed_costs is not None:
                costs = ({name: list(seed_costs[name]) for name in shapes}, "label-Fisher KL")
            elif fisher_applies(config, scorer):
                from ..sensitivity import task_costs

                costs = (task_costs(model, scorer, ladder.ranks, config.sensitivity_examples, say),
                         "label-Fisher KL")
            else:
                costs = (errors, "spectrum error")
        evaluator = CandidateEvaluator(model, scorer, objective, 0.0, config.race_size, config.race_z,
                                       higher_is_better=task.metric != "perplexity", seed=config.seed,
                                       reference_path=None if state_path is None else Path(state_path).parent / REFERENCE,
                                       reference_identity=state_identity, log=say)
        tol_abs = tolerance_in_units(config, evaluator.dense_metric)
        # with a heal slack candidates are held to tolerance + slack; the healed choice to the tolerance
        evaluator.tol = search_tol = tolerance_in_units(config, evaluator.dense_metric, config.search_tolerance)
        if config.holdout:  # the float32 dense model on the held-out rows (the model is dense here)
            hold_dense = float(hold_scorer.metric(model, hold_rows))
            say(f"search: {len(hold_rows)} validation rows held out to confirm the plan; dense {task.metric} "
                f"{hold_dense:.4f} on them")
        slack = f" (searching at {search_tol:.4f}: healing must win back the slack)" if config.heal_slack else ""
        say(f"search: dense validation {task.metric} {evaluator.dense_metric:.4f} on {scorer.n} examples "
            f"({evaluator.dense_seconds:.1f} s per full evaluation); tolerance {tol_abs:.4f}{slack}")
        # The tolerance is against the float32 dense model (what the deployment gate compares
        # with); with int8 weights every candidate, dense included, is scored as int8.
        dense_ev = Evaluation(0.0, evaluator.dense_metric, 0.0, True, 0.0, True)
        if config.weights == "int8":
            undo_int8 = simulate_int8_(model)
            dense_ev = evaluator.confirm({})  # on the whole split: every plan is held to it
            say(f"search: int8 weights alone (simulated): validation {task.metric} {dense_ev.metric:.4f}, drop "
                f"{dense_ev.drop:+.4f} ({'within' if dense_ev.feasible else 'BEYOND'} the tolerance)")
            if not dense_ev.feasible:
                say("search: no plan can meet the tolerance in int8: the search keeps looking for the least "
                    "harmful one, but expect the accuracy gate to fail; consider tuning first (--tune-steps), "
                    "fp32 weights, or a larger budget")
        if shared is not None:
            pool = evaluator = shared.evaluator(evaluator, scorer, objective, config, task.metric != "perplexity")
        # the budget counts from here: what came before is preparation, not search
        budget = Budget(budget_minutes, float(saved["elapsed"]) if saved else 0.0).start()
        ctx = SearchContext(config, ladder, objective, evaluator, store, budget, dense_ev, task.metric, say)
        if config.strategy == "uniform":
            outcome = run_uniform(ctx, saved)
        else:
            outcome = run_genetic(ctx, saved, costs)
        if outcome.evaluation.gain < 0:
            # slower than dense by the objective (a time table can price a cut above the dense model):
            # the dense model is the better plan, and a pruned model that is not faster is not shipped
            say(f"search: the best plan found costs more than the dense model by the {config.objective} objective "
                f"(gain {outcome.evaluation.gain:+.4f}); keeping the dense model")
            outcome = replace(outcome, ranks={n: None for n in outcome.ranks}, evaluation=dense_ev,
                              levels={n: 1.0 for n in outcome.levels})
        holdout = None
        if config.holdout:
            outcome, holdout = holdout_choice(outcome, model, hold_scorer, hold_rows, hold_dense, tol_abs,
                                              task.metric != "perplexity", dense_ev, say)
        healing = None
        if config.heal_slack:
            outcome, healing = heal_choice(outcome, model, tokenizer, task, scorer, config, tol_abs,
                                           evaluator.dense_metric, task.metric != "perplexity", dense_ev, say,
                                           evaluator.confirm, *heal_teacher)
        if outcome.stopped == BEFORE_FIRST_GENERATION:
            need = (10 + config.population) * evaluator.dense_seconds / 60
            if budget_minutes is not None:  # this budget was not enough: at least one more generation on top of it
                need = max(need, budget_minutes + (config.population + 1) * evaluator.dense_seconds / 60)
            say(f"search: one full evaluation takes {evaluator.dense_seconds:.0f} s here; the seeds need about 10 "
                f"and a generation up to {config.population}: --budget-minutes {max(need, 0.1):.1f} or more lets "
                "the GA breed")
        # the exact factors the search scored the chosen plan with (B (m, r), A (r, n), model dtype);
        # not gathered when offloaded: they are the plan's size, which is what --offload keeps out
        # of memory (the refit reads its factors from the calibrate stage's files)
        factors = {}
        for name, r in outcome.ranks.items():
            if r is not None and offload is None:
                module = arch.get_module(model, name)
                factors[name] = (module.Bt[:r].T.clone(), module.A[:r].clone())
    finally:
        if pool is not None:
            pool.close()
        elif shared is not None:
            shared.close()
        if undo_int8 is not None:
            undo_int8()
        if offload is not None:
            offload.detach(model)  # the dense weights back where they were; the files deleted
        else:
            detach_search_(model)
    ev = outcome.evaluation
    plan = RankPlan(dict(shapes), outcome.ranks, config.method, config.multiple, outcome.levels)
    plan.meta = {
        "strategy": config.strategy, "objective": config.objective, "tolerance": config.tolerance,
        "relative": config.relative, "tolerance_abs": tol_abs, "heal_slack": config.heal_slack,
        "dense_validation_metric": evaluator.dense_metric,
        "validation_metric": ev.metric, "objective_gain": ev.gain, "seed": config.seed,
        "search_method": search_method, "calibration_tokens": tokens, "validation_examples": scorer.n,
        "stopped": outcome.stopped,
    }
    frontier = outcome.frontier  # every candidate scored, the dense model included
    return SearchResult(
        plan=plan, strategy=config.strategy, objective=config.objective, dense_metric=evaluator.dense_metric,
        metric=ev.metric, gain=ev.gain, tolerance_abs=tol_abs, evaluations=len(frontier),
        full_evaluations=sum(1 for f in frontier if f.get("full", True)), seconds=budget.elapsed(),
        history=outcome.history, frontier=frontier, levels=outcome.levels, sensitivity=sensitivity,
        task_sensitivity=outcome.task_sensitivity,
        dense_int8_metric=dense_ev.metric if config.weights == "int8" else None,
        resumed_from=outcome.resumed_from, stopped=outcome.stopped, factors=factors,
        times=plan_times(objective, outcome.ranks), holdout=holdout, healing=healing,
        measured=measured_record(list(shapes), outcome.measured),
    )


def measured_record(names: list[str], measured: list[tuple[dict, Evaluation]]) -> dict:
    """``SearchResult.measured``: every plan scored, each set of ranks once (the one scored on
    most rows), largest gain first; ranks listed in the order of ``names``."""
    best: dict[tuple, Evaluation] = {}
    for ranks, ev in measured:
        k = tuple(ranks[n] for n in names)
        if k not in best or (ev.full, ev.rows) > (best[k].full, best[k].rows):
            best[k] = ev
    plans = [{"ranks": list(k), "gain": ev.gain, "metric": ev.metric, "drop": ev.drop, "feasible": ev.feasible,
              "full": ev.full, "rows": ev.rows} for k, ev in best.items()]
    plans.sort(key=lambda p: (-p["gain"], p["drop"]))
    return {"names": list(names), "plans": plans}


def train_label_logprobs(model, tokenizer, task, batch_size: int):
    """(scorer of the first ``HEAL_KL_ROWS`` train prompts, the model's float32 label
    log-probs on them): what ``--heal kl`` distils; None for the log-probs when the labels
    are not single tokens."""
    from ..evaluate import make_scorer
    from .config import HEAL_KL_ROWS

    train = make_scorer(tokenizer, task, "train", limit=HEAL_KL_ROWS, batch_size=batch_size, model=model)
    return train, (train.label_logprobs(model).float() if train.fast else None)


def kl_teacher(model, tokenizer, task, config: SearchConfig):
    """(train scorer, the dense model's label log-probs on its rows), or an error naming --heal ce."""
    train, teacher = train_label_logprobs(model, tokenizer, task, config.batch_size)
    if teacher is None:
        raise InputError(f"--heal kl distils the label distribution: task '{task.name}' needs single-token labels "
                         "(see `sieve-edge task show`); use --heal ce")
    return train, teacher


def fisher_applies(config: SearchConfig, scorer) -> bool:
    """The label-Fisher seeds need a GA, examples to measure on, and single-token labels."""
    return config.strategy == "ga" and config.sensitivity_examples > 0 and bool(getattr(scorer, "fast", False))

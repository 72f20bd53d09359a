"""The search as stages, and ``run_search`` (the ``sieve-edge search`` command) on them.

    calibrate → sensitivity → search → [teacher] → reference → fit → [climb] → refit

- calibrate: calibration and decomposition of every matrix (``decompositions.json`` +
  ``layer-NNN.safetensors``); keyed on the model, the task's calibration data and the
  calibration settings, so another tolerance, strategy or target reuses it.
- sensitivity: the label-Fisher cost of every matrix at every ladder level (the GA's seeds).
- search: the plan within the tolerance (plan, history, result, state, report, plots); a
  killed search resumes from ``WORK/search.resume/search_state.json``.
- teacher (``--heal kl`` only): the dense model's label distribution on train prompts.
- reference: the dense model's test metric (what the accuracy gate compares with).
- fit: the plan's ranks refit with ``--method`` (the searched factors kept when that refit
  misses the tolerance): a factorized checkpoint.
- climb (``--refit-tries`` only): larger plans refit from the dense model, the largest whose
  refit holds the tolerance kept (``climb.py``); another N or climb rule reuses the fit.
- refit: the fit healed if asked (a rerun with other healing settings reuses the fit),
  scored on test: the final checkpoint plus everything the search wrote. A plan kept
  because its searched factors healed within the tolerance (``--heal-slack``) whose healed
  refit misses it heals those factors again and ships the better.

``run_search`` keeps these stages in ``OUT/.stages/`` and, when they are done, makes OUT's
visible files those of the refit stage (hard links, the checkpoint manifest last).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import ArtifactError, BudgetError, InputError, TaskSpecError
from ..stages import ModelRef, Stage, StageContext, Workflow, model_ref, task_inputs
from .climb import RULE as CLIMB_RULE
from .config import HEAL_KL_ROWS, SearchConfig, SearchState

STATE = "search_state.json"


def _write_json(path: Path, obj, indent: int | None = 2) -> None:
    path.write_text(json.dumps(obj, indent=indent, default=str) + "\n")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read it ({e}); rerun to rebuild this stage") from e


def param_ladder_ranks(shapes: dict[str, tuple[int, int]], config: SearchConfig) -> dict[str, list[int | None]]:
    """Per matrix, the rank of every ladder level for the parameter objective (None = dense)."""
    from ..lowrank import rank_for_keep

    return {name: [rank_for_keep(m, n, k, config.multiple) for k in config.ladder] for name, (m, n) in shapes.items()}


class CalibrateStage(Stage):
    name = "calibrate"

    def __init__(self, model: ModelRef, task, config: SearchConfig, progress: bool = False):
        method = config.search_method
        super().__init__(
            config={"model": model.config, "method": method, "n_calibration": config.n_calibration,
                    "calibration_batch": config.calibration_batch, "max_length": 256, "draw_seed": 0,
                    "ladder": list(config.ladder), "multiple": config.multiple},
            inputs={**model.inputs, **task_inputs(task, () if method == "svd" else ("calibration",))},
            needs=model.needs)
        self.model, self.task, self.settings, self.progress = model, task, config, progress

    def build(self, ctx: StageContext, out: Path) -> dict:
        from ..calibrate import iter_decompositions, save_decompositions
        from ..factorize import linear_shapes
        from ..tasks import calibration_batches
        from .drivers import ladder_max_ranks

        cfg, method = self.settings, self.settings.search_method
        folder = self._stream_folder()
        lazy = None
        if folder is not None:
            # one decoder layer at a time from the safetensors files: memory follows the largest
            # layer, not the model (the same factors as the in-memory path)
            from ..lazy import LazyCheckpoint
            from ..models import load_tokenizer

            lazy = LazyCheckpoint(folder, device=ctx.device, trust_remote_code=ctx.trust_remote_code)
            model, tok = lazy.model, load_tokenizer(self.model.spec, trust_remote_code=ctx.trust_remote_code)
        else:
            model, tok = ctx.model(self.model.spec)
        shapes = linear_shapes(model)
        deepest = ladder_max_ranks(shapes, cfg)
        ctx.log(f"calibrate: {cfg.n_calibration} {self.task.name} examples, decomposing {len(shapes)} matrices "
                f"({method}) down to the ladder's largest rank"
                + (f", streaming one decoder layer at a time from {folder}" if lazy is not None else ""))
        batches = None if method == "svd" else list(
            calibration_batches(self.task, tok, cfg.n_calibration, cfg.calibration_batch, max_length=256, seed=0))
        try:
            manifest = save_decompositions(
                out, iter_decompositions(model, batches, method, lambda name, m, n: deepest[name], self.progress,
                                         weights=lazy),
                n_calibration=cfg.n_calibration, calibration_batch=cfg.calibration_batch, draw_seed=0,
                max_length=256, split="calibration")
        finally:
            if lazy is not None:
                lazy.close()
        return {"detail": f"{len(manifest['matrices'])} matrices ({method}), {manifest['tokens']} tokens"
                          + (", streamed layer by layer" if lazy is not None else ""),
                "method": method, "tokens": manifest["tokens"], "matrices": len(manifest["matrices"]),
                "streamed": lazy is not None}

    def _stream_folder(self) -> Path | None:
        return stream_folder(self.model)


def stream_folder(model: ModelRef) -> Path | None:
    """The model's folder when it can be read layer by layer (dense safetensors on disk)."""
    if model.preloaded is not None:
        return None
    from ..lazy import streamable
    from ..models import resolve_source

    source = resolve_source(model.spec)
    folder = source.path if source.kind in ("folder", "checkpoint") else None
    if source.kind == "hub":
        try:  # a hub model already in the local cache is a folder like any other
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.hub_id, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: loaded (and downloaded) whole, as before
            folder = None
    if folder is not None and streamable(folder):
        return Path(folder)
    return None


def offloaded_scoring_model(ctx: StageContext, model: ModelRef, folder: Path):
    """(model, tokenizer, ``offload.OffloadedSearch``) for scoring with ``--offload folder``.

    A dense safetensors folder is read as the model's skeleton with its embedding, norms and
    head only: each matrix is read from its file when it is offloaded, so the whole model is
    never in memory. Any other model (GGUF, alias, one handed in memory) is the context's
    in-memory one; its matrices are offloaded while candidates are scored and put back after.
    """
    from ..evaluate import model_device
    from ..models import load_tokenizer
    from ..offload import OffloadedSearch, skeleton_with_resident_weights

    source = stream_folder(model)
    if source is not None:
        ctx.log(f"loading {model.spec} without its matrices (each read from its file when it is offloaded)")
        lazy = skeleton_with_resident_weights(source, device=ctx.device, trust_remote_code=ctx.trust_remote_code)
        tok = load_tokenizer(model.spec, trust_remote_code=ctx.trust_remote_code)
        return lazy.model, tok, OffloadedSearch(folder, lazy.device, weights=lazy)
    loaded, tok = ctx.model(model.spec)
    return loaded, tok, OffloadedSearch(folder, model_device(loaded))


def offload_key(model: ModelRef, folder: str | Path) -> str:
    """What an offloaded scoring model is held under between the sensitivity and search stages."""
    return f"offloaded {model.spec} in {Path(folder).resolve()}"


class SensitivityStage(Stage):
    name = "sensitivity"

    def __init__(self, model: ModelRef, task, config: SearchConfig, offload: str | Path | None = None):
        super().__init__(
            config={"examples": config.sensitivity_examples, "ladder": list(config.ladder),
                    "multiple": config.multiple, "val_limit": config.val_limit},
            inputs=task_inputs(task, ("validation",)), needs=("calibrate",))
        self.model, self.task, self.settings = model, task, config
        self.offload = offload  # where the matrices live while scored (not keyed: the same numbers)

    def applies(self, ctx: StageContext) -> str | None:
        if self.settings.strategy != "ga":
            return "the uniform strategy has no seeds to rank"
        if self.settings.sensitivity_examples == 0:
            return "sensitivity_examples is 0 (the GA seeds from the spectrum error)"
        if self.task.kind != "classification":
            return f"a {self.task.kind} task has no label distribution (the GA seeds from the spectrum error)"
        return None

    def build(self, ctx: StageContext, out: Path) -> dict:
        from ..calibrate import DecompositionFiles, load_decompositions
        from ..evaluate import make_scorer
        from ..factorize import attach_search_, detach_search_, linear_shapes
        from ..sensitivity import task_costs

        cfg = self.settings
        offload = None
        if self.offload is not None:
            model, tok, offload = offloaded_scoring_model(ctx, self.model, Path(self.offload))
        else:
            model, tok = ctx.model(self.model.spec)
        scorer = make_scorer(tok, self.task, "validation", limit=cfg.val_limit, batch_size=cfg.batch_size,
                             model=model)
        if not scorer.fast:
            why = "the task's labels are not single distinct tokens (the GA seeds from the spectrum error)"
            _write_json(out / "sensitivity.json", {"applies": False, "why": why})
            return {"detail": f"not measured: {why}", "applies": False}
        ranks = param_ladder_ranks(linear_shapes(model), cfg)
        if offload is not None:
            offload.attach(model, DecompositionFiles(ctx.output("calibrate")))
        else:
            decs, _, _ = load_decompositions(ctx.output("calibrate"))
            attach_search_(model, decs)
            del decs
        try:
            kl = task_costs(model, scorer, ranks, cfg.sensitivity_examples, ctx.log)
        except BaseException:
            offload.detach(model) if offload is not None else detach_search_(model)
            raise
        if offload is not None:
            # the search stage scores on the same offloaded matrices: held for it rather than
            # deleted and written to disk again (freed after the search stage if it does not take them)
            ctx.hold(offload_key(self.model, self.offload), (model, tok, offload), lambda: offload.detach(model),
                     until="search")
        else:
            detach_search_(model)
        _write_json(out / "sensitivity.json", {
            "applies": True, "measure": "label-Fisher KL(dense || cut) per ladder level",
            "examples": min(cfg.sensitivity_examples, scorer.n), "ladder": list(cfg.ladder),
            "ranks": ranks, "kl": kl}, indent=1)
        return {"detail": f"label-Fisher KL of {len(kl)} matrices on {min(cfg.sensitivity_examples, scorer.n)} "
                          "validation examples", "applies": True}


def search_summary(result, task, config: SearchConfig, model_spec: str, budget_minutes: float | None) -> dict:
    """The search's part of search.json (the refit adds its scores)."""
    return {
        "model": str(model_spec), "task": task.name, "metric": task.metric,
        "strategy": config.strategy, "objective": config.objective, "method": config.method,
        "tolerance": config.tolerance, "relative": config.relative, "tolerance_abs": result.tolerance_abs,
        "seed": config.seed, "linear_param_reduction": result.plan.linear_param_reduction,
        "objective_gain": result.gain, "weights": config.weights,
        "validation": {"dense": result.dense_metric, "dense_int8": result.dense_int8_metric, "search": result.metric,
                       "n": result.plan.meta["validation_examples"]},
        "evaluations": result.evaluations, "full_evaluations": result.full_evaluations,
        "search_seconds": result.seconds, "budget_minutes": budget_minutes,
        "generations": len(result.history), "resumed_from": result.resumed_from, "stopped": result.stopped,
        # time objective: the workload, the cost table, and the dense model's and the plan's
        # milliseconds per example in the registry matrices (prompt pass + decode steps)
        "time": result.times,
        "holdout": result.holdout,
        "heal_slack": config.heal_slack, "healing": result.healing,
    }


class SearchStage(Stage):
    name = "search"
    version = 2               # 2: result.json lists every plan measured (what the fit's refit tries pick from)

    def __init__(self, model: ModelRef, task, config: SearchConfig, budget_minutes: float | None, *,
                 on_state_mismatch: str = "restart", progress: bool = False, workers=None,
                 offload: str | Path | None = None):
        inputs = task_inputs(task, ("validation", "train") if config.heal_slack else ("validation",))
        settings = {"settings": config.fingerprint(), "budget_minutes": budget_minutes}
        if config.holdout:
            settings["holdout"] = config.holdout
        if config.heal_slack:  # the healed choice: the fingerprint's tolerance is the search's (tolerance + slack)
            settings["heal choice"] = {"tolerance": config.tolerance, "slack": config.heal_slack,
                                       "steps": config.heal_steps, "lr": config.heal_lr, "loss": config.heal,
                                       **({"rank": config.heal_rank} if config.heal_rank else {})}
        if config.objective != "params" and config.target is not None:
            # what the time objective reads of the profile (not its budgets: a changed gate
            # re-validates, it does not re-search)
            from ..targets import load_profile
            from .objectives import workload_of

            profile = load_profile(config.target)
            settings["settings"] = {**settings["settings"], "target": profile.name}
            settings["time target"] = {
                "runtime": profile.runtime, "device": profile.device, "arch": profile.arch,
                "weights": profile.weights, "threads": profile.threads, "precision": profile.inference_precision,
                "dynamic_quantization": profile.dynamic_quantization, "workload": list(workload_of(config, task, profile))}
        super().__init__(config=settings,
                         inputs=inputs, needs=("calibrate",) + (("sensitivity",) if config.strategy == "ga" else ()))
        self.model, self.task, self.settings, self.budget = model, task, config, budget_minutes
        self.on_state_mismatch, self.progress = on_state_mismatch, progress
        # where candidates are scored (a distributed.RayWorkers) and where the matrices live while
        # scored (--offload): not keyed, the plan is the same
        self.workers, self.offload = workers, offload

    def _state(self, ctx: StageContext) -> SearchState:
        # the calibrate key covers the model weights and the calibration data; the validation
        # data the candidates are scored on is hashed beside it
        identity = {"calibration": ctx.keys["calibrate"], "task": ctx.inputs[self.slot]["task"],
                    "validation data": ctx.inputs[self.slot].get("task data validation")}
        return SearchState(ctx.scratch(self.slot) / STATE, self.settings.fingerprint(), identity,
                           self.on_state_mismatch, ctx.log)

    def preflight(self, ctx: StageContext) -> None:
        """An unfinished search of another model, task or settings is refused before anything runs."""
        if self.on_state_mismatch != "error" or self.slot in ctx.forced:
            return
        store = self._state(ctx)
        saved = store.read()
        if saved is not None:
            store.load()  # raises the ArtifactError that says what differs

    def build(self, ctx: StageContext, out: Path) -> dict:
        from ..calibrate import DecompositionFiles, load_decompositions
        from .drivers import search_plan
        from .report import search_report, write_plots

        scratch = ctx.scratch(self.slot)
        if self.slot in ctx.forced:
            shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        previous = ctx.output(self.slot) / STATE
        if not (scratch / STATE).is_file() and previous.is_file() and self.slot not in ctx.forced:
            # a finished search rerun with another budget continues from where it stopped
            shutil.copy2(previous, scratch / STATE)
        offload = None
        if self.offload is not None:
            # the matrices and bases on disk; the decompositions read one matrix at a time
            held = ctx.claim(offload_key(self.model, self.offload))
            model, tok, offload = held or offloaded_scoring_model(ctx, self.model, Path(self.offload))
            decs = DecompositionFiles(ctx.output("calibrate"))
            tokens = decs.tokens
        else:
            model, tok = ctx.model(self.model.spec)
            decs, tokens, _ = load_decompositions(ctx.output("calibrate"))
        sens = ctx.summary("sensitivity")
        seed_costs = None
        if "sensitivity" in self.needs and sens.get("applies"):
            seed_costs = _read_json(ctx.output("sensitivity") / "sensitivity.json")["kl"]
        store = self._state(ctx)
        workers = None
        if self.workers is not None:
            # actors load the model from its files (one handed in memory goes through the object
            # store) and the bases from this calibrate output, on the device this process chose
            # ("auto" resolved here: Ray hides GPUs from an actor that did not ask for one)
            from ..models import pick_device

            workers = self.workers.with_sources(
                model_spec=None if self.model.preloaded else self.model.spec,
                decompositions=str(ctx.output("calibrate")), trust_remote_code=ctx.trust_remote_code,
                device=pick_device(ctx.device).type)
        result = search_plan(model, tok, self.task, self.settings, budget_minutes=self.budget,
                             state_path=scratch / STATE, log=ctx.log, progress=self.progress,
                             decompositions=(decs, tokens), seed_costs=seed_costs,
                             state_identity=store.identity, on_state_mismatch=self.on_state_mismatch,
                             workers=workers, offload=offload)
        del decs
        summary = search_summary(result, self.task, self.settings, self.model.spec, self.budget)
        data = {**result.to_dict(), "summary": summary}
        result.plan.to_json(out / "plan.json")
        _write_json(out / "history.json", {"strategy": self.settings.strategy, "generations": result.history,
                                           "frontier": result.frontier}, indent=1)
        _write_json(out / "result.json", data, indent=1)
        if (scratch / STATE).is_file():
            shutil.copy2(scratch / STATE, out / STATE)
        write_plots(out, summary, data)
        (out / "search_report.md").write_text(search_report(summary, data))
        red = result.plan.linear_param_reduction
        ms = ""
        if result.times:
            ms = (f", {result.times['dense']['example_ms']:.1f} -> {result.times['plan']['example_ms']:.1f} ms per "
                  "example in the matrices (cost table)")
        return {"detail": f"linear params -{red:.1%}{ms}, validation {self.task.metric} {result.metric:.4f} "
                          f"(dense {result.dense_metric:.4f}), {result.evaluations} evaluations, "
                          f"{result.seconds / 60:.1f} min searching, stopped: {result.stopped}",
                "linear_param_reduction": red, "stopped": result.stopped, "search_seconds": result.seconds,
                "time": result.times}

    def committed(self, ctx: StageContext, output: Path) -> None:
        shutil.rmtree(ctx.scratch(self.slot), ignore_errors=True)  # the output holds the final state


class ReferenceStage(Stage):
    name = "reference"

    def __init__(self, model: ModelRef, task, test_limit: int | None):
        super().__init__(config={"model": model.config, "test_limit": test_limit},
                         inputs={**model.inputs, **task_inputs(task, ("test",))}, needs=model.needs)
        self.model, self.task, self.test_limit = model, task, test_limit

    def build(self, ctx: StageContext, out: Path) -> dict:
        from ..bundle import measure_reference

        model, tok = ctx.model(self.model.spec)
        ref = measure_reference(model, tok, self.task, self.model.spec, self.test_limit)
        _write_json(out / "reference.json", ref)
        return {"detail": f"dense {ref['metric']} {ref['value']:.4f} (n={ref['n']})", "metric": ref["metric"],
                "value": ref["value"], "n": ref["n"]}


class TeacherStage(Stage):
    """The dense model's label log-probabilities on the train prompts: what ``--heal kl``
    distills into the factors. It runs before the fit takes the model for its refit."""

    name = "teacher"

    def __init__(self, model: ModelRef, task, config: SearchConfig):
        super().__init__(config={"model": model.config, "rows": HEAL_KL_ROWS, "batch_size": config.batch_size},
                         inputs={**model.inputs, **task_inputs(task, ("train",))}, needs=model.needs)
        self.model, self.task, self.batch_size = model, task, config.batch_size

    def build(self, ctx: StageContext, out: Path) -> dict:
        from safetensors.torch import save_file

        from .drivers import train_label_logprobs

        model, tok = ctx.model(self.model.spec)
        scorer, lp = train_label_logprobs(model, tok, self.task, self.batch_size)
        if lp is None:  # labels of several tokens: healing says so (--heal ce is the way)
            _write_json(out / "teacher.json", {"applies": False, "rows": scorer.n})
            return {"detail": "labels are not single tokens: no label distribution to distill"}
        lp = lp.cpu().contiguous()
        save_file({"logprobs": lp}, str(out / "teacher.safetensors"))
        _write_json(out / "teacher.json", {"applies": True, "rows": scorer.n, "labels": int(lp.shape[1])})
        return {"detail": f"dense label distribution on {scorer.n} train prompts"}


def read_teacher(folder: Path, rows: int):
    """The teacher stage's (rows, labels) log-probabilities, or None when its labels are not
    single tokens (``heal_`` then refuses ``--heal kl`` with its own message)."""
    from safetensors.torch import load_file

    meta = _read_json(folder / "teacher.json")
    if not meta["applies"]:
        return None
    if meta["rows"] != rows:
        raise ArtifactError(f"{folder}: the teacher covers {meta['rows']} train prompts, the healing draws {rows}; "
                            "rerun to rebuild this stage")
    return load_file(str(folder / "teacher.safetensors"))["logprobs"]


def searched_factors(ctx: StageContext, plan) -> dict:
    """The plan's factors as the search scored them: float32 slices of the calibrate stage's bases."""
    from ..calibrate import load_decompositions

    decs, _, _ = load_decompositions(ctx.output("calibrate"))
    return {name: decs[name].factors(r) for name, r in plan.factorized.items()}


def heal_searched_instead_(refit, factors: dict, heal, current: float, higher_is_better: bool):
    """Swap the searched ``factors`` into ``refit`` in place of its low-rank pairs, heal them
    (``heal(refit)``, a ``HealResult``) and keep them if they then score better than
    ``current`` (the healed refit's validation score); else put the refit's own pairs back.
    Returns (the HealResult, whether the searched factors were kept, their score)."""
    from .. import architectures as arch
    from ..factorize import factorize_

    own = {name: arch.get_module(refit, name) for name in factors}  # the pairs themselves, not copies
    factorize_(refit, factors)
    h = heal(refit)
    kept = (1.0 if higher_is_better else -1.0) * (h.metric - current) > 0
    if not kept:
        arch.set_modules(refit, own)
    return h, kept, h.metric


def refit_settings(config: SearchConfig) -> dict:
    """The settings a refit of a plan depends on (the fit's and each refit try's key)."""
    return {"method": config.method, "n_calibration": config.n_calibration,
            "calibration_batch": config.calibration_batch, "multiple": config.multiple,
            "val_limit": config.val_limit, "batch_size": config.batch_size, "seed": config.seed}


def heal_settings(config: SearchConfig) -> dict:
    """The settings a heal depends on beside the refit's (the refit stage's key, and each
    healed refit try's)."""
    return {"heal_steps": config.heal_steps, "heal_lr": config.heal_lr,
            **({"heal": config.heal} if config.heal != "ce" else {}),
            **({"heal_rank": config.heal_rank} if config.heal_rank else {})}


def healer(ctx: StageContext, tok, task, config: SearchConfig, val_scorer, model):
    """``heal(model)`` -> ``HealResult``: --heal-steps of --heal on ``model``'s factors, kept
    only if ``val_scorer`` scores them no worse; the refit stage's heal and the climb's. The
    same seed, data and steps heal the same weights the same way."""
    from ..evaluate import make_scorer
    from ..heal import heal_

    teacher = train_scorer = None
    if config.heal == "kl":
        train_scorer = make_scorer(tok, task, "train", limit=HEAL_KL_ROWS, batch_size=config.batch_size, model=model)
        teacher = read_teacher(ctx.output("teacher"), train_scorer.n)

    def heal(m):
        return heal_(m, tok, task, config.heal_steps, lr=config.heal_lr, batch_size=16, seed=config.seed,
                     val_scorer=val_scorer, higher_is_better=task.metric != "perplexity", log=ctx.log,
                     loss=config.heal, teacher=teacher, train_scorer=train_scorer, rank=config.heal_rank)

    return heal


class FitStage(Stage):
    """The plan's ranks refit with --method (the searched factors back in when that refit
    misses the tolerance): a factorized checkpoint plus ``fit.json``. Refit tries are the
    climb stage's and healing and the test score the refit stage's, so another
    --refit-tries or --heal-steps reuses this fit.

    ``keep_dense``: refit a copy and leave the dense model of a preloaded spec (one handed
    in memory, with no files to load it from again) for the climb stage's tries."""

    name = "fit"

    def __init__(self, model: ModelRef, task, config: SearchConfig, progress: bool = False, keep_dense: bool = False):
        splits = ("validation",) + (("calibration",) if config.method != config.search_method else ())
        super().__init__(
            config=refit_settings(config),
            inputs=task_inputs(task, splits),
            needs=("calibrate", "search") + model.needs)
        self.model, self.task, self.settings, self.progress = model, task, config, progress
        self.keep_dense = keep_dense

    def build(self, ctx: StageContext, out: Path) -> dict:
        import time

        from ..checkpoint import build_manifest, save_checkpoint
        from ..evaluate import make_scorer
        from ..factorize import factorize_
        from ..plan import RankPlan

        t0 = time.perf_counter()
        cfg, task = self.settings, self.task
        searched = ctx.output("search")
        plan = RankPlan.from_json(searched / "plan.json")
        data = _read_json(searched / "result.json")
        sign = 1.0 if task.metric != "perplexity" else -1.0
        if self.keep_dense and self.model.preloaded is not None:
            model, tok = ctx.model(self.model.spec)
            model = copy.deepcopy(model)
        else:
            model, tok = ctx.model(self.model.spec, take=True)  # refit in place
        ctx.log(f"refit: plan {100 * plan.linear_param_reduction:.1f}% of linear parameters removed, validation "
                f"{task.metric} {data['metric']:.4f} (dense {data['dense_metric']:.4f}); refitting with '{cfg.method}'")
        val_scorer = make_scorer(tok, task, "validation", limit=cfg.val_limit, batch_size=cfg.batch_size,
                                 model=model)
        search_method = plan.meta["search_method"]
        if cfg.method == search_method:
            refit = factorize_(model, searched_factors(ctx, plan))
        else:
            from ..prune import prune

            refit = prune(model, tok, task, plan, cfg.method, n_calibration=cfg.n_calibration,
                          batch_size=cfg.calibration_batch, multiple=cfg.multiple, progress=self.progress).model
        method_used = cfg.method
        val_refit = float(val_scorer.metric(refit))
        notes = []
        # a plan kept because it healed within the tolerance is held, before healing, to the drop
        # its searched factors had when they healed
        limit = max(data["tolerance_abs"], (data.get("healing") or {}).get("refit_tolerance_abs") or 0.0)
        if sign * (data["dense_metric"] - val_refit) > limit + 1e-12 and cfg.method != search_method:
            # The sequential refit of the same ranks missed the tolerance: put back the factors the
            # search measured (replacing each LowRankLinear keeps the rest of the model as it was).
            beyond = "beyond the tolerance" if limit == data["tolerance_abs"] else \
                "below the searched factors the healed choice started from"
            notes.append(f"the '{cfg.method}' refit scored {val_refit:.4f} on validation, {beyond}; "
                         f"kept the '{search_method}' factors the search measured instead")
            ctx.log("refit: " + notes[-1])
            refit = factorize_(refit, searched_factors(ctx, plan))
            method_used = search_method
            val_refit = float(val_scorer.metric(refit))
        save_checkpoint(refit, tok, out, build_manifest(refit, base_model=self.model.spec, method=method_used,
                                                        task=task.name))
        plan.to_json(out / "plan.json")
        _write_json(out / "fit.json", {"method": method_used, "validation": val_refit, "notes": notes,
                                       "validation_rows": val_scorer.record(), "seconds": time.perf_counter() - t0})
        return {"detail": f"{method_used}: linear params -{plan.linear_param_reduction:.1%}, validation "
                          f"{task.metric} {val_refit:.4f}", "method": method_used, "validation": val_refit,
                "linear_param_reduction": plan.linear_param_reduction}


class ClimbStage(Stage):
    """Refit tries (``--refit-tries N``, ``climb.py``): larger plans than the fit's, each refit
    with --method from a fresh dense model; the largest whose refit stays within the tolerance
    is kept. Its output: ``climb.json`` (every try; ``applies``: false, and why, when the fit's
    plan cannot climb), plus the checkpoint and ``plan.json`` of the plan kept, if any. The
    fit's refit of the searched plan is the start, so another N or climb rule reuses it."""

    name = "climb"

    def __init__(self, model: ModelRef, task, config: SearchConfig, progress: bool = False):
        super().__init__(
            config={**refit_settings(config), "refit_tries": config.refit_tries, "climb_rule": CLIMB_RULE,
                    # the tries are held to the tolerance on the held-out rows too
                    **({"holdout": config.holdout} if config.holdout else {}),
                    # and healed as the refit stage would heal them before they are judged
                    **(heal_settings(config) if config.heal_steps else {})},
            inputs=task_inputs(task, ("validation", "calibration") + (("train",) if config.heal_steps else ())),
            needs=("search", "fit") + (("teacher",) if config.heal_steps and config.heal == "kl" else ())
            + model.needs)
        self.model, self.task, self.settings, self.progress = model, task, config, progress

    def build(self, ctx: StageContext, out: Path) -> dict:
        from ..checkpoint import build_manifest, save_checkpoint
        from ..evaluate import make_scorer
        from ..plan import RankPlan

        cfg, task = self.settings, self.task
        searched, fitted = ctx.output("search"), ctx.output("fit")
        data = _read_json(searched / "result.json")
        fit = _read_json(fitted / "fit.json")
        why = None
        if (data.get("healing") or {}).get("healed"):
            why = "the plan was kept because its searched factors healed within the tolerance (--heal-slack)"
        elif fit["method"] != cfg.method and not cfg.heal_steps:
            # healed tries are judged after healing: a refit that missed unhealed may pass healed
            why = (f"the '{cfg.method}' refit of the searched plan missed the tolerance (the fit kept the searched "
                   "factors), so no larger plan is tried")
        if why is not None:
            ctx.log(f"refit tries: none: {why}")
            _write_json(out / "climb.json", {"applies": False, "why": why})
            return {"detail": f"no tries: {why}", "applies": False}
        plan = RankPlan.from_json(fitted / "plan.json")
        sign = 1.0 if task.metric != "perplexity" else -1.0
        # each try refits a fresh dense model: a copy of one handed in memory (no files to load it
        # from), else one loaded from the spec again, so that one model is in memory at a time
        preloaded = self.model.preloaded is not None
        dense, tok = ctx.model(self.model.spec, take=not preloaded)
        pending = [] if preloaded else [dense]  # the first try refits the model loaded here

        def fresh():
            if preloaded:
                return copy.deepcopy(dense)
            return pending.pop() if pending else ctx.model(self.model.spec, take=True)[0]

        # the scorers' prompt limit comes from the model's context window, as in the fit's
        val_scorer = make_scorer(tok, task, "validation", limit=cfg.val_limit, batch_size=cfg.batch_size,
                                 model=dense)
        held = None
        if cfg.holdout:
            from .drivers import holdout_scorer

            held = holdout_scorer(tok, task, cfg, val_scorer, dense)
        heal = healer(ctx, tok, task, cfg, val_scorer, dense) if cfg.heal_steps else None
        if not preloaded:
            del dense

        def save(model) -> None:
            save_checkpoint(model, tok, out, build_manifest(model, base_model=self.model.spec, method=cfg.method,
                                                            task=task.name), force=True)

        kept, val_kept, climb = self._climb(ctx, plan, data, float(fit["validation"]), val_scorer, sign, save, fresh,
                                            tok, held, heal, start=fit["method"])
        if climb["kept"]:
            kept.to_json(out / "plan.json")
        _write_json(out / "climb.json", {"applies": True, **climb, "validation": val_kept})
        detail = (f"kept {100 * kept.linear_param_reduction:.1f}% (searched {100 * plan.linear_param_reduction:.1f}%), "
                  f"validation {task.metric} {val_kept:.4f}" if climb["kept"] else
                  f"kept the searched plan ({100 * plan.linear_param_reduction:.1f}%)")
        return {"detail": detail, "applies": True, "kept": climb["kept"]}

    def _climb(self, ctx: StageContext, plan, data: dict, val_refit: float, val_scorer, sign: float, save, fresh,
               tok, held=None, heal=None, *, start: str):
        """Refit tries (``climb.py``): (the plan kept, its refit's validation score, the record).
        The checkpoint of the plan kept is in the stage's output (``save``); ``fresh()`` gives a
        dense model to refit. ``held``: (scorer, rows) of the ``--holdout`` rows; a try's drop is
        then the larger of its drops on the search's rows and on those, each against the dense
        model on the same rows, so a plan kept holds the tolerance on both. ``heal(model)``
        (--heal-steps): each refit is healed before it is scored, so a try is judged as the
        refit stage would ship it; the plan kept is saved healed, with its heal record. ``start``:
        the method of the factors the fit kept (``cfg.method``, or the searched factors' when that
        refit missed the tolerance and the tries are healed)."""
        import time
        from dataclasses import asdict

        from ..plan import RankPlan
        from ..prune import prune
        from .climb import between, candidates, climb

        cfg, task = self.settings, self.task
        cands = candidates(data.get("measured"), data["gain"], str(ctx.output("search") / "result.json"))
        kept = {"plan": plan, "validation": val_refit}
        start_gap = sign * (val_refit - data["metric"])
        ctx.log(f"refit: the searched plan refit with '{cfg.method}' scored {val_refit:.4f} against "
                f"{data['metric']:.4f} searched (gap {start_gap:+.4f} in the tolerance's units); up to "
                f"{cfg.refit_tries} larger plans of the {len(cands)} measured beyond it may be refit"
                if start == cfg.method else
                f"refit: the fit kept the searched '{start}' factors (its '{cfg.method}' refit missed the tolerance "
                f"unhealed), validation {val_refit:.4f}; up to {cfg.refit_tries} larger plans of the {len(cands)} "
                f"measured beyond it may be refit with '{cfg.method}' and healed")

        last: dict = {}
        held_scores: list[dict] = []
        healed: list[dict] = []
        hold_dense = None
        if held is not None:
            recorded = data.get("holdout") or {}
            if recorded.get("rows") == len(held[1]) and recorded.get("dense") is not None:
                hold_dense = float(recorded["dense"])  # the search scored the dense model on these rows
            else:
                hold_dense = float(held[0].metric(fresh(), held[1]))

        def refit_drop(c) -> float:
            t0 = time.perf_counter()
            last.clear()  # the previous try's model goes before the next is loaded
            model = fresh()
            p = RankPlan(dict(plan.shapes), dict(c.ranks), cfg.method, plan.multiple)
            p.keep = {n: p.keep_of(n) for n in p.factorized}
            p.meta = {**plan.meta, "objective_gain": c.gain, "validation_metric": c.metric,
                      "refit_tries": {"searched_gain": data["gain"], "searched_metric_full": c.full,
                                      "made": c.made}}
            model = prune(model, tok, task, p, cfg.method, n_calibration=cfg.n_calibration,
                          batch_size=cfg.calibration_batch, multiple=cfg.multiple, progress=self.progress).model
            healing = None
            if heal is not None:
                healing = heal(model)
                v = healing.metric
                healed.append({"gain": c.gain, "refit": healing.metric_before, "healed": healing.metric_after,
                               "kept": healing.kept, "refit_drop": sign * (data["dense_metric"] - healing.metric_before),
                               "drop": sign * (data["dense_metric"] - v), "seconds": healing.seconds})
                ctx.log(f"refit: healed ({cfg.heal}, {cfg.heal_steps} steps): {healing.outcome()}")
            else:
                v = float(val_scorer.metric(model))
            last.update(model=model, plan=p, validation=v, heal=healing)
            drop = sign * (data["dense_metric"] - v)
            if held is not None:
                h = float(held[0].metric(model, held[1]))
                held_drop = sign * (hold_dense - h)
                held_scores.append({"gain": c.gain, "validation_drop": drop, "holdout": h, "holdout_drop": held_drop})
                ctx.log(f"refit: holdout ({len(held[1])} rows) {h:.4f}, drop {held_drop:+.4f}; on the search's rows "
                        f"{drop:+.4f}")
                drop = max(drop, held_drop)
            ctx.log(f"refit: the try took {time.perf_counter() - t0:.0f} s")
            return drop

        def keep(c) -> None:
            save(last["model"])
            kept.update(plan=last["plan"], validation=last["validation"], heal=last["heal"])

        best, tries = climb(cands, start_gain=data["gain"], start_gap=start_gap,
                            start_drop=sign * (data["dense_metric"] - val_refit), tolerance=data["tolerance_abs"],
                            tries=cfg.refit_tries, refit_drop=refit_drop, keep=keep, log=ctx.log,
                            start_ranks=dict(plan.ranks),
                            make=lambda low, high, target: between(plan.shapes, plan.multiple, low, high, target),
                            # healed tries: the searched plan's refit (the start) was not healed
                            start_gap_bound=heal is not None)
        last.clear()
        return kept["plan"], kept["validation"], {
            "tries_allowed": cfg.refit_tries, "searched_gain": data["gain"], "start_gap": start_gap, "start": start,
            "method": cfg.method,
            "tries": tries, "kept": best is not None, "gain": data["gain"] if best is None else best.gain,
            **({"holdout": {"rows": len(held[1]), "dense": hold_dense, "tries": held_scores}} if held else {}),
            **({"healing": {"steps": cfg.heal_steps, "loss": cfg.heal, "lr": cfg.heal_lr, "rank": cfg.heal_rank,
                            "tries": healed},
                "heal": None if kept.get("heal") is None else asdict(kept["heal"])} if heal is not None else {})}


class RefitStage(Stage):
    """The fit stage's checkpoint, healed if asked, scored on test: the final factorized
    checkpoint plus everything the search wrote.

    ``score_test``: score it on the test split with torch against the reference stage's
    dense score (``sieve-edge search``); the pipeline leaves that to ``validate``, which
    scores the exported bundle on the target's runtime.
    """

    name = "refit"
    version = 2               # 2: the refit itself is the fit stage's; this one heals and scores

    def __init__(self, model: ModelRef, task, config: SearchConfig, test_limit: int | None, score_test: bool = True):
        splits = ("validation", "test") if score_test else ("validation",)
        if config.heal_steps:
            splits += ("train",)
        super().__init__(
            config={**heal_settings(config), "val_limit": config.val_limit, "batch_size": config.batch_size,
                    "test_limit": test_limit, "seed": config.seed},
            inputs=task_inputs(task, splits),
            needs=("fit", "search") + (("climb",) if config.refit_tries else ())
            + (("reference",) if score_test else ())
            + (("teacher",) if config.heal_steps and config.heal == "kl" else ())
            # a healed choice whose healed refit misses the tolerance heals the searched factors instead
            + (("calibrate",) if config.heal_slack else ()) + model.needs)
        self.model, self.task, self.settings, self.test_limit = model, task, config, test_limit
        self.score_test = score_test
        if not score_test:
            self.config.pop("test_limit")

    def build(self, ctx: StageContext, out: Path) -> dict:
        import time
        from dataclasses import asdict

        from ..checkpoint import MANIFEST, load_checkpoint, read_manifest, save_checkpoint
        from ..evaluate import make_scorer
        from ..models import load_tokenizer, pick_device
        from ..plan import RankPlan
        from .report import search_report

        t0 = time.perf_counter()
        cfg, task = self.settings, self.task
        searched, fitted = ctx.output("search"), ctx.output("fit")
        data = _read_json(searched / "result.json")
        fit = _read_json(fitted / "fit.json")
        climb = None
        if "climb" in self.needs:
            climb = _read_json(ctx.output("climb") / "climb.json")
            climb = {k: v for k, v in climb.items() if k != "applies"} if climb.get("applies") else None
        if climb is not None and climb["kept"]:
            # a larger plan the refit tries kept: its checkpoint and plan are the climb's
            fitted = ctx.output("climb")
            # (a --method refit, also when the fit kept the searched factors: healed tries may pass)
            fit = {**fit, "validation": climb["validation"], "method": cfg.method,
                   "notes": fit["notes"] + [f"refit tries: kept the plan removing {100 * climb['gain']:.1f}% "
                                            f"(searched {100 * data['summary']['linear_param_reduction']:.1f}%); its "
                                            f"'{cfg.method}' refit scored {climb['validation']:.4f} on validation"
                                            + (" healed" if climb.get("heal") else "")]}
        plan = RankPlan.from_json(fitted / "plan.json")
        summary = dict(data["summary"])
        if climb is not None:
            summary["refit_tries"] = climb
            if climb["kept"]:  # the report, plots and summary describe the plan kept
                summary.update(linear_param_reduction=plan.linear_param_reduction, objective_gain=climb["gain"])
                # a plan the climb made between two tries was never searched: the plots mark its refit
                searched_metric = plan.meta["validation_metric"]
                summary["validation"] = {**summary["validation"], "search": searched_metric}
                data = {**data, "gain": climb["gain"],
                        "metric": fit["validation"] if searched_metric is None else searched_metric,
                        "levels": {n: plan.keep_of(n) if r is not None else 1.0 for n, r in plan.ranks.items()}}
        higher = task.metric != "perplexity"
        healing = bool(cfg.heal_steps and plan.factorized)
        if healing or self.score_test:  # else the fit's checkpoint passes through unread
            tok = load_tokenizer(str(fitted), trust_remote_code=ctx.trust_remote_code)
            refit = load_checkpoint(fitted, device=pick_device(ctx.device), trust_remote_code=ctx.trust_remote_code)
        method_used, val_refit, notes = fit["method"], float(fit["validation"]), list(fit["notes"])
        heal = None
        healed_here = False
        if healing and climb is not None and climb["kept"] and climb.get("heal"):
            # the climb judged its tries healed with these settings: the plan kept is already healed
            from ..heal import HealResult

            heal = HealResult(**climb["heal"])
            ctx.log(f"refit: the refit tries healed the plan kept ({cfg.heal}, {cfg.heal_steps} steps): "
                    f"{heal.outcome()}; not healed again")
            val_refit, val_final = heal.metric_before, heal.metric
        elif healing:
            val_scorer = make_scorer(tok, task, "validation", limit=cfg.val_limit, batch_size=cfg.batch_size,
                                     model=refit)
            healed = healer(ctx, tok, task, cfg, val_scorer, refit)
            heal = healed(refit)
            healed_here = True
            ctx.log(f"refit: healing ({cfg.heal}) {cfg.heal_steps} steps: {heal.outcome()}")
            val_final = heal.metric
        else:
            val_final = val_refit
        healed_choice = data.get("healing") or {}
        sign = 1.0 if higher else -1.0

        def beyond(v: float) -> bool:
            return sign * (data["dense_metric"] - v) > data["tolerance_abs"] + 1e-12

        heal_searched = None
        if healed_choice.get("healed") and beyond(val_final):
            tried = next(t["metric"] for t in healed_choice["tries"] if t["passed"] and t["gain"] == healed_choice["gain"])
            search_method = plan.meta["search_method"]
            if healed_here and method_used != search_method:
                # The search kept this plan because its own factors healed within the tolerance; the
                # same heal (seed, data, steps) of those factors repeats that try.
                ctx.log(f"refit: the healed '{method_used}' refit scored {val_final:.4f}, beyond the tolerance; "
                        f"healing the '{search_method}' factors the search healed to {tried:.4f}")
                heal_searched, swapped, got = heal_searched_instead_(refit, searched_factors(ctx, plan), healed,
                                                                    val_final, higher)
                if swapped:
                    notes.append(f"the healed '{method_used}' refit scored {val_final:.4f} on validation, beyond the "
                                 f"tolerance; kept the '{search_method}' factors the search measured, healed again: "
                                 f"{got:.4f}")
                    method_used, val_final = search_method, got
                else:
                    notes.append(f"the '{search_method}' factors the search measured scored {got:.4f} on validation "
                                 f"healed again, no better than the healed '{method_used}' refit ({val_final:.4f})")
                ctx.log("refit: " + notes[-1])
            if beyond(val_final):
                notes.append(f"the plan was kept because its searched factors healed within the tolerance (validation "
                             f"{tried:.4f}); the refit scored {val_final:.4f} after healing, beyond it")
                ctx.log("refit: " + notes[-1])
        test = None
        if self.score_test:
            from ..evaluate import score_extra_tests

            test_scorer = make_scorer(tok, task, "test", limit=self.test_limit, batch_size=cfg.batch_size,
                                      model=refit)
            test_metric = float(test_scorer.metric(refit))
            reference = _read_json(ctx.output("reference") / "reference.json")
            dense_test = float(reference["value"])
            test = {"dense": dense_test, "pruned": test_metric, "drop": sign * (dense_test - test_metric),
                    "n": test_scorer.n, "rows": test_scorer.record()}
            dense_extra = reference.get("extra_tests") or {}
            extra = score_extra_tests(refit, tok, task, limit=self.test_limit, batch_size=cfg.batch_size)
            if extra:  # [[extra_test]] sets, beside the test split
                test["extra_tests"] = {name: {"pruned": r.value, "n": r.n,
                                              "dense": (dense_extra.get(name) or {}).get("value")}
                                       for name, r in extra.items()}
            plan.meta.update({"test_metric": test_metric, "dense_test_metric": dense_test})
        total = sum(ctx.seconds.get(s, 0.0) for s in ("calibrate", "sensitivity", "search", "reference", "fit",
                                                      "climb"))
        summary.update({
            "method": method_used,
            "validation": {**summary["validation"], "refit": val_refit, "final": val_final,
                           "rows": fit["validation_rows"]},
            "test": test, "heal": None if heal is None else asdict(heal),
            "heal_searched": None if heal_searched is None else asdict(heal_searched), "notes": notes,
            "total_seconds": total + time.perf_counter() - t0,
        })
        plan.method = method_used
        plan.meta.update({"refit_method": method_used})
        # the fit's manifest (healing keeps the ranks) with the search's scores
        manifest = {**read_manifest(fitted), "method": method_used, "search": {k: summary[k] for k in (
            "strategy", "objective", "tolerance", "relative", "validation", "test", "seed")}}
        if (healed_here and heal.kept) or method_used != fit["method"]:
            save_checkpoint(refit, tok, out, manifest)
        else:  # the fit's weights unchanged: linked, not written again
            for f in fitted.iterdir():
                if f.is_file() and f.name not in (MANIFEST, "fit.json", "climb.json"):
                    _link(f, out / f.name)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        plan.to_json(out / "plan.json")
        _write_json(out / "search.json", summary)
        climbed = climb is not None and climb["kept"]
        plots = () if climbed else ("frontier.png", "heatmap.png")  # a larger plan kept gets its own, below
        for name in ("history.json", *plots, STATE):
            if (searched / name).is_file():  # the state is absent only when nothing was scored
                shutil.copy2(searched / name, out / name)
        if climbed:
            from .report import write_plots

            write_plots(out, summary, data)
        (out / "search_report.md").write_text(search_report(summary, data))
        scores = (f"test {task.metric} {test['pruned']:.4f} (dense {test['dense']:.4f})" if test else
                  f"validation {task.metric} {val_final:.4f}")
        return {"detail": f"{method_used}: linear params -{plan.linear_param_reduction:.1%}, {scores}",
                "linear_param_reduction": plan.linear_param_reduction, "test": test}


def search_stages(model: ModelRef, task, config: SearchConfig, *, budget_minutes: float | None,
                  test_limit: int | None, on_state_mismatch: str = "restart", progress: bool = False,
                  score_test: bool = True, workers=None, offload: str | Path | None = None) -> list[Stage]:
    """calibrate → sensitivity → search → [teacher →] [reference →] fit → refit, for a model
    and a task (the teacher, the dense label distribution, only for ``--heal kl``; the
    reference, the dense test metric, only when the refit is scored on test).
    ``offload``: the folder the sensitivity and search stages keep the matrices in."""
    stages = [CalibrateStage(model, task, config, progress), SensitivityStage(model, task, config, offload),
              SearchStage(model, task, config, budget_minutes, on_state_mismatch=on_state_mismatch, progress=progress,
                          workers=workers, offload=offload)]
    # the stages reading the dense model run before the fit, which takes it for its refit
    if config.heal_steps and config.heal == "kl":
        stages.append(TeacherStage(model, task, config))
    if score_test:
        stages.append(ReferenceStage(model, task, test_limit))
    stages.append(FitStage(model, task, config, progress, keep_dense=bool(config.refit_tries)))
    if config.refit_tries:
        stages.append(ClimbStage(model, task, config, progress))
    return stages + [RefitStage(model, task, config, test_limit, score_test)]


# ---------------------------------------------------------------- sieve-edge search

def check_search_task(task) -> None:
    """The search scores on validation and keeps test for the end: both must exist."""
    from .drivers import validate_task

    validate_task(task)
    if "test" not in task.data:
        raise TaskSpecError(f"{task.path}: task '{task.name}' has no 'test' split in [data]: the search scores "
                            "its final plan on test, which it never saw; add data.test")


def check_offload(offload: str | Path | None, workers) -> None:
    """--offload's folder is usable scratch, and not combined with Ray workers."""
    if offload is None:
        return
    from ..offload import check_offload_dir
    from .drivers import OFFLOAD_WITH_WORKERS

    if workers is not None:
        raise InputError(OFFLOAD_WITH_WORKERS)
    check_offload_dir(offload)


def _check_out(out: Path, force: bool) -> None:
    """OUT may be empty, hold this command's stages, or (with --force) a finished search."""
    from ..checkpoint import MANIFEST, describe_folder

    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a folder")
    if not out.exists():
        return
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    finished = (out / MANIFEST).is_file() and (out / "plan.json").is_file() and (out / "history.json").is_file()
    if finished and not force:
        raise ArtifactError(f"output folder {out} already holds a finished search; pass --force to redo it")
    if visible and not finished and not (out / STATE).is_file():
        raise ArtifactError(f"output folder {out} already holds {describe_folder(out) or 'other files'}; "
                            "choose another --out")


def publish(src: Path, out: Path) -> None:
    """Make OUT's visible files those of ``src`` (hard links where possible). The checkpoint
    manifest goes first out and last in, and the state file first in: a half-published OUT
    reads as a search in progress, never as a finished checkpoint."""
    from ..checkpoint import MANIFEST

    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.name.startswith("."):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    files = sorted((f for f in src.iterdir() if f.is_file() and f.name != MANIFEST),
                   key=lambda f: (f.name != STATE, f.name))
    for f in [*files, src / MANIFEST]:
        _link(f, out / f.name)


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_search(model_spec, task_spec, out, config: SearchConfig = SearchConfig(), *,
               budget_minutes: float | None = None, force: bool = False, test_limit: int | None = None,
               log: Callable[[str], None] | None = None, progress: bool = False, model=None, tokenizer=None,
               work=None, trust_remote_code: bool = False, workers=None, device: str | None = None,
               offload: str | Path | None = None) -> dict:
    """The ``search`` command: search a plan, refit it with ``config.method``, heal, score test, write ``out``.

    ``out`` ends as a factorized checkpoint folder plus ``plan.json``, ``history.json``,
    ``search.json``, ``search_report.md``, ``frontier.png``, ``heatmap.png`` and the final
    ``search_state.json``. The stages live in ``work`` (default ``OUT/.stages``): rerunning
    the same command resumes a killed search and recalibrates nothing already calibrated.
    A folder holding an unfinished search of another model, task or settings is refused
    (``force`` starts the search over; it also redoes a finished one, reusing the
    calibration when it matches). Returns the summary also stored in ``search.json``.
    ``workers`` (a ``distributed.RayWorkers``) scores candidates on Ray actors; ``device``
    (auto, cpu, cuda) is where the stages run the model; ``offload`` (a scratch folder) keeps
    the scored matrices and their search bases on disk (``offload.OffloadedSearch``).
    """
    from ..tasks import TaskSpec, load_task

    say = log or (lambda msg: None)
    task = task_spec if isinstance(task_spec, TaskSpec) else load_task(task_spec)
    check_search_task(task)  # before loading a model: fail in a second, not in a minute
    check_offload(offload, workers)
    if config.objective != "params" and config.target is not None:
        from ..targets import load_profile
        from .objectives import check_time_target

        check_time_target(load_profile(config.target))
    if budget_minutes is not None and budget_minutes <= 0:
        raise BudgetError(f"budget must be > 0 minutes, got {budget_minutes}")
    out = Path(out)
    _check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".stages" if work is None else Path(work)
    ref = model_ref(model_spec, model, tokenizer, trust_remote_code)
    stages = search_stages(ref, task, config, budget_minutes=budget_minutes, test_limit=test_limit,
                           on_state_mismatch="restart" if force else "error", progress=progress, workers=workers,
                           offload=offload)
    preloaded = {ref.spec: ref.preloaded} if ref.preloaded else None
    flow = Workflow(work, stages, force={"search", "fit", "climb", "refit"} if force else False, log=say,
                    preloaded=preloaded, meta={"command": "search", "out": str(out)},
                    trust_remote_code=trust_remote_code, device=device)
    flow.run()
    refit = flow.ctx.output("refit")
    publish(refit, out)
    summary = _read_json(out / "search.json")
    say(f"search: wrote {out} (test {task.metric} {summary['test']['pruned']:.4f}, "
        f"dense {summary['test']['dense']:.4f})")
    return summary

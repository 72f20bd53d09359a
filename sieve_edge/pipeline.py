"""The one-command pipeline, and the only module that knows the stage order.

    tune? → calibrate → sensitivity → search → refit → export → reference → bundle → validate

Each stage is a ``stages.Stage`` with a content-addressed key (its settings, the content of
the files it reads, the keys of the stages it consumes) and an output folder written
atomically with a record (``stage.json``). Rerunning the command skips every stage whose
key matches and whose output verifies, and reruns the rest and everything downstream of
them; ``WORK/run.json`` says which ran, which were skipped, and why. A killed run resumes
where it stopped (a search from its last generation), and a changed input (tune steps, a
line of a data file, the model, a profile) reruns exactly the stages that read it and the
stages after them. ``validate`` always runs: it is the check.

Layout: the bundle is ``OUT``; the stages live beside it in ``OUT.work/`` (``--work`` to
share them between targets): ``tune/``, ``calibrate/``, ``sensitivity/``, ``search/``,
``refit/`` (the factorized checkpoint), ``export-FORMAT-WEIGHTS/``, ``reference/`` (the
dense model's test metric, what the accuracy gate compares with), each with its record
``SLOT.stage.json`` beside it, and ``run.json``.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ArtifactError, BudgetError, InputError
from .stages import ModelRef, Stage, StageContext, StageRecord, Workflow, model_ref, task_inputs

ORDER = "tune? → calibrate → sensitivity → search → refit → export → reference → bundle → validate"


@dataclass
class RunSummary:
    bundle: str
    work: str = ""
    stages: list[StageRecord] = field(default_factory=list)
    report: dict | None = None

    def table(self) -> str:
        lines = ["| stage | status | why | time | detail |", "|---|---|---|---|---|"]
        for s in self.stages:
            lines.append(f"| {s.slot} | {s.status} | {s.why} | {s.seconds:.0f} s | {s.detail} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


class TuneStage(Stage):
    """Full fine-tuning on the train split: small models are weak zero-shot."""

    name = "tune"

    def __init__(self, model: ModelRef, task, steps: int, seed: int):
        from .tune import DEFAULT_LR

        self.lr = DEFAULT_LR[False]
        super().__init__(config={"model": model.config, "steps": steps, "lr": self.lr, "seed": seed, "lora": False,
                                 "batch_size": 16, "max_length": 256},
                         inputs={**model.inputs, **task_inputs(task, ("train",))}, needs=model.needs)
        self.model, self.task, self.steps, self.seed = model, task, steps, seed

    def build(self, ctx: StageContext, out: Path) -> dict:
        from .tune import save_tuned, tune

        model, tok = ctx.model(self.model.spec, take=True)  # tuned in place
        net = tune(model, tok, self.task, steps=self.steps, lr=self.lr, seed=self.seed)
        save_tuned(net, tok, out, base_model=self.model.spec, task=self.task.name, steps=self.steps, lora=False,
                   lr=self.lr, seed=self.seed, force=True)
        return {"detail": f"{self.steps} steps"}


class ExportStage(Stage):
    """The refit checkpoint for the target's runtime and weight precision (one slot per pair)."""

    name = "export"

    def __init__(self, fmt: str, weights: str, task, task_head: bool | None):
        # the split export.fidelity checks the exported model's metric on
        check = next((s for s in ("validation", "test", "calibration") if s in task.data), None)
        super().__init__(slot=f"export-{fmt}-{weights}",
                         config={"format": fmt, "weights": weights, "task_head": task_head},
                         inputs=task_inputs(task, (check,) if check else ()), needs=("refit",))
        self.fmt, self.weights, self.task, self.task_head = fmt, weights, task, task_head

    def build(self, ctx: StageContext, out: Path) -> dict:
        from .export import export_model

        res = export_model(str(ctx.output("refit")), self.fmt, "fp32" if self.weights == "int4" else self.weights,
                           out, int4=self.weights == "int4", task=self.task, task_head=self.task_head, force=True,
                           log=ctx.log)
        return {"detail": f"{self.fmt} {res.manifest.get('weights', self.weights)}"}


class BundleStage(Stage):
    """Model files, tokenizer, task, profile, reference, card and the torch-free runner, in OUT."""

    name = "bundle"
    external = True                               # OUT is written atomically by make_bundle
    unverified = ("MODEL_CARD.md", "reports/")    # validate adds reports and updates the card

    def __init__(self, out: Path, export_slot: str, task, profile):
        inputs = task_inputs(task, ("test",))
        if profile.path:
            inputs["target profile"] = Path(profile.path)
        super().__init__(config={"target": profile.name}, inputs=inputs, needs=(export_slot, "reference"))
        self.out, self.export_slot, self.task, self.profile = Path(out), export_slot, task, profile

    def output(self, work: Path) -> Path:
        return self.out

    def record_path(self, work: Path) -> Path:
        # one record per bundle folder, in the work folder (the bundle ships without it)
        digest = hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:12]
        return work / f"bundle-{self.out.name}-{digest}.stage.json"

    def verify(self, output: Path) -> str | None:
        from .bundle import read_bundle

        try:
            read_bundle(output)
        except ArtifactError as e:
            return str(e)
        return None

    def build(self, ctx: StageContext, out: Path) -> dict:
        from .bundle import make_bundle

        make_bundle(ctx.output(self.export_slot), self.task, self.profile, out,
                    reference=ctx.output("reference") / "reference.json", force=True,
                    card_info={"pipeline": f"sieve-edge run (work folder {ctx.work.name})"}, log=ctx.log,
                    trust_remote_code=ctx.trust_remote_code)
        return {"detail": str(out)}


class ValidateStage(Stage):
    """The bundle's runner in a child process, per the profile's gates (always runs: it is the check)."""

    name = "validate"
    always = True

    def __init__(self, out: Path, profile, test_limit: int | None):
        inputs = {"target profile": Path(profile.path)} if profile.path else {}
        super().__init__(config={"test_limit": test_limit}, inputs=inputs, needs=("bundle",))
        self.out, self.profile, self.test_limit = Path(out), profile, test_limit

    def output(self, work: Path) -> Path:
        return self.out / "reports" / self.profile.name

    def build(self, ctx: StageContext, out: Path) -> dict:
        from .validate import host_arch, validate

        profile = self.profile
        if profile.arch not in ("any", host_arch()):
            # another CPU's kernels cannot run here; emulation (accuracy only, slow) is the user's call
            command = f"sieve-edge validate --bundle {self.out} --target {profile.path or profile.name}"
            detail = (f"not run: target {profile.name} is for {profile.arch}, this host is {host_arch()}; check "
                      f"the accuracy on emulated {profile.arch} with `{command} --emulate` (after `sieve-edge "
                      "emulator setup`), and everything with `python runner.py` in the bundle on the device")
            ctx.log(f"[validate] {detail}")
            return {"detail": detail, "status": "not run", "report": None}
        report = validate(self.out, profile, limit=self.test_limit, log=ctx.log)
        return {"detail": report.message(), "status": report.status, "report": report.to_dict()}


def default_objective(profile, log=None) -> str:
    """`time` where this host can time the target's kernels, else `params` (said in the log)."""
    from .validate import host_arch

    if profile.arch in ("any", host_arch()) and profile.device == "cpu":
        return "time"
    if log:
        log(f"objective: params (target {profile.name} is {profile.arch} {profile.device}: this "
            f"{host_arch()} host cannot time its kernels)")
    return "params"


def run(model: str, task: str, target: str, out, *, tune_steps: int = 0, tolerance: float | None = None,
        strategy: str = "ga", objective: str | None = None, method: str = "sieve",
        budget_minutes: float | None = None, seed: int = 0,
        n_calibration: int = 512, val_limit: int | None = 300, test_limit: int | None = None,
        holdout: int = 0, heal_steps: int = 0, heal_lr: float = 1e-4, heal: str = "ce", heal_slack: float = 0.0,
        heal_rank: int = 0, refit_tries: int = 0, task_head: bool | None = None,
        force: bool = False, work=None, log: Callable[[str], None] | None = None,
        trust_remote_code: bool = False, workers=None, device: str | None = None,
        offload: str | Path | None = None) -> RunSummary:
    """Run every stage for one model, task and target; return the summary (report included).

    tolerance: allowed metric drop on the validation split (default: half the target's
    `max_metric_drop`). budget_minutes: time for the search proper (not calibration,
    sensitivity, scoring). objective: what the plan minimises, `time` (the target's measured
    milliseconds per example at its [workload]) or `params`; default `time`, or `params` for a
    target of another CPU architecture than this host's (its kernels cannot be timed here).
    The caller decides what a failed gate means (`summary.report`).
    work: the stage folder (default `OUT.work`); runs for several targets of one model and
    task can share it, so tuning and calibration run once (and the search too with the
    params objective; the time objective searches per target runtime, workload and threads)
    and export onwards is redone. force: rerun every stage. trust_remote_code: let transformers run code the
    model folder names (off unless the user turns it on). workers: a
    ``search.distributed.RayWorkers`` to score the search's candidates on Ray actors (the
    same plan). device: auto, cpu or cuda, where the stages run the model (not keyed).
    offload: a scratch folder where the sensitivity and search stages keep the matrices and
    their search bases while scoring (read one at a time; not keyed, the same plan).
    holdout: validation rows beyond ``val_limit`` the search never scores, held out to confirm
    its plan (``sieve-edge search --holdout``).
    heal_steps, heal_lr, heal, heal_rank: the refit stage's healing (steps, learning rate, loss
    ``ce`` or ``kl``, adapter rank or 0 for the factors themselves), as in ``sieve-edge
    search``; kept only if validation does not get worse.
    heal_slack: the search accepts plans up to tolerance + slack and keeps the largest that
    heals back within the tolerance (``sieve-edge search --heal-slack``).
    refit_tries: larger plans the search measured refit with ``method`` after it; the largest
    whose refit is within the tolerance is kept (``sieve-edge search --refit-tries``).
    """
    from .checkpoint import describe_folder
    from .search import SearchConfig, search_stages
    from .search.stage import ReferenceStage, check_offload, check_search_task
    from .targets import load_profile
    from .tasks import load_task

    say = log or (lambda msg: None)
    spec = load_task(task)
    profile = load_profile(target)
    if tolerance is None:
        # Half the target's accuracy budget: the rest is left for int8 weights and for the
        # gap between the validation split the search sees and the test split the gate uses.
        if profile.budget.max_metric_drop is None:
            raise InputError(f"target {profile.name} sets no budget.max_metric_drop; pass --tolerance")
        tolerance = profile.budget.max_metric_drop / 2
    if tune_steps < 0:
        raise InputError(f"--tune-steps must be >= 0, got {tune_steps}")
    if budget_minutes is not None and budget_minutes <= 0:
        raise BudgetError(f"--budget-minutes must be > 0, got {budget_minutes}")
    check_search_task(spec)
    check_offload(offload, workers)
    objective = default_objective(profile, say) if objective is None else objective
    if objective != "params":
        from .search.objectives import check_time_target

        check_time_target(profile)
    # candidates are scored in the target's int8 when it ships int8 (int4 is not simulated)
    config = SearchConfig(tolerance=tolerance, method=method, strategy=strategy, seed=seed,
                          objective=objective, target=None if objective == "params" else str(profile.path or target),
                          n_calibration=n_calibration, val_limit=val_limit, heal_steps=heal_steps,
                          heal_lr=heal_lr, heal=heal, heal_rank=heal_rank, holdout=holdout, heal_slack=heal_slack,
                          refit_tries=refit_tries,
                          weights="int8" if profile.weights == "int8" else "fp32")
    out = Path(out)
    work = out.with_name(out.name + ".work") if work is None else Path(work)
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise InputError(f"--work {work} must not be the bundle folder {out} or inside it")
    if out.exists() and any(out.iterdir()) and describe_folder(out) != "bundle":
        raise ArtifactError(f"output folder {out} already holds {describe_folder(out) or 'other files'}; "
                            "choose another --out")

    base = model_ref(model, trust_remote_code=trust_remote_code)
    stages: list[Stage] = []
    source = base
    if tune_steps:
        stages.append(TuneStage(base, spec, tune_steps, seed))
        source = ModelRef(str(work / "tune"), needs=("tune",))
    # an unfinished search of other inputs is started over: its stage key changed. The refit
    # is not scored on test with torch: validate scores the bundle on the target's runtime.
    stages += search_stages(source, spec, config, budget_minutes=budget_minutes, test_limit=test_limit,
                            on_state_mismatch="restart", score_test=False, workers=workers, offload=offload)
    fmt = {"onnxruntime": "onnx", "openvino": "openvino"}[profile.runtime]
    export = ExportStage(fmt, profile.weights, spec, task_head)
    stages += [export, ReferenceStage(source, spec, test_limit), BundleStage(out, export.slot, spec, profile),
               ValidateStage(out, profile, test_limit)]
    flow = Workflow(work, stages, force=force, log=say,
                    meta={"command": "run", "model": str(model), "task": str(spec.path), "target": profile.name,
                          "bundle": str(out), "order": ORDER}, trust_remote_code=trust_remote_code, device=device)
    records = flow.run()
    return RunSummary(str(out), str(work), records, flow.ctx.summary("validate").get("report"))

"""The one-command pipeline, and the only module that knows the stage order.

    tune? → search (calibrate, decompose, genetic search, sieve refit) → export
          → dense reference → bundle → validate

Stages hand each other folders on disk. Every stage writes its folder atomically (a
partial sibling renamed into place), so a folder that exists is complete; the pipeline
also records each stage's inputs in `run.json` and reruns a stage whose inputs changed or
whose output no longer verifies. Rerunning the same command after an interruption skips
what is done (and the search resumes from its last generation).

Layout: the bundle is `OUT`; the stages live beside it in `OUT.work/`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ArtifactError, InputError


@dataclass
class StageRecord:
    name: str
    status: str           # done | skipped (already done) | failed
    seconds: float
    output: str
    detail: str = ""


@dataclass
class RunSummary:
    bundle: str
    stages: list[StageRecord] = field(default_factory=list)
    report: dict | None = None

    def table(self) -> str:
        lines = ["| stage | status | time | output | detail |", "|---|---|---|---|---|"]
        for s in self.stages:
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} s | {s.output} | {s.detail} |")
        return "\n".join(lines)


def _fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Ledger:
    """run.json: what each stage was run with; a stage is reused only when its inputs match."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"format": "sieve-edge/run", "stages": {}}

    def done(self, stage: str, inputs: dict) -> bool:
        rec = self.data["stages"].get(stage)
        return bool(rec) and rec.get("fingerprint") == _fingerprint(inputs)

    def mark(self, stage: str, inputs: dict) -> None:
        self.data["stages"][stage] = {"fingerprint": _fingerprint(inputs), "inputs": inputs,
                                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def forget(self, stage: str) -> None:
        self.data["stages"].pop(stage, None)


def _verified_checkpoint(path: Path) -> bool:
    from .checkpoint import read_manifest

    try:
        return read_manifest(path) is not None and any(path.glob("model*.safetensors"))
    except ArtifactError:
        return False


def _verified_export(path: Path) -> bool:
    f = path / "export.json"
    if not f.is_file():
        return False
    try:
        files = json.loads(f.read_text()).get("files", {})
    except json.JSONDecodeError:
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def run(model: str, task: str, target: str, out, *, tune_steps: int = 0, tolerance: float | None = None,
        strategy: str = "ga", method: str = "sieve", budget_minutes: float | None = None, seed: int = 0,
        n_calibration: int = 512, val_limit: int | None = 300, test_limit: int | None = None,
        heal_steps: int = 0, task_head: bool = False, force: bool = False, work=None,
        log: Callable[[str], None] | None = None) -> RunSummary:
    """Run every stage for one model, task and target; return the summary (report included).

    tolerance: allowed metric drop on the validation split (default: half the target's
    `max_metric_drop`). The caller decides what a failed gate means (`summary.report`).
    work: the stage folder (default `OUT.work`); runs for several targets of one model and
    task can share it, so tuning and search run once and only export onwards is redone.
    """
    from .checkpoint import describe_folder
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
    out = Path(out)
    work = out.with_name(out.name + ".work") if work is None else Path(work)
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise InputError(f"--work {work} must not be the bundle folder {out} or inside it")
    if out.exists() and any(out.iterdir()) and describe_folder(out) != "bundle":
        raise ArtifactError(f"output folder {out} already holds {describe_folder(out) or 'other files'}; "
                            "choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    ledger = _Ledger(work / "run.json")
    if force:
        ledger.data["stages"] = {}
    summary = RunSummary(bundle=str(out))

    def stage(name: str, inputs: dict, output: Path, verify: Callable[[Path], bool], body: Callable[[], str],
              key: str | None = None):
        # key: the ledger entry, when one stage keeps several outputs side by side (one per format)
        key = key or name
        if ledger.done(key, inputs) and verify(output):
            summary.stages.append(StageRecord(name, "skipped (done)", 0.0, str(output)))
            say(f"[{name}] already done: {output}")
            return
        ledger.forget(key)
        say(f"[{name}] running ...")
        t0 = time.perf_counter()
        detail = body()
        ledger.mark(key, inputs)
        summary.stages.append(StageRecord(name, "done", time.perf_counter() - t0, str(output), detail or ""))
        say(f"[{name}] done in {time.perf_counter() - t0:.0f} s {detail or ''}")

    task_id = {"task": str(spec.path), "task_sha": hashlib.sha256(spec.path.read_bytes()).hexdigest()[:16]}

    # 1. tune (optional): small models are weak zero-shot; tuning is the realistic first step
    source = model
    if tune_steps:
        tuned = work / "tuned"

        def do_tune():
            from .models import load_model, load_tokenizer
            from .tune import DEFAULT_LR, save_tuned, tune

            tok = load_tokenizer(model)
            net = tune(load_model(model), tok, spec, steps=tune_steps, lr=DEFAULT_LR[False], seed=seed)
            save_tuned(net, tok, tuned, base_model=model, task=spec.name, steps=tune_steps, lora=False,
                       lr=DEFAULT_LR[False], seed=seed, force=True)
            return f"{tune_steps} steps"

        stage("tune", {"model": model, **task_id, "steps": tune_steps, "seed": seed}, tuned,
              _verified_checkpoint, do_tune)
        source = str(tuned)

    # 2. search: per-matrix plan within the tolerance, refit with the sieve method; candidates
    # are scored in the target's int8 when it ships int8 (int4 is not simulated)
    searched = work / "search"
    search_weights = "int8" if profile.weights == "int8" else "fp32"
    search_inputs = {"model": source, **task_id, "tolerance": tolerance, "strategy": strategy, "method": method,
                     "seed": seed, "calibration": n_calibration, "val_limit": val_limit, "heal_steps": heal_steps,
                     "budget_minutes": budget_minutes, "weights": search_weights}

    def do_search():
        import shutil

        from .search import SearchConfig, run_search

        if (searched / "search.json").is_file():
            # a finished search made with other inputs; an unfinished one is resumed instead
            shutil.rmtree(searched)

        config = SearchConfig(tolerance=tolerance, method=method, strategy=strategy, seed=seed,
                              n_calibration=n_calibration, val_limit=val_limit, heal_steps=heal_steps,
                              weights=search_weights)
        res = run_search(source, spec, searched, config, budget_minutes=budget_minutes, force=False,
                         test_limit=test_limit, log=say)
        red = res.get("linear_param_reduction")
        return f"linear params -{red:.1%}" if isinstance(red, float) else ""

    stage("search", search_inputs, searched,
          lambda p: _verified_checkpoint(p) and (p / "search.json").is_file(), do_search)

    # 3. export for the target's runtime and weight precision
    # one folder per format and weight precision, so targets sharing --work keep their exports
    fmt = {"onnxruntime": "onnx", "openvino": "openvino"}[profile.runtime]
    exported = work / f"export-{fmt}-{profile.weights}"
    export_inputs = {"search": search_inputs, "format": fmt, "weights": profile.weights, "task_head": task_head}

    def do_export():
        from .export import export_model

        res = export_model(str(searched), fmt, "fp32" if profile.weights == "int4" else profile.weights,
                           exported, int4=profile.weights == "int4", task=spec, task_head=task_head,
                           force=True, log=say)
        return f"{fmt} {res.manifest.get('weights', profile.weights)}"

    stage("export", export_inputs, exported, _verified_export, do_export, key=exported.name)

    # 4. the dense model's metric on the test split: what the accuracy gate compares against
    reference = work / "reference.json"

    def do_reference():
        from .bundle import dense_reference

        ref = dense_reference(source, spec, limit=test_limit)
        tmp = reference.with_name("reference.json.tmp")
        tmp.write_text(json.dumps(ref, indent=2))
        tmp.replace(reference)
        return f"dense {ref['metric']} {ref['value']:.4f} (n={ref['n']})"

    stage("reference", {"model": source, **task_id, "test_limit": test_limit}, reference,
          lambda p: p.is_file(), do_reference)

    # 5. bundle: model files, tokenizer, task, profile, reference, card, torch-free runner
    def do_bundle():
        from .bundle import make_bundle

        make_bundle(exported, spec, profile, out, reference=reference, force=True,
                    card_info={"pipeline": f"sieve-edge run (work folder {work.name})"}, log=say)
        return ""

    target_id = {"target": profile.name,
                 "target_sha": hashlib.sha256(Path(profile.path).read_bytes()).hexdigest()[:16] if profile.path else None}
    stage("bundle", {"export": export_inputs, "reference": str(reference), **target_id}, out,
          lambda p: (p / "bundle.json").is_file(), do_bundle, key=f"bundle {out.resolve()}")

    # 6. validate on this machine, per the profile, in a child process (always rerun: it is the check)
    from .validate import host_arch, validate

    if profile.arch not in ("any", host_arch()):
        # another CPU's kernels cannot run here; emulation (accuracy only, slow) is the user's call
        command = f"sieve-edge validate --bundle {out} --target {profile.path or profile.name}"
        detail = (f"not run: target {profile.name} is for {profile.arch}, this host is {host_arch()}; check the "
                  f"accuracy on emulated {profile.arch} with `{command} --emulate` (after `sieve-edge emulator "
                  "setup`), and everything with `python runner.py` in the bundle on the device")
        say(f"[validate] {detail}")
        summary.stages.append(StageRecord("validate", "not run", 0.0, str(out), detail))
        (work / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
        return summary
    t0 = time.perf_counter()
    say(f"[validate] running the bundle's runner for target {profile.name} ...")
    report = validate(out, profile, limit=test_limit, log=say)
    summary.report = report.to_dict()
    summary.stages.append(StageRecord("validate", report.status, time.perf_counter() - t0,
                                      str(report.paths.get("markdown", out)), report.message()))
    (work / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str))
    return summary

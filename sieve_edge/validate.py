"""Validate a bundle on a target profile: run its runner in a child process, apply the gates.

The child is the package's own runner (``python -m sieve_edge.runtime``, the same code as the
bundle's ``runner.py`` but never taken from the bundle under test), started with the
profile's runtime, threads, precision hint and CPU affinity (the runner pins itself with
``os.sched_setaffinity`` before loading any runtime), so its peak RSS and timings are its
own. The parent compares with the dense reference stored in the bundle and writes
``report.json``, ``report.md`` and ``report.html`` (default: ``BUNDLE/reports/<target>/``).

Statuses: ``pass`` (every gate passed), ``fail`` (a gate missed its budget), ``not run``
(something could not be checked here: a device that is absent, no reference), and, with
``emulate``, ``accuracy-only`` (see ``sieve_edge.emulate``: the runner ran under QEMU's ARM64
emulator and natively on x86; the accuracy gates and the arm64-vs-x86 fidelity passed, latency
and memory are "not measured"). Only ``pass`` is a pass: ``ValidationReport.check()`` raises
``GateFailure`` (exit code 3) for ``fail`` and ``not run``, ``AccuracyOnly`` (exit code 4) for
``accuracy-only``. A target of another CPU architecture is an error without ``emulate``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from . import __version__
from .errors import AccuracyOnly, ArtifactError, GateFailure
from .targets import TargetProfile, check_host_arch, load_profile

_FORMAT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}


@dataclasses.dataclass
class ValidationReport:
    target: str
    bundle: str
    status: str                       # pass | fail | not run | accuracy-only (emulated)
    gates: list[dict]                 # runtime.evaluate_gates entries
    profile: dict
    measurement: dict | None = None   # what the runner measured (None when not run)
    reference: dict | None = None
    reduction: float | None = None    # linear_param_reduction of the pruned model
    notes: list[str] = dataclasses.field(default_factory=list)
    paths: dict = dataclasses.field(default_factory=dict)  # report files written
    emulation: dict | None = None     # validate --emulate: emulator, CPU model, arm64-vs-x86 comparison
    created_at: str = ""
    created_by: str = f"sieve-edge {__version__}"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def extra_tests(self) -> dict[str, dict]:
        """The task's [[extra_test]] sets as scored here, each with the dense reference's value."""
        dense = (self.reference or {}).get("extra_tests") or {}
        return {name: {"metric": x["metric"], "value": x["value"], "n": x["n_examples"],
                       "dense": (dense.get(name) or {}).get("value")}
                for name, x in ((self.measurement or {}).get("extra_tests") or {}).items()}

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if g["status"] != "pass"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bundle_name"] = Path(self.bundle).name
        d["extra_tests"] = self.extra_tests
        d["paths"] = {k: str(v) for k, v in self.paths.items()}
        return d

    def message(self) -> str:
        if self.passed:
            return f"target {self.target}: every gate passed ({len(self.gates)} gates)"
        if self.status == "accuracy-only":
            c = self.emulation["comparison"]
            return (f"target {self.target}: ACCURACY-ONLY: accuracy gates passed on {self.emulation['arch']} under "
                    f"emulation (QEMU -cpu {self.emulation['cpu']}), {c['n'] - len(c['disagreements'])} of {c['n']} "
                    "predictions as on x86; latency and memory not measured (emulated): check them on the device")
        bad = "; ".join(f"{g['gate']} {g['status'].upper()}: {g['detail']}" for g in self.failed_gates)
        return f"target {self.target}: {self.status.upper()}: {bad or 'no gate could be checked'}"

    def check(self) -> "ValidationReport":
        """Raise ``GateFailure`` (exit 3) unless every gate passed, ``AccuracyOnly`` (exit 4) for an
        emulated validation whose accuracy gates passed; return self otherwise."""
        if self.status == "accuracy-only":
            raise AccuracyOnly(self.message())
        if not self.passed:
            raise GateFailure(self.message())
        return self


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def apply_gates(measurement: dict | None, profile: TargetProfile, reference: dict | None,
                not_run: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """Gates for every budget of ``profile``; keys of ``not_run`` are reported "not run: why"."""
    from .runtime import evaluate_gates, overall_status

    budget = {k: v for k, v in dataclasses.asdict(profile.budget).items() if v is not None}
    if measurement is None:
        why = (not_run or {}).get("*", "not measured")
        gates = [{"gate": k.removeprefix("max_").replace("_", " "), "budget_key": k, "measured": None, "limit": v,
                  "unit": "", "status": "not run", "detail": f"not run: {why}"} for k, v in budget.items()]
        return gates, "not run"
    gates = evaluate_gates(measurement, budget, reference)
    for g in gates:
        why = (not_run or {}).get(g["budget_key"])
        if why:
            g["status"], g["detail"] = "not run", f"not run: {why} (measured here: {g['detail']})"
    return gates, overall_status(gates)


def _child(bundle: Path, profile: TargetProfile, task, frame_file, limit, timeout, affinity) -> dict:
    # The package's own runner (`python -m sieve_edge.runtime`), never the bundle's runner.py:
    # the bundle is the thing under test, and code taken from it would vouch for itself.
    # cwd is a fresh temp folder so that nothing beside the caller shadows a module.
    with tempfile.TemporaryDirectory(prefix="sieve-edge-validate-") as tmp:
        out = Path(tmp) / "measurement.json"
        cmd = [sys.executable, "-m", "sieve_edge.runtime", str(bundle.resolve()), "--json", str(out), "--no-gates",
               "--target", str(Path(profile.path).resolve()), "--threads", str(profile.threads),
               "--precision", profile.inference_precision]
        cmd += ["--cpu-affinity", ",".join(map(str, affinity)) if affinity else "none"]
        if limit:
            cmd += ["--limit", str(limit)]
        if task is not None:
            cmd += ["--task", str(Path(task).resolve()), "--prompt-frame", str(Path(frame_file).resolve())]
        env = dict(os.environ, OMP_NUM_THREADS=str(profile.threads), PYTHONDONTWRITEBYTECODE="1")
        # the child imports sieve_edge from where this process did (an editable or PYTHONPATH checkout)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"the runner of {bundle} did not finish within {timeout} s on target "
                                f"{profile.name}") from None
        if proc.returncode != 0 or not out.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            said = [ln for ln in lines if ln.startswith(("error: ", "internal error: "))]
            why = said[-1].removeprefix("error: ") if said else " | ".join(lines[-3:])
            raise ArtifactError(f"the runner failed on bundle {bundle} for target {profile.name} "
                                f"(exit {proc.returncode}): {why}")
        return json.loads(out.read_text(encoding="utf-8"))


def validate(bundle, target, task=None, out=None, limit: int | None = None, timeout: float | None = 3600,
             log=None, emulate: bool = False, emulate_cpu: str | None = None) -> ValidationReport:
    """Validate ``bundle`` on ``target`` (a profile name, path or TargetProfile) and write the reports.

    task: another task TOML to score instead of the bundle's (no reference then: the metric
    gate is "not run"). out: report folder (default ``BUNDLE/reports/<target>``). limit:
    score only the first N test examples. emulate: run the runner under QEMU's emulation of
    the target's architecture (and natively, to compare), CPU model ``emulate_cpu`` (default
    ``sieve_edge.emulate.DEFAULT_CPU``); a target of another architecture needs it. Returns
    the report; call ``.check()`` to raise ``GateFailure`` unless every gate passed.
    """
    from .bundle import read_bundle
    from .report import model_card, write_reports
    from .runtime import device_available

    from .outputs import check_output, clean_temp_files

    log = log or (lambda msg: None)
    bundle = Path(bundle)
    manifest = read_bundle(bundle)
    profile = target if isinstance(target, TargetProfile) else load_profile(target)
    out = Path(out) if out is not None else bundle / "reports" / profile.name
    check_output(out, "reports", force=True)  # writable, and not a folder of other things, before the run
    for folder in (out, bundle / "reports"):      # temp files of a validate that was killed mid-write
        clean_temp_files(folder)
    needed = _FORMAT_RUNTIME.get(manifest.get("model_format"))
    if profile.runtime != needed:
        raise ArtifactError(f"bundle {bundle} holds a {manifest.get('model_format')} model (runtime {needed}); "
                            f"target '{profile.name}' runs {profile.runtime}")
    check_host_arch(profile, host_arch(), emulate)
    emulator = emulation = None
    if emulate:  # before any work: a missing emulator is an error naming the setup command
        from .emulate import check_ready, load_emulator

        emulator = load_emulator(profile.arch)
        emulate_cpu = check_ready(emulator, profile.runtime, emulate_cpu)
    export = json.loads((bundle / manifest["model_dir"] / "export.json").read_text(encoding="utf-8"))
    reference = json.loads((bundle / manifest["reference"]).read_text(encoding="utf-8"))
    source = export.get("source") or {}
    reduction = source.get("linear_param_reduction", 0.0 if not source.get("ranks") else None)
    notes: list[str] = [f"inference precision hint requested: {profile.inference_precision}"]
    not_run: dict[str, str] = {}
    measurement = None
    frame_tmp = None

    if task is not None:
        from transformers import AutoTokenizer

        from .bundle import prompt_frame
        from .filechecks import check_model_folder
        from .tasks import load_task

        spec = load_task(task)
        model_dir = bundle / manifest["model_dir"]
        check_model_folder(model_dir, False, "bundle model folder", flag=None)
        # trust_remote_code=False explicit: left out, transformers asks on stdin whether to run custom code
        frame = prompt_frame(spec, AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False))
        frame_tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(frame, frame_tmp)
        frame_tmp.close()
        task = spec.path
        reference = None
        notes.append(f"task {spec.name} from {spec.path} instead of the bundle's; no dense reference for it")

    try:
        if emulator is not None:
            from .emulate import measure_emulated

            measurement, emulation = measure_emulated(
                emulator, bundle, profile, task, frame_tmp.name if frame_tmp else None, limit, timeout,
                emulate_cpu, log)
            notes.append(f"emulated: {emulation['arch']} under {emulation['qemu']} -cpu {emulate_cpu} (features: "
                         f"{' '.join(emulation['features'] or ['?'])}); the runner also ran on this x86 host, same "
                         "examples, for the comparison; latency and memory not measured")
            if limit:
                notes.append(f"scored only the first {limit} test examples (--limit)")
        elif not device_available(profile.runtime, profile.device):
            not_run["*"] = f"device absent ({profile.device} for {profile.runtime} is not on this host)"
            notes.append(f"not run: device absent: {profile.device}")
        else:
            cpus = os.cpu_count() or 1
            if profile.threads > cpus:
                notes.append(f"the profile asks {profile.threads} threads, this host has {cpus} CPUs: "
                             f"latency here is pessimistic")
            affinity = None
            if profile.cpu_affinity:
                here = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
                affinity = [c for c in profile.cpu_affinity if c in here]
                if len(affinity) < len(profile.cpu_affinity):
                    notes.append(f"cpu_affinity {list(profile.cpu_affinity)}: only {affinity or 'none'} exist here")
                    affinity = affinity or None
            log(f"running the runner (python -m sieve_edge.runtime) on {bundle} for target {profile.name}")
            measurement = _child(bundle, profile, task, frame_tmp.name if frame_tmp else None, limit, timeout,
                                 affinity)
            if limit:
                mode = (measurement.get("sample") or {}).get("mode", "head")
                notes.append(f"scored {measurement.get('n_examples')} test examples (--limit {limit}, drawn "
                             f"{'as the first rows' if mode == 'head' else f'by [data] sample = {mode!r}'})")
    finally:
        if frame_tmp is not None:
            os.unlink(frame_tmp.name)

    gates, status = apply_gates(measurement, profile, reference, not_run)
    if emulation is not None:
        from .emulate import emulated_gates

        gates, status = emulated_gates(gates, profile, emulation["comparison"], emulate_cpu)
    report = ValidationReport(
        target=profile.name, bundle=str(bundle.resolve()), status=status, gates=gates,
        profile=profile.to_dict(), measurement=measurement, reference=reference, reduction=reduction,
        notes=notes, created_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        emulation=emulation,
    )
    others = _other_reports(out)
    report.paths = write_reports(report.to_dict(), out, others)
    if out.resolve().parent == (bundle / "reports").resolve():
        _update_card(bundle, manifest, export, model_card)
    return report


def _other_reports(out: Path) -> list[dict]:
    """report.json of sibling folders (other targets of the same bundle), for the latency plot."""
    found = []
    if out.parent.is_dir():
        for p in sorted(out.parent.glob("*/report.json")):
            if p.parent.resolve() != out.resolve():
                try:
                    found.append(json.loads(p.read_text(encoding="utf-8")))
                except (OSError, json.JSONDecodeError):
                    pass
    return found


def _update_card(bundle: Path, manifest: dict, export: dict, model_card) -> None:
    reports = []
    for p in sorted((bundle / "reports").glob("*/report.json")):
        reports.append(json.loads(p.read_text(encoding="utf-8")))
    reference = json.loads((bundle / manifest["reference"]).read_text(encoding="utf-8"))
    text = model_card(manifest, export, reference, reports)
    # the temp file lives in reports/ (which bundle verification skips): one left by a killed
    # validate beside MODEL_CARD.md would be an unrecorded file that fails the bundle's check
    tmp = bundle / "reports" / f".MODEL_CARD.md.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, bundle / "MODEL_CARD.md")

"""validate --emulate: architecture checks, a missing emulator, the emulator's Debian plumbing,
the arm64-vs-x86 comparison and gates, and (marked `emulator`, skipped without it) a tiny
bundle run under QEMU's ARM64 emulation."""
import dataclasses
import io
import json
import lzma
import os
import platform
import shutil
import tarfile

import pytest
from click.testing import CliRunner

from sieve_edge import emulate
from sieve_edge import runtime as rt
from sieve_edge.cli import main
from sieve_edge.errors import AccuracyOnly, EmulatorError, GateFailure, InputError
from sieve_edge.targets import check_host_arch, load_profile
from sieve_edge.validate import ValidationReport, apply_gates, host_arch, validate
from test_bundle import ROWS, tiny_bundle, write_profile

X86 = host_arch() == "x86_64"


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _panel(tmp_path, runtime="onnxruntime", **budget):
    return write_profile(tmp_path, runtime, name=f"panel-{runtime}", extra='arch = "aarch64"', **budget)


# ---------------------------------------------------------------- which host may validate which profile


def test_host_arch_rules():
    panel = load_profile("arm64-panel")
    check_host_arch(panel, "aarch64")                     # natively on ARM64
    check_host_arch(panel, "x86_64", emulate=True)        # emulated on x86_64
    with pytest.raises(InputError, match="--emulate") as e:
        check_host_arch(panel, "x86_64")
    assert "sieve-edge emulator setup" in str(e.value) and "arm64-panel" in str(e.value)
    x86 = load_profile("kiosk")
    anywhere = dataclasses.replace(x86, arch="any")       # anywhere natively, nothing to emulate
    check_host_arch(anywhere, "x86_64")
    check_host_arch(anywhere, "aarch64")
    with pytest.raises(InputError, match='arch = "any"'):
        check_host_arch(anywhere, "x86_64", emulate=True)
    with pytest.raises(InputError, match="which this host is"):
        check_host_arch(x86, "x86_64", emulate=True)
    with pytest.raises(InputError) as e:                  # the other way round: no emulator, no --emulate hint
        check_host_arch(x86, "aarch64")
    assert "on a x86_64 host" in str(e.value) and "--emulate" not in str(e.value)
    with pytest.raises(InputError, match="no emulator for x86_64"):
        check_host_arch(x86, "aarch64", emulate=True)
    npu = dataclasses.replace(panel, device="npu")
    with pytest.raises(InputError, match="CPU only"):
        check_host_arch(npu, "x86_64", emulate=True)


@pytest.mark.skipif(not X86, reason="the aarch64 profile is foreign only on an x86_64 host")
def test_aarch64_profile_without_emulate_is_an_error_suggesting_it(tmp_path):
    bundle = _copy(tiny_bundle("onnx"), tmp_path)
    with pytest.raises(InputError, match="--emulate"):
        validate(bundle, _panel(tmp_path))
    result = CliRunner().invoke(main, ["validate", "--bundle", str(bundle), "--target", str(_panel(tmp_path))])
    assert result.exit_code == 1 and "with --emulate" in result.output and "Traceback" not in result.output
    assert not (bundle / "reports").exists()              # nothing was run, nothing written


@pytest.mark.skipif(not X86, reason="emulation runs on x86_64 hosts")
def test_emulate_without_emulator_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SIEVE_EDGE_CACHE", str(tmp_path / "empty-cache"))
    bundle = _copy(tiny_bundle("onnx"), tmp_path)
    result = CliRunner().invoke(main, ["validate", "--bundle", str(bundle), "--target", str(_panel(tmp_path)),
                                       "--emulate"])
    assert result.exit_code == 1, result.output
    assert "`sieve-edge emulator setup`" in result.output and "not set up" in result.output
    assert not (bundle / "reports").exists()
    status = CliRunner().invoke(main, ["emulator", "status"])
    assert status.exit_code == 1 and "sieve-edge emulator setup" in status.output
    # an interrupted setup leaves a folder without emulator.json: not used, rebuild suggested
    (tmp_path / "empty-cache" / "emulator" / "aarch64").mkdir(parents=True)
    with pytest.raises(EmulatorError, match="incomplete.*--force"):
        emulate.load_emulator()
    assert CliRunner().invoke(main, ["emulator", "remove"]).exit_code == 0
    assert not (tmp_path / "empty-cache" / "emulator" / "aarch64").exists()
    result = CliRunner().invoke(main, ["validate", "--bundle", str(bundle), "--target", str(_panel(tmp_path)),
                                       "--emulate-cpu", "max"])
    assert result.exit_code == 1 and "--emulate-cpu needs --emulate" in result.output


def test_emulator_dir_follows_the_cache_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SIEVE_EDGE_CACHE", str(tmp_path / "c"))
    assert emulate.emulator_dir() == tmp_path / "c" / "emulator" / "aarch64"
    monkeypatch.delenv("SIEVE_EDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert emulate.emulator_dir() == tmp_path / "x" / "sieve-edge" / "emulator" / "aarch64"


# ---------------------------------------------------------------- Debian plumbing (offline)

INDEX = """Package: python3
Version: 3.13.5-1
Depends: python3.13 (>= 3.13.5-1~), libpython3-stdlib

Package: python3.13
Version: 3.13.5-2
Depends: python3.13-minimal (= 3.13.5-2), media-types | mime-support, libc6 (>= 2.38)
Description: interactive
 continued line: Depends: not-a-dependency

Package: python3.13-minimal
Version: 3.13.5-2
Pre-Depends: libc6 (>= 2.36)
Depends: zlib1g:any

Package: libc6
Version: 2.41-12
Depends: libgcc-s1

Package: libgcc-s1
Version: 14.2.0-19
Depends: libc6 (>= 2.35)

Package: zlib1g
Version: 1:1.3
Provides: libz1

Package: mime-support
Version: 3.66

Package: media-types
Version: 13.0.0
"""


def test_debian_index_resolution():
    packages, provides = emulate.parse_packages(INDEX)
    assert provides == {"libz1": "zlib1g"}
    assert "not-a-dependency" not in packages["python3.13"]["Depends"]
    assert emulate._python_package(packages) == "python3.13"
    assert emulate._glibc(packages) == (2, 41)
    names = [p["Package"] for p in emulate.resolve(packages, provides, ["python3.13"])]
    # first alternative that exists, Pre-Depends followed, ":any" qualifiers dropped, cycles end
    assert names == ["libc6", "libgcc-s1", "media-types", "python3.13", "python3.13-minimal", "zlib1g"]
    with pytest.raises(EmulatorError, match="no package 'libfoo'"):
        emulate.resolve(packages, provides, ["libfoo"])
    release = b"Origin: Debian\nSHA256:\n abc 12 main/binary-arm64/Packages.xz\n def 7 main/Release\nOther: x\n"
    assert emulate._release_sha256(release) == {"main/binary-arm64/Packages.xz": ("abc", 12), "main/Release": ("def", 7)}


def _deb(path, members):
    """A .deb (ar: debian-binary, control.tar.xz, data.tar.xz) holding tar ``members``."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for m, content in members:
            tar.addfile(m, io.BytesIO(content) if content is not None else None)
    parts = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")), ("data.tar.xz", data.getvalue())]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, blob in parts:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(blob):<10}`\n".encode())
            f.write(blob + (b"\n" if len(blob) % 2 else b""))
    return path


def _member(name, kind=tarfile.REGTYPE, content=b"", link=""):
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.mode = kind, link, 0o755
    m.size = len(content) if kind == tarfile.REGTYPE else 0
    return m, content if kind == tarfile.REGTYPE else None


def test_unpack_deb_stays_inside_the_root(tmp_path):
    deb = _deb(tmp_path / "x.deb", [
        _member("./usr/lib/aarch64-linux-gnu/libx.so.1", content=b"ELF"),
        _member("./usr/lib/aarch64-linux-gnu/libx.so", tarfile.SYMTYPE, link="/usr/lib/aarch64-linux-gnu/libx.so.1"),
        _member("./usr/bin/python3.13", content=b"#!"),
        _member("./../escape.txt", content=b"no"),
        _member("./dev/null", tarfile.CHRTYPE),
    ])
    root = tmp_path / "root"
    root.mkdir()
    assert emulate.unpack_deb(deb, root) == 2
    link = root / "usr/lib/aarch64-linux-gnu/libx.so"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link)) and link.read_bytes() == b"ELF"
    assert not (tmp_path / "escape.txt").exists() and not (root / "dev").exists()
    assert emulate._extract_one(deb, ["usr/bin/qemu-aarch64-static", "usr/bin/python3.13"], tmp_path / "q") == \
        "usr/bin/python3.13"
    assert os.access(tmp_path / "q", os.X_OK)
    with pytest.raises(EmulatorError, match="holds none of"):
        emulate._extract_one(deb, ["usr/bin/nothing"], tmp_path / "q2")
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(EmulatorError, match="not a Debian package"):
        emulate.unpack_deb(tmp_path / "bad.deb", root)


# ---------------------------------------------------------------- the comparison and the gates


def _run(preds, value, scores=None):
    return {"kind": "classification", "metric": "accuracy", "value": value, "scores_are": "label log-prob",
            "per_example": [{"index": i, "pred": p, "scores": (scores or {}).get(i, {"negative": -1.0, "positive": -2.0})}
                            for i, p in enumerate(preds)]}


def test_compare_runs_lists_disagreements_with_score_differences():
    x86 = _run(["negative", "positive", "negative"], 0.66)
    arm = _run(["negative", "negative", "negative"], 0.33, scores={1: {"negative": -1.25, "positive": -1.5}})
    c = emulate.compare_runs(x86, arm)
    assert c["n"] == 3 and c["agreement"] == pytest.approx(2 / 3)
    assert c["disagreements"] == [{"index": 1, "x86": "positive", "arm64": "negative", "max_logprob_diff": 0.5}]
    assert c["max_logprob_diff"] == 0.5 and c["metric_diff"] == pytest.approx(-0.33)
    with pytest.raises(EmulatorError, match="same examples"):
        emulate.compare_runs(x86, _run(["negative"], 1.0))
    ppl = {"kind": "perplexity", "metric": "perplexity", "value": 10.0,
           "per_example": [{"index": 0, "nll": 20.0, "tokens": 10}]}
    c = emulate.compare_runs(ppl, dict(ppl, value=10.1, per_example=[{"index": 0, "nll": 21.0, "tokens": 10}]))
    assert c["agreement"] is None and c["max_logprob_diff"] == pytest.approx(0.1) and c["score"] == "per-token NLL"


def _emulated_report(tmp_path, x86_value, arm_value, ref=0.9, arm_preds=None):
    profile = load_profile(_panel(tmp_path, max_metric_drop=0.02))
    measured = {"metric": "accuracy", "value": arm_value, "n_examples": 3, "size_mb": 1.0, "peak_rss_mb": 900.0,
                "host": {"machine": "aarch64", "processor": "QEMU cortex-a72", "cpu_count": 2},
                "latency": {k: {"p50": 1.0, "p90": 1.0, "mean": 1.0, "n": 3}
                            for k in ("first_token_ms", "token_ms", "example_ms")}}
    m = emulate.blank_host_measurements(measured)
    assert m["peak_rss_mb"] is None and m["latency"]["example_ms"]["p90"] is None
    assert m["emulated"]["latency"]["example_ms"]["p90"] == 1.0      # kept aside, labelled, never gated
    c = emulate.compare_runs(_run(["a", "b", "c"], x86_value), _run(arm_preds or ["a", "b", "c"], arm_value))
    gates, status = apply_gates(m, profile, {"metric": "accuracy", "value": ref, "n": 3})
    gates, status = emulate.emulated_gates(gates, profile, c, "cortex-a72")
    return ValidationReport(target=profile.name, bundle="b", status=status, gates=gates, profile=profile.to_dict(),
                            measurement=m, emulation={"arch": "aarch64", "cpu": "cortex-a72", "comparison": c})


def test_emulated_gates_accuracy_only_never_pass(tmp_path):
    report = _emulated_report(tmp_path, 0.9, 0.9)
    by = {g["budget_key"]: g for g in report.gates}
    assert report.status == "accuracy-only" and not report.passed
    for key in emulate.HOST_GATES:
        assert by[key]["status"] == "not measured" and by[key]["detail"].startswith("not measured (emulated)")
    assert by["max_metric_drop"]["status"] == "pass" and by["max_size_mb"]["status"] == "pass"
    assert by["x86_fidelity"]["status"] == "pass" and "0 of 3 predictions differ" in by["x86_fidelity"]["detail"]
    with pytest.raises(AccuracyOnly) as e:
        report.check()
    assert e.value.exit_code == 4 == rt.EXIT_ACCURACY_ONLY and isinstance(e.value, GateFailure)
    assert "ACCURACY-ONLY" in str(e.value) and "3 of 3 predictions as on x86" in str(e.value)


def test_emulated_accuracy_failure_exits_3(tmp_path):
    # the dense reference is 0.95: 0.90 on arm64 misses the 0.02 budget, whatever x86 says
    report = _emulated_report(tmp_path, 0.9, 0.9, ref=0.95)
    assert report.status == "fail"
    with pytest.raises(GateFailure) as e:
        report.check()
    assert e.value.exit_code == 3 and not isinstance(e.value, AccuracyOnly)
    # arm64 within the reference's budget but 0.04 off the x86 run: the fidelity gate fails
    report = _emulated_report(tmp_path, 0.94, 0.9, ref=0.9, arm_preds=["a", "x", "c"])
    by = {g["budget_key"]: g for g in report.gates}
    assert by["max_metric_drop"]["status"] == "pass" and by["x86_fidelity"]["status"] == "fail"
    assert "1 of 3 predictions differ" in by["x86_fidelity"]["detail"] and report.status == "fail"


def test_report_shows_the_comparison_and_no_emulated_time(tmp_path):
    from sieve_edge.report import render_markdown

    report = _emulated_report(tmp_path, 0.9, 0.9, arm_preds=["a", "x", "c"])
    report.emulation.update(qemu="qemu-aarch64 version 10", python="3.13.5", runtime="onnxruntime 1.32.0",
                            features=["fp", "asimd"], x86_s_per_example=0.01, arm64_s_per_example=0.9)
    md = render_markdown(report.to_dict())
    assert "| status | **ACCURACY-ONLY** |" in md and "| latency, peak RSS | not measured (emulated) |" in md
    assert "## aarch64 under emulation vs x86" in md and "| 1 | b | x |" in md
    assert "per example ms" not in md                     # no emulated latency shown as a measurement


def test_runner_lists_every_example():
    m = rt.run_bundle(tiny_bundle("onnx"), per_example=True, warmup=0, decode_tokens=0)
    entries = m["per_example"]
    assert [e["index"] for e in entries] == list(range(len(ROWS)))
    assert all(set(e["scores"]) == {"negative", "positive"} for e in entries)
    assert all(e["pred"] == max(e["scores"], key=e["scores"].get) for e in entries)
    gold = [label for _, label in ROWS]
    assert m["value"] == pytest.approx(sum(e["pred"] == g for e, g in zip(entries, gold)) / len(ROWS))
    assert "per_example" not in rt.run_bundle(tiny_bundle("onnx"), limit=2, warmup=0, decode_tokens=0)


# ---------------------------------------------------------------- under QEMU (needs `sieve-edge emulator setup`)


def _emulator_or_skip():
    try:
        return emulate.load_emulator()
    except EmulatorError as e:
        pytest.skip(f"ARM64 emulator not set up ({e}); run `sieve-edge emulator setup`")


@pytest.mark.emulator
@pytest.mark.skipif(not X86 or platform.system() != "Linux", reason="emulation runs on Linux x86_64 hosts")
@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_tiny_bundle_under_emulation_predicts_as_on_x86(tmp_path, fmt, runtime):
    info = _emulator_or_skip()
    if runtime not in info["runtimes"]:
        pytest.skip(f"the emulator was set up without {runtime}")
    bundle = _copy(tiny_bundle(fmt), tmp_path)
    prof = _panel(tmp_path, runtime)
    result = CliRunner().invoke(main, ["validate", "--bundle", str(bundle), "--target", str(prof), "--emulate"])
    assert result.exit_code == rt.EXIT_ACCURACY_ONLY, result.output
    report = json.loads((bundle / "reports" / f"panel-{runtime}" / "report.json").read_text())
    assert report["status"] == "accuracy-only"
    m, emu = report["measurement"], report["emulation"]
    assert m["host"]["machine"] == "aarch64" and m["pid"] != os.getpid()        # the emulated runner measured it
    assert m["runtime_version"] == emu["x86_measurement"]["runtime_version"]           # one release, two builds
    assert m["runtime_version"].startswith(info["versions"][runtime])
    assert emu["x86_measurement"]["host"]["machine"] == "x86_64"
    assert emu["cpu"] == emulate.DEFAULT_CPU and "asimd" in emu["features"]
    c = emu["comparison"]
    tolerance = load_profile(prof).budget.max_metric_drop
    assert c["n"] == len(ROWS) and abs(c["arm64"] - c["x86"]) <= tolerance
    assert c["disagreements"] == [] and c["max_logprob_diff"] < 1e-3  # fp32 kernels: rounding only
    gates = {g["budget_key"]: g["status"] for g in report["gates"]}
    assert gates["max_metric_drop"] == gates["x86_fidelity"] == "pass" and gates["max_example_ms"] == "not measured"
    assert "ACCURACY-ONLY" in result.output


def test_benchmark_table_and_arguments():
    from benchscripts import load_benchmark

    bench = load_benchmark("emulation")
    assert bench.parse_args(["--cpus", "cortex-a72, max"]).cpus == ["cortex-a72", "max"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpus", ","])
    r = {"cpu": "cortex-a72", "status": "accuracy-only", "n": 500, "metric": "accuracy", "x86": 0.904, "arm64": 0.902,
         "reference": 0.908, "agreement": 0.994, "disagreements": 3, "max_logprob_diff": 0.0123,
         "mean_logprob_diff": 0.001, "x86_s_per_example": 0.05, "arm64_s_per_example": 2.5}
    assert "| cortex-a72 | 0.9040 | 0.9020 | 0.9080 | 99.4% | 3/500 | 0.0123 / 0.001 | 0.050 | 2.50 | 50x | " \
           "accuracy-only |" in bench.table([r])

"""Target profiles: every shipped profile loads; every bad profile fails with file, key and allowed values."""
import pytest

from sieve_edge.errors import ProfileError
from sieve_edge.targets import SCHEMA_VERSION, TARGETS_DIR, load_profile, shipped_profiles

GOOD = """schema_version = 1
name = "t"
runtime = "openvino"
device = "cpu"
weights = "int8"
inference_precision = "f32"
threads = 2

[budget]
max_metric_drop = 0.02
max_example_ms = 100.0
"""


def test_shipped_profiles_load():
    names = shipped_profiles()
    assert {"factory-pc", "kiosk", "arm64-panel"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert 1 <= p.schema_version <= SCHEMA_VERSION
        assert p.name == name
        assert p.budget.max_metric_drop is not None and p.budget.max_size_mb is not None
    fp = load_profile("factory-pc")
    assert (fp.runtime, fp.weights, fp.inference_precision, fp.threads, fp.arch) == ("openvino", "int8", "f32", 4, "x86_64")
    kiosk = load_profile("kiosk")
    assert (kiosk.runtime, kiosk.weights, kiosk.threads) == ("onnxruntime", "int8", 2)
    assert kiosk.budget.max_peak_memory_mb < fp.budget.max_peak_memory_mb
    arm = load_profile(TARGETS_DIR / "arm64-panel.toml")
    assert (arm.runtime, arm.arch) == ("onnxruntime", "aarch64")


def _write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_good_profile_and_defaults(tmp_path):
    p = load_profile(_write(tmp_path, GOOD))
    assert p.budget.max_token_ms is None and p.cpu_affinity is None and p.arch == "any"
    assert p.to_dict()["budget"]["max_example_ms"] == 100.0


@pytest.mark.parametrize("edit, key, allowed", [
    (lambda t: t + "colour = 'red'\n", "colour", "allowed keys"),
    (lambda t: t + "max_bogus_ms = 3\n", "budget.max_bogus_ms", "budget.max_token_ms"),
    (lambda t: t.replace('"openvino"', '"tensorrt"'), "runtime", "onnxruntime | openvino"),
    (lambda t: t.replace("threads = 2", "threads = 0"), "threads", "an integer from 1 to 1024"),
    (lambda t: t.replace("threads = 2", 'threads = "4"'), "threads", "an integer from 1 to 1024"),
    (lambda t: t.replace("max_example_ms = 100.0", "max_example_ms = -5.0"), "budget.max_example_ms", "> 0"),
    (lambda t: t.replace("max_metric_drop = 0.02", "max_metric_drop = -0.1"), "budget.max_metric_drop", ">= 0"),
    (lambda t: t.replace("max_example_ms = 100.0", 'max_example_ms = "fast"'), "budget.max_example_ms", "> 0"),
    (lambda t: t.replace('device = "cpu"', 'device = "tpu"'), "device", "cpu | gpu | npu"),
    (lambda t: t.replace('weights = "int8"', 'weights = "int2"'), "weights", "fp32 | int8 | int4"),
    (lambda t: t.replace('"f32"', '"fp64"'), "inference_precision", "f32 | bf16 | f16"),
    (lambda t: t.replace("schema_version = 1", "schema_version = 5"), "schema_version", "an integer from 1 to 4"),
    (lambda t: t.replace("threads = 2", "threads = 2\ncpu_affinity = [0, 0]"), "cpu_affinity", "distinct"),
    (lambda t: t.replace("threads = 2", "threads = 4\ncpu_affinity = [0, 1]"), "threads", "len(cpu_affinity)"),
    (lambda t: t.replace('"openvino"', '"onnxruntime"').replace('"f32"', '"bf16"'), "inference_precision",
     "allowed: f32"),
    (lambda t: t.replace('name = "t"\n', ""), "name", "missing required"),
])
def test_bad_profiles(tmp_path, edit, key, allowed):
    _assert_refused(_write(tmp_path, edit(GOOD)), key, allowed)


def _assert_refused(path, key, allowed):
    """Loading the profile at `path` fails with a message naming the file, the key and what is allowed."""
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and allowed in msg, msg


def test_unknown_name_lists_shipped(tmp_path):
    with pytest.raises(ProfileError, match="factory-pc"):
        load_profile("no-such-box")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.toml")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(_write(tmp_path, "name = \n"))


def test_runtime_cache_capacity_key(tmp_path):
    from sieve_edge.errors import ProfileError
    from sieve_edge.targets import load_profile

    base = 'schema_version = 3\nname = "x"\nthreads = 1\n'
    ov = tmp_path / "ov.toml"
    ov.write_text(base + 'runtime = "openvino"\nruntime_cache_capacity = 0\n')
    assert load_profile(ov).runtime_cache_capacity == 0
    cases = {
        "needs schema_version = 3": base.replace("= 3", "= 2") + 'runtime = "openvino"\nruntime_cache_capacity = 8\n',
        "runtime 'onnxruntime'": base + 'runtime = "onnxruntime"\nruntime_cache_capacity = 8\n',
        "device 'gpu'": base + 'runtime = "openvino"\ndevice = "gpu"\nruntime_cache_capacity = 8\n',
        "integer >= 0": base + 'runtime = "openvino"\nruntime_cache_capacity = -1\n',
    }
    for message, text in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ProfileError, match=message):
            load_profile(bad)
    assert load_profile(_write(tmp_path, base + 'runtime = "openvino"\n')).runtime_cache_capacity is None


def test_dynamic_quantization_key(tmp_path):
    from sieve_edge.errors import ProfileError
    from sieve_edge.targets import load_profile

    base = 'schema_version = 2\nname = "x"\nthreads = 1\n'
    old = tmp_path / "old.toml"
    old.write_text(base.replace("= 2", "= 1") + 'runtime = "openvino"\ndynamic_quantization = true\n')
    with pytest.raises(ProfileError, match="needs schema_version = 2"):
        load_profile(old)
    ov = tmp_path / "ov.toml"
    ov.write_text(base + 'runtime = "openvino"\ndynamic_quantization = true\n')
    assert load_profile(ov).dynamic_quantization is True
    ort = tmp_path / "ort.toml"
    ort.write_text(base + 'runtime = "onnxruntime"\ndynamic_quantization = true\n')
    with pytest.raises(ProfileError, match="dynamic_quantization.*OpenVINO"):
        load_profile(ort)
    bad = tmp_path / "bad.toml"
    bad.write_text(base + 'runtime = "openvino"\ndynamic_quantization = "yes"\n')
    with pytest.raises(ProfileError, match="true \\| false"):
        load_profile(bad)


WORKLOAD = GOOD.replace("schema_version = 1", "schema_version = 4").replace(
    "[budget]", "[workload]\nprompt_tokens = 40\nnew_tokens = 64\n\n[budget]")


def test_workload_keys_and_defaults(tmp_path):
    p = load_profile(_write(tmp_path, WORKLOAD))
    assert (p.workload.prompt_tokens, p.workload.new_tokens) == (40, 64)
    # a classification (or perplexity) example reads its answer from the prompt pass: 1 new token
    assert p.workload.new_tokens_for("classification") == 1 and p.workload.new_tokens_for("perplexity") == 1
    assert p.workload.new_tokens_for("generation", 16) == 64
    bare = load_profile(_write(tmp_path, GOOD))      # no [workload]: a typical prompt, the task's own new tokens
    assert bare.workload.prompt_tokens >= 1 and bare.workload.new_tokens is None
    assert bare.workload.new_tokens_for("generation", 12) == 12
    for name in shipped_profiles():
        w = load_profile(name).workload
        assert w.prompt_tokens >= 1 and w.new_tokens >= 1


@pytest.mark.parametrize("edit, key, allowed", [
    (lambda t: t.replace("new_tokens = 64", "new_tokens = 64\nbatch = 4"), "workload.batch", "workload.prompt_tokens"),
    (lambda t: t.replace("prompt_tokens = 40", 'prompt_tokens = "40"'), "workload.prompt_tokens", "an integer"),
    (lambda t: t.replace("prompt_tokens = 40", "prompt_tokens = 40.5"), "workload.prompt_tokens", "an integer"),
    (lambda t: t.replace("new_tokens = 64", "new_tokens = true"), "workload.new_tokens", "an integer"),
    (lambda t: t.replace("new_tokens = 64", "new_tokens = -1"), "workload.new_tokens", "an integer from 1"),
    (lambda t: t.replace("prompt_tokens = 40", "prompt_tokens = -40"), "workload.prompt_tokens", "an integer from 1"),
    (lambda t: t.replace("prompt_tokens = 40", "prompt_tokens = 0"), "workload.prompt_tokens", "an integer from 1"),
    (lambda t: t.replace("[workload]\nprompt_tokens = 40\nnew_tokens = 64\n", "workload = 40\n"), "workload",
     "a table [workload]"),
    (lambda t: t.replace("schema_version = 4", "schema_version = 3"), "workload", "needs schema_version = 4"),
])
def test_bad_workload(tmp_path, edit, key, allowed):
    _assert_refused(_write(tmp_path, edit(WORKLOAD)), key, allowed)

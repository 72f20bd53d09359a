"""The torch-free runner: same scores as sieve_edge.evaluate, greedy decoding equal to torch,
gates, and a run with torch and transformers made unimportable."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from sieve_edge import runtime as rt
from test_bundle import ROWS, tiny_bundle, tiny_export, write_task

REPO = Path(__file__).resolve().parents[1]
LOGPROB_ATOL = 1e-4  # fp32 runtimes vs torch on a 2-layer model


def _scorer(bundle: Path, runtime: str, export: dict | None = None):
    manifest = json.loads((bundle / "bundle.json").read_text())
    task = rt.Task(rt._read_toml(bundle / manifest["task"]), bundle / manifest["task"],
                   test_path=bundle / manifest["test_data"], frame=json.loads((bundle / "prompt.json").read_text()))
    model = rt.load_model(bundle / "model", runtime, threads=1, precision="f32")
    tok = Tokenizer.from_file(str(bundle / "model" / "tokenizer.json"))
    return rt.Scorer(model, tok, task, export or {}, rt._eos_ids(bundle / "model", tok)), task


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_runner_matches_evaluate(fmt, runtime):
    from sieve_edge.evaluate import make_scorer
    from sieve_edge.tasks import load_task
    from tiny import make_model, make_tokenizer

    bundle = tiny_bundle(fmt)
    scorer, task = _scorer(bundle, runtime)
    ref = make_scorer(make_tokenizer(), load_task(bundle / "task" / "tiny.toml"), "test")
    want = ref.label_logprobs(make_model("llama")).numpy()                     # (N, L) over the label set
    got = rt.log_softmax(np.array([list(scorer.classify(t)[1].values()) for t, _ in ROWS]))
    np.testing.assert_allclose(got, want, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_greedy_generation_with_kv_cache_matches_torch(fmt, runtime):
    import torch
    from tiny import make_model, make_tokenizer

    scorer, _ = _scorer(tiny_bundle(fmt), runtime)
    model, tok = make_model("llama"), make_tokenizer()
    ids = scorer.encode_prompt(ROWS[0][0])
    got = scorer.generate(ids, 6, stop_at_eos=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             pad_token_id=tok.pad_token_id)
    assert got == out[0, len(ids):].tolist()
    assert len(scorer.token_ms) == 5 and len(scorer.first_ms) == 1


def test_generation_and_perplexity_tasks(tmp_path):
    gen = rt.run_bundle(tiny_bundle("onnx", "generation"), limit=3, warmup=0)
    assert gen["kind"] == "generation" and gen["metric"] == "exact_match" and gen["latency"]["token_ms"]["n"] > 0
    ppl = rt.run_bundle(tiny_bundle("onnx", "perplexity"), limit=3, warmup=0)
    assert ppl["metric"] == "perplexity" and ppl["value"] > 1.0 and not ppl["higher_is_better"]


def test_task_head_export_scores_label_columns():
    class FakeHead:  # logits (T, k): column k is label k's logit
        def reset(self):
            pass

        def forward(self, ids):
            return np.tile(np.array([[0.1, 2.0]], dtype=np.float32), (len(ids), 1))

    bundle = tiny_bundle("onnx")
    _, task = _scorer(bundle, "onnxruntime")
    tok = Tokenizer.from_file(str(bundle / "model" / "tokenizer.json"))
    s = rt.Scorer(FakeHead(), tok, task, {"task_head": {"labels": ["negative", "positive"], "token_ids": [5, 6]}}, set())
    assert s.classify("anything")[0] == "positive"
    with pytest.raises(rt.RunnerError, match="do not cover"):
        rt.Scorer(FakeHead(), tok, task, {"task_head": {"labels": ["yes", "no"], "token_ids": [5, 6]}}, set())


def _measurement(**over):
    m = {"metric": "accuracy", "value": 0.80, "higher_is_better": True, "peak_rss_mb": 300.0, "size_mb": 90.0,
         "latency": {"first_token_ms": {"p50": 20.0, "p90": 25.0}, "token_ms": {"p50": 10.0, "p90": 12.0},
                     "example_ms": {"p50": 30.0, "p90": 40.0}}}
    m.update(over)
    return m


def test_gates_say_which_and_by_how_much():
    budget = {"max_metric_drop": 0.02, "max_example_ms": 35.0, "max_peak_memory_mb": 512.0, "max_size_mb": 100.0}
    gates = rt.evaluate_gates(_measurement(), budget, {"metric": "accuracy", "value": 0.81})
    by = {g["budget_key"]: g for g in gates}
    assert by["max_metric_drop"]["status"] == "pass"
    assert by["max_example_ms"]["status"] == "fail"
    assert "exceeds 35 ms by 5.0 ms (+14%)" in by["max_example_ms"]["detail"]
    assert rt.overall_status(gates) == "fail"
    gates = rt.evaluate_gates(_measurement(value=0.70), {"max_metric_drop": 0.02}, {"metric": "accuracy", "value": 0.8})
    assert gates[0]["status"] == "fail" and "exceeds 0.02 by 0.0800" in gates[0]["detail"]
    # perplexity: lower is better, a rise is the drop
    gates = rt.evaluate_gates(_measurement(metric="perplexity", value=11.0), {"max_metric_drop": 0.5},
                              {"metric": "perplexity", "value": 10.0})
    assert gates[0]["status"] == "fail" and gates[0]["measured"] == pytest.approx(1.0)
    # no reference value: not run, never pass
    gates = rt.evaluate_gates(_measurement(), {"max_metric_drop": 0.02}, {"metric": "accuracy", "value": None})
    assert gates[0]["status"] == "not run" and rt.overall_status(gates) == "not run"
    assert rt.overall_status([]) == "not run"


BLOCKER = textwrap.dedent("""
    import sys

    class _Block:
        BLOCKED = ("torch", "transformers", "optimum", "sieve_edge.tasks", "sieve_edge.models")

        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
""")


def test_runner_without_torch_or_transformers(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    for fmt in ("onnx", "openvino"):
        bundle = tiny_bundle(fmt)
        out = tmp_path / f"{fmt}.json"
        proc = subprocess.run([sys.executable, str(bundle / "runner.py"), "--json", str(out)],
                              env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        m = json.loads(out.read_text())
        assert m["n_examples"] == len(ROWS) and m["status"] == "pass"
        assert m["inference_precision"] == "f32"
    # the package entry point is torch-free too; a partial run cannot check the metric: exit 3
    proc = subprocess.run([sys.executable, "-m", "sieve_edge.runtime", str(tiny_bundle("onnx")), "--limit", "4"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == rt.EXIT_GATE, proc.stderr
    assert "gate metric drop        NOT RUN: scored 4 test examples, the reference 8" in proc.stdout


def test_runner_errors_exit_1(tmp_path):
    assert rt.main([str(tmp_path)]) == rt.EXIT_ERROR
    task = write_task(tmp_path / "t", chat=True)
    with pytest.raises(rt.RunnerError, match="prompt.json"):
        rt.Task(rt._read_toml(task), task)
    with pytest.raises(rt.RunnerError, match="no model.onnx"):
        rt.load_model(tiny_export("openvino"), "onnxruntime", 1)


def test_peak_rss_is_the_runners_own_not_its_parents():
    # Linux carries ru_maxrss over fork + exec: a runner started by a process that had loaded a
    # model would report the parent's peak. Here the parent holds 400 MB; the child must not.
    ballast = bytearray(400 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from sieve_edge.runtime import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 200, child.stdout
    from sieve_edge.runtime import peak_rss_mb

    assert peak_rss_mb() > 400   # and the parent does see its own
    del ballast


def test_openvino_runtime_cache_capacity_is_applied_and_changes_no_output(monkeypatch):
    import openvino as ov

    configs = []
    compile_model = ov.Core.compile_model

    def spy(self, model, device, config):
        configs.append(dict(config))
        return compile_model(self, model, device, config)   # the plugin rejects keys it does not know

    monkeypatch.setattr(ov.Core, "compile_model", spy)
    default = rt.load_model(tiny_export("openvino"), "openvino", 1)
    bounded = rt.load_model(tiny_export("openvino"), "openvino", 1, cache_capacity=0)
    assert configs == []   # compiled on first use (a C++ generation loop compiles its own)
    default.reset(), bounded.reset()
    assert "CPU_RUNTIME_CACHE_CAPACITY" not in configs[0] and configs[1]["CPU_RUNTIME_CACHE_CAPACITY"] == 0
    assert (bounded.settings["CPU_RUNTIME_CACHE_CAPACITY"], default.settings["CPU_RUNTIME_CACHE_CAPACITY"]) == \
        ("0", "plugin default")
    # runner.py reads a --target TOML unchecked: the key is checked where it is used
    assert rt._cache_capacity({"runtime": "openvino", "runtime_cache_capacity": 16}) == 16
    for bad in ({"runtime": "openvino", "runtime_cache_capacity": "16"},
                {"runtime": "onnxruntime", "runtime_cache_capacity": 16}):
        with pytest.raises(rt.RunnerError, match="runtime_cache_capacity"):
            rt._cache_capacity(bad)
    for ids in ([3, 5, 7], [2, 4, 6, 8, 10]):   # two prompt lengths: two shapes
        default.reset(), bounded.reset()
        np.testing.assert_array_equal(default.forward(ids), bounded.forward(ids))


@pytest.mark.parametrize("fmt, runtime, package", [("openvino", "openvino", "openvino_genai"),
                                                    ("onnx", "onnxruntime", "onnxruntime_genai")])
def test_cpp_loop_gives_the_python_loops_greedy_tokens(fmt, runtime, package, tmp_path):
    """The runtime's C++ loop (OpenVINO GenAI's LLMPipeline; onnxruntime-genai's Generator on
    the genai_config.json the exporter writes), fed the runner's ids, decodes what the runner's
    own Python loop decodes: forced lengths on every test prompt, and a stop at an eos id."""
    import shutil

    pytest.importorskip(package)
    bundle = tiny_bundle(fmt, "generation")
    python, _ = _scorer(bundle, runtime)
    folder = tmp_path / "model"
    shutil.copytree(bundle / "model", folder)
    if fmt == "onnx":
        from transformers import AutoConfig

        from sieve_edge.export.onnx import write_genai_config

        assert write_genai_config(folder, AutoConfig.from_pretrained(folder))["ok"]
    cpp_model = rt.load_model(folder, runtime, threads=1, precision="f32")
    loop = rt.generation_loop(cpp_model, "cpp")
    assert loop.name.startswith(package)
    cpp = rt.Scorer(cpp_model, python.tok, python.task, {}, set(), loop=loop)
    seen = set()
    for text, _ in ROWS:
        ids = python.encode_prompt(text)
        want = python.generate(ids, 8, stop_at_eos=False)
        assert cpp.generate(ids, 8, stop_at_eos=False) == want, text
        seen.update(want)
    assert len(seen) > 1   # the prompts do not all collapse onto one token
    # stop at an eos id that the greedy sequence reaches at its third token
    ids = python.encode_prompt(ROWS[1][0])
    full = python.generate(ids, 8, stop_at_eos=False)
    python.eos = cpp.eos = {full[2]}
    cut = full[:full.index(full[2])]
    assert python.generate(ids, 8) == cut and cpp.generate(ids, 8) == cut
    assert len(cpp.first_ms) == len(ROWS) + 1 and len(cpp.token_ms) >= len(ROWS) * 7
    # the C++ loop opened its own copy of the model; the runner's was never opened
    assert getattr(cpp_model, "_request", None) is None and getattr(cpp_model, "session", None) is None
    assert rt.generation_loop(cpp_model, "python") is None
    if fmt == "onnx":
        with pytest.raises(rt.RunnerError, match="no genai_config.json"):
            rt.generation_loop(rt.load_model(tiny_export("onnx"), "onnxruntime", 1), "cpp")


def test_run_bundle_names_the_generation_loop():
    pytest.importorskip("openvino_genai")
    bundle = tiny_bundle("openvino", "generation")
    cpp = rt.run_bundle(bundle, limit=3, warmup=0)
    python = rt.run_bundle(bundle, limit=3, warmup=0, loop="python")
    assert cpp["generation_loop"].startswith("openvino_genai") and python["generation_loop"] == "python"
    assert cpp["value"] == python["value"] and cpp["latency"]["token_ms"]["n"] > 0
    assert rt.run_bundle(tiny_bundle("openvino"), limit=2, warmup=0)["generation_loop"] == "python"

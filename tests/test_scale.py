"""Scale without Ray: calibration streamed layer by layer from safetensors equals the in-memory
path, --device is checked before anything loads, and --workers/--ray without ray is a clear error."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from sieve_edge.calibrate import decompose_all, stream_decompositions
from sieve_edge.cli import main
from sieve_edge.errors import InputError
from sieve_edge.lazy import LazyCheckpoint, streamable
from sieve_edge.models import pick_device
from sieve_edge.tasks import calibration_batches, load_task
from test_search import write_task
from tiny import make_model, make_tokenizer

CUDA = torch.cuda.is_available()


def _real_layers(lazy: LazyCheckpoint) -> list[int]:
    """Decoder layers whose weights are off the meta device right now."""
    n = lazy.model.config.num_hidden_layers
    return [i for i in range(n) if any(p.device.type != "meta" for p in
                                       lazy.model.get_submodule(f"{lazy.spec.layers}.{i}").parameters())]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_lazy_safetensors_calibration_equals_the_in_memory_path(arch, tmp_path, monkeypatch):
    model, tok = make_model(arch), make_tokenizer()
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")  # sharded: an index and several files
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file() and streamable(tmp_path / "model")
    task = load_task(write_task(tmp_path / "task"))
    batches = list(calibration_batches(task, tok, 16, 8))
    bound = lambda name, m, n: 12  # noqa: E731
    decs, tokens = decompose_all(model, batches, "output", max_rank=bound)

    seen = []
    loads = LazyCheckpoint.load_layer

    def watched(self, i):
        loads(self, i)
        seen.append((i, _real_layers(self), self.model.get_input_embeddings().weight.device.type))

    monkeypatch.setattr(LazyCheckpoint, "load_layer", watched)
    got, streamed_tokens = {}, 0
    for _, layer, streamed_tokens in stream_decompositions(tmp_path / "model", batches, "output", bound):
        got.update(layer)
    # one layer in memory at a time, and the embedding dropped once layer 0's inputs were recorded
    assert seen == [(0, [0], "meta"), (1, [1], "meta")]
    assert streamed_tokens == tokens and set(got) == set(decs)
    for name, d in decs.items():
        e = got[name]
        assert e.energy.dtype == torch.float64 and e.left.dtype == torch.float64
        torch.testing.assert_close(e.energy, d.energy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(e.left, d.left, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(e.right, d.right, rtol=1e-10, atol=1e-10)


def test_a_factorized_checkpoint_or_a_gguf_folder_is_not_streamed(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"")
    (tmp_path / "ck" / "sieve_edge.json").write_text(json.dumps({"ranks": {"model.layers.0.mlp.up_proj": 8}}))
    assert not streamable(tmp_path / "ck")
    (tmp_path / "ck" / "sieve_edge.json").write_text(json.dumps({"ranks": {}}))
    assert streamable(tmp_path / "ck")  # a tuned (dense) checkpoint streams
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert not streamable(tmp_path / "g")


@pytest.mark.skipif(CUDA, reason="checks the machine without CUDA")
def test_device_auto_picks_the_cpu_and_cuda_is_a_clear_error(tmp_path):
    assert pick_device("auto") == torch.device("cpu") or torch.backends.mps.is_available()
    with pytest.raises(InputError, match="CUDA is not available here"):
        pick_device("cuda")
    runner = CliRunner()
    task = write_task(tmp_path / "task")
    for args in (["tune", "--out", str(tmp_path / "t")], ["prune", "--keep", "0.5", "--out", str(tmp_path / "p")],
                 ["search", "--out", str(tmp_path / "s")],
                 ["run", "--target", "factory-pc", "--out", str(tmp_path / "r")]):
        res = runner.invoke(main, [*args, "--model", "no-such-model-is-loaded", "--task", str(task),
                                   "--device", "cuda"])
        assert res.exit_code == InputError.exit_code == 1, (args, res.output)
        assert "error: device 'cuda' requested but CUDA is not available here" in res.output, args
        assert "Traceback" not in res.output


def test_stages_load_the_model_on_the_chosen_device(tmp_path):
    from sieve_edge.stages import StageContext

    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = StageContext(tmp_path, print, device="auto").model(str(tmp_path / "m"))
    assert next(loaded.parameters()).device == pick_device("auto")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_streamed_calibration_on_cuda_matches_the_cpu(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "model")
    task = load_task(write_task(tmp_path / "task"))
    batches = list(calibration_batches(task, tok, 16, 8))
    cpu = {n: d for _, layer, _ in stream_decompositions(tmp_path / "model", batches, "output", device="cpu")
           for n, d in layer.items()}
    gpu = {n: d for _, layer, _ in stream_decompositions(tmp_path / "model", batches, "output", device="cuda")
           for n, d in layer.items()}
    for name, d in cpu.items():
        assert gpu[name].energy.device.type == "cpu"
        torch.testing.assert_close(gpu[name].energy, d.energy, rtol=1e-4, atol=1e-6)


def test_workers_and_ray_without_ray_installed_name_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    runner = CliRunner()
    task = write_task(tmp_path / "task")
    for extra in (["--workers", "2"], ["--ray", "auto"]):
        for cmd in (["search", "--out", str(tmp_path / "s")],
                    ["run", "--target", "factory-pc", "--out", str(tmp_path / "r")]):
            res = runner.invoke(main, [*cmd, *extra, "--model", "no-such-model-is-loaded", "--task", str(task)])
            assert res.exit_code == 1, (cmd, extra, res.output)
            assert "pip install 'sieve-edge[ray]'" in res.output and "'ray' is not installed" in res.output
            assert "Traceback" not in res.output


def test_workers_settings_are_checked():
    from sieve_edge.search.distributed import RayWorkers

    with pytest.raises(InputError, match="--workers must be >= 1"):
        RayWorkers(workers=0)
    with pytest.raises(InputError, match="--workers N"):
        RayWorkers()

"""Calibration output on disk: decompositions round-trip as the search scores them; a registry
that does not match the model class is a clear error."""
from __future__ import annotations

import copy

import pytest
import torch

from sieve_edge import architectures as arch
from sieve_edge import calibrate
from sieve_edge.calibrate import decompose_all, iter_decompositions, load_decompositions, save_decompositions
from sieve_edge.errors import ArtifactError, UnsupportedArchitectureError
from sieve_edge.tasks import calibration_batches, load_task
from test_search import write_task
from tiny import make_model, make_tokenizer


def test_decompositions_round_trip_layer_by_layer(tmp_path):
    model, tok = make_model("qwen2"), make_tokenizer()
    task = load_task(write_task(tmp_path / "task"))
    batches = list(calibration_batches(task, tok, 16, 8))
    decs, tokens = decompose_all(model, batches, "output", max_rank=lambda name, m, n: 12)
    out = tmp_path / "calibrate"
    out.mkdir()
    layers = []

    def watched():
        for item in iter_decompositions(model, batches, "output", lambda name, m, n: 12):
            layers.append(item[0])
            yield item

    manifest = save_decompositions(out, watched(), n_calibration=16)
    assert layers == [0, 1] and sorted(p.name for p in out.glob("*.safetensors")) == ["layer-000.safetensors",
                                                                                        "layer-001.safetensors"]
    assert manifest["tokens"] == tokens and manifest["method"] == "output" and manifest["n_calibration"] == 16
    loaded, loaded_tokens, _ = load_decompositions(out)
    assert loaded_tokens == tokens and set(loaded) == set(decs)
    for name, d in decs.items():
        e = loaded[name]
        assert e.left.dtype == torch.float32 and e.energy.dtype == torch.float64 and e.max_rank == 12
        # what a candidate is scored with: the float32 bases, exactly
        assert torch.equal(e.left, d.left.float()) and torch.equal(e.right, d.right.float())
        assert e.error(8) == pytest.approx(d.error(8), abs=1e-15)   # the spectrum stays float64
    (out / "layer-001.safetensors").unlink()
    with pytest.raises(ArtifactError, match="layer-001.safetensors is missing"):
        load_decompositions(out)


def test_registry_mismatch_names_the_model_class(monkeypatch):
    model = make_model("llama")
    # a registry pointing at layers the forward pass never calls
    stray = torch.nn.ModuleList(copy.deepcopy(list(arch.decoder_layers(model))))
    monkeypatch.setattr(calibrate.arch, "decoder_layers", lambda m: stray)
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(UnsupportedArchitectureError, match=r"LlamaForCausalLM \(transformers\.models\.llama"):
        calibrate.capture_layer_inputs(model, [batch])

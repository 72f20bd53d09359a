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


def test_sieve_bases_give_the_sieve_refit_at_the_plans_ranks_and_any_other_rank(tmp_path):
    """The refit ``sieve_bases`` makes is ``prune_with_batches``' sieve refit, weight for weight;
    its bases sliced at the plan's ranks are those weights, they reach ``basis_ranks`` (beyond
    the plan's rank), and a matrix the plan keeps dense gets a basis but stays dense."""
    from sieve_edge.factorize import LowRankLinear, linear_shapes
    from sieve_edge.plan import RankPlan
    from sieve_edge.prune import prune_with_batches, sieve_bases

    model, tok = make_model("llama"), make_tokenizer()
    task = load_task(write_task(tmp_path / "task"))
    batches = list(calibration_batches(task, tok, 16, 8))
    names = arch.linear_names(model)
    shapes = linear_shapes(model)
    ranks = {n: (8 if i % 3 else None) for i, n in enumerate(names)}
    plan = RankPlan(shapes, ranks)
    reference = prune_with_batches(copy.deepcopy(model), batches, copy.deepcopy(plan), "sieve").model
    wanted = {n: 16 for n in names}
    bases, tokens = sieve_bases(model, batches, plan, wanted)
    assert set(bases) == set(names) and tokens > 0
    for n in names:
        mine, theirs = arch.get_module(model, n), arch.get_module(reference, n)
        assert bases[n].max_rank == min(16, *shapes[n])
        if ranks[n] is None:
            assert not isinstance(mine, LowRankLinear) and torch.equal(mine.weight, theirs.weight)
            continue
        B, A = bases[n].factors(ranks[n])
        torch.testing.assert_close(mine.first.weight, theirs.first.weight)
        torch.testing.assert_close(mine.second.weight, theirs.second.weight)
        torch.testing.assert_close(mine.first.weight, A.to(mine.first.weight.dtype))
        torch.testing.assert_close(mine.second.weight, B.to(mine.second.weight.dtype))

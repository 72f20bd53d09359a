"""Every registered architecture: factorize, prune with every method, save, reload, same logits."""
import copy

import pytest
import torch

from sieve_edge import architectures as arch
from sieve_edge.checkpoint import build_manifest, load_checkpoint, read_manifest, save_checkpoint
from sieve_edge.errors import UnsupportedArchitectureError
from sieve_edge.factorize import LowRankLinear, factorized_ranks, linear_shapes, param_counts
from sieve_edge.prune import prune_with_batches
from tiny import ARCH_CONFIGS, make_factorized, make_model, make_tokenizer


def batches(n=4, B=3, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 300, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, 7:] = 0  # one padded row: padding must not enter the statistics
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_every_registered_architecture_has_a_test_model():
    assert set(arch.REGISTRY) == set(ARCH_CONFIGS), (
        "each registry entry needs a tiny config in tests/tiny.py (and so runs the tests below)"
    )


@pytest.mark.parametrize("name", sorted(ARCH_CONFIGS))
def test_registry_matches_the_model(name):
    model = make_model(name)
    spec = arch.get_arch(model)
    assert spec.name == name
    names = arch.linear_names(model)
    assert len(names) == len(spec.linears) * model.config.num_hidden_layers
    for n in names:
        arch.get_module(model, n)  # raises if the registry points at nothing


@pytest.mark.parametrize("name", sorted(ARCH_CONFIGS))
def test_save_load_round_trip_identical_logits_and_exact_counts(name, tmp_path):
    model = make_factorized(name, rank=8)
    ranks = factorized_ranks(model)
    shapes = linear_shapes(model)
    dense, current = param_counts(shapes, ranks)
    assert current == sum(8 * (m + n) for m, n in shapes.values())
    # the model's own parameter count moves by exactly the linear weights removed
    base = sum(p.numel() for p in make_model(name).parameters())
    assert sum(p.numel() for p in model.parameters()) == base - (dense - current)
    manifest = build_manifest(model, base_model="tiny", method="svd", task=None)
    save_checkpoint(model, make_tokenizer(), tmp_path / "ck", manifest)
    loaded = load_checkpoint(tmp_path / "ck")
    assert factorized_ranks(loaded) == ranks
    assert read_manifest(tmp_path / "ck")["linear_param_reduction"] == pytest.approx(1 - current / dense, abs=1e-6)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("name", sorted(ARCH_CONFIGS))
@pytest.mark.parametrize("method", ["svd", "input-pca", "output", "sieve"])
def test_prune_every_method_every_architecture(name, method):
    model = make_model(name)
    result = prune_with_batches(model, batches(), 0.5, method)
    assert result.plan.linear_param_reduction > 0.3
    assert all(isinstance(arch.get_module(model, n), LowRankLinear) for n in result.plan.factorized)
    with torch.no_grad():
        logits = model(**batches(1, seed=1)[0]).logits
    assert torch.isfinite(logits).all()


def test_data_aware_methods_beat_svd_on_the_model_output():
    data, held = batches(8), batches(3, seed=7)
    base = make_model("llama")
    with torch.no_grad():
        ref = [base(**b).logits for b in held]

    def err(method):
        m = copy.deepcopy(base)
        prune_with_batches(m, data, 0.5, method)
        with torch.no_grad():
            num = sum(float(((m(**b).logits - r) ** 2).sum()) for b, r in zip(held, ref))
        return num / sum(float((r**2).sum()) for r in ref)

    errors = {meth: err(meth) for meth in ("svd", "output", "sieve")}
    assert errors["output"] < errors["svd"], errors
    assert errors["sieve"] < errors["svd"], errors


def test_padding_does_not_enter_calibration():
    from sieve_edge.calibrate import collect_stats

    model = make_model("llama")
    b = batches(1)[0]
    padded = collect_stats(model, [b])
    # the same real tokens with different padding garbage give the same statistics
    b2 = {k: v.clone() for k, v in b.items()}
    b2["input_ids"][0, 7:] = 42
    assert padded.tokens == int(b["attention_mask"].sum())
    other = collect_stats(model, [b2])
    name = arch.linear_names(model)[0]
    assert torch.allclose(padded.cov(name), other.cov(name))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                     word_embed_proj_dim=16, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: gemma3_text, gpt2, llama"):
        arch.get_arch(model)

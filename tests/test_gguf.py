"""The GGUF writer the runtime benchmark's llama.cpp rows use: layout read back with the gguf
package, and (when the optional llama-cpp-python peer is installed) logits equal to torch."""
import numpy as np
import pytest
import torch

from sieve_edge.errors import InputError, UnsupportedArchitectureError
from sieve_edge.export.gguf import permute_rotary, write_gguf
from tiny import make_factorized, make_model, make_tokenizer


def _untied_llama():
    model = make_model("mistral")   # untied head, grouped-query attention (4 heads, 2 KV heads)
    assert not model.config.tie_word_embeddings
    return model


def test_gguf_layout_and_rotary_permutation(tmp_path):
    import gguf

    model, tok = _untied_llama(), make_tokenizer()
    path = write_gguf(model, tok, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    assert len(tensors) == 2 + 1 + 9 * cfg.num_hidden_layers   # embedding, norm + head, 9 per block
    field = reader.fields["llama.attention.head_count_kv"]
    assert int(field.parts[field.data[0]][0]) == cfg.num_key_value_heads

    def array(name):
        t = tensors[name]
        return np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])   # GGUF dims are reversed

    sd = model.state_dict()
    np.testing.assert_array_equal(array("token_embd.weight"), sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(array("output.weight"), sd["lm_head.weight"].numpy())
    np.testing.assert_array_equal(array("blk.1.ffn_down.weight"), sd["model.layers.1.mlp.down_proj.weight"].numpy())
    k = sd["model.layers.0.self_attn.k_proj.weight"].numpy()
    got = array("blk.0.attn_k.weight")
    assert not np.array_equal(got, k)   # permuted ...
    # ... per head: HF's halves [x0..x3 | y0..y3] become pairs (x0, y0), (x1, y1), ...
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for h in range(cfg.num_key_value_heads):
        rows = k[h * head_dim:(h + 1) * head_dim]
        np.testing.assert_array_equal(got[h * head_dim:(h + 1) * head_dim:2], rows[:head_dim // 2])
        np.testing.assert_array_equal(got[h * head_dim + 1:(h + 1) * head_dim:2], rows[head_dim // 2:])
    assert np.array_equal(permute_rotary(np.arange(8)[:, None], 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg.vocab_size


def test_gguf_refuses_what_it_cannot_write(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(UnsupportedArchitectureError, match="not 'qwen2'"):
        write_gguf(make_model("qwen2"), tok, tmp_path / "q.gguf")
    with pytest.raises(InputError, match="dense model"):
        write_gguf(make_factorized("llama"), tok, tmp_path / "f.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "mistral"])   # tied head / untied head with GQA
def test_llama_cpp_runs_the_gguf_like_torch(arch, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")   # the optional peers extra; never in CI
    from sieve_edge.export.gguf import quantize_gguf

    model, tok = make_model(arch), make_tokenizer()
    path = write_gguf(model, tok, tmp_path / "m.gguf", context_length=64)
    ids = tok("the movie was great and moving", add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    q8 = quantize_gguf(path, tmp_path / "m.q8_0.gguf", "Q8_0")
    assert 0 < q8.stat().st_size < path.stat().st_size

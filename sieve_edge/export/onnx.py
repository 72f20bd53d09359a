"""ONNX backend: optimum export with KV cache, onnxruntime int8 / int4 weight quantization.

Imported lazily by ``sieve_edge.export``; a missing backend is ``BackendMissingError``.

int8 has two candidates, both measured on the task by ``export_model`` and chosen by metric:
- ``dynamic``: ``quantize_dynamic`` on MatMul, per-channel QInt8 weights; activations are
  quantized per tensor at run time (the path onnxruntime issues 18430 / 21636 report as
  collapsing LLM accuracy);
- ``nbits8``: ``MatMulNBits`` with 8-bit blockwise weights (symmetric, block 32) and
  activations quantized per block (``accuracy_level`` 4, the only fast 8-bit kernel).
int4 is ``MatMulNBits`` 4-bit (symmetric, block 32).
Two graph rewrites come first and last. optimum exports tied embeddings once (Gather reads
the table, the LM head is ``MatMul(x, Transpose(table))``), and both quantizers take only a
constant MatMul input and skip Gather at 8 bits, so the head and the embedding of a tied
model stayed fp32 (SmolLM2: 113 MB, read in full every token). ``untie_transposed_tables``
gives the head its own constant before quantizing; ``quantize_gathers`` stores the lookup
table as uint8 rows with a scale and zero point each, dequantized after the lookup (NNCF's
``INT8_ASYM``, as OpenVINO does).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import BackendMissingError

INSTALL = "pip install onnx onnxruntime optimum-onnx onnx-ir"
MODEL_FILE = "model.onnx"
NBITS_BLOCK = 32
# MatMulNBits compute type: 4 = int8 activations (quantized per block at run time). The
# default (fp32 compute) has no fast 8-bit kernel here: a 1536x576 matrix took ~9 ms at one
# token against ~0.1 ms in fp32 and ~0.02 ms at level 4 (microbench, 2 threads).
NBITS_ACCURACY_LEVEL = 4
INT8_METHODS = ("dynamic", "nbits8")


def require() -> None:
    """Raise ``BackendMissingError`` (with the install command) unless the backend imports."""
    import importlib

    for module in ("onnx", "onnxruntime", "optimum.exporters.onnx", "optimum.onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise BackendMissingError(module, INSTALL) from e


def export(model, out: Path, tokenizer=None) -> None:
    """Export ``model`` (in memory) to ``out/model.onnx`` with KV cache; no validation here.

    optimum's own validation turns a tolerance failure into a warning; ``fidelity`` does the
    real check afterwards, so it is switched off.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(
        model, str(out), task="text-generation-with-past", do_validation=False,
        preprocessors=[tokenizer] if tokenizer is not None else None,
    )


def _save(model_proto, path: Path) -> None:
    import onnx

    external = model_proto.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit
    onnx.save_model(model_proto, str(path), save_as_external_data=external,
                    location=path.name + "_data" if external else None)


def quantize(src: Path, dst: Path, method: str) -> dict:
    """Quantize the weights of ``src`` (an ONNX file) into ``dst``; returns the settings used."""
    require()
    if method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        import onnx

        model = onnx.load(str(src))
        untied = untie_transposed_tables(model)
        quantize_dynamic(
            model, str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
            weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
        )
        del model
        model = onnx.load(str(dst))
        gathers = quantize_gathers(model)
        replace_with(model, dst)
        return {"method": "dynamic", "op": "MatMulInteger/DynamicQuantizeLinear", "weight_type": "QInt8",
                "per_channel": True, "activations": "uint8 per tensor at run time", "untied_heads": untied,
                "gather_tables": gathers}
    if method in ("nbits8", "nbits4"):
        bits = 8 if method == "nbits8" else 4
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as e:  # it needs onnx-ir, which onnxruntime does not pull in
            raise BackendMissingError(getattr(e, "name", None) or "onnx_ir", INSTALL) from e
        import onnx

        model = onnx.load(str(src))
        untied = untie_transposed_tables(model)
        quant = MatMulNBitsQuantizer(model, bits=bits, block_size=NBITS_BLOCK, is_symmetric=True,
                                     accuracy_level=NBITS_ACCURACY_LEVEL)
        quant.process()
        gathers = quantize_gathers(quant.model.model)
        _save(quant.model.model, dst)
        return {"method": method, "op": "MatMulNBits", "bits": bits, "block_size": NBITS_BLOCK,
                "symmetric": True, "accuracy_level": NBITS_ACCURACY_LEVEL,
                "activations": "int8 per block at run time (accuracy_level 4)", "untied_heads": untied,
                "gather_tables": gathers}
    raise ValueError(f"unknown ONNX quantization method '{method}'")


def replace_with(model_proto, path: Path) -> None:
    """Write ``model_proto`` over ``path`` (external data included) through a sibling folder."""
    import shutil

    tmp = path.parent / f".rewrite-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save(model_proto, tmp / path.name)
    replace(tmp / path.name, path)
    shutil.rmtree(tmp)


def untie_transposed_tables(model_proto) -> list[str]:
    """Replace every Transpose of a 2-D fp32 initializer by a transposed constant.

    The LM head of a tied model then reads a constant MatMul input, which the weight
    quantizers can take; the table itself is left to its other readers (the Gather).
    Returns the initializers whose transpose was materialized."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    untied, keep = [], []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), [1, 0])
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or list(perm) != [1, 0]:
            keep.append(node)
            continue
        w = np.ascontiguousarray(numpy_helper.to_array(table).T)
        graph.initializer.append(numpy_helper.from_array(w, node.output[0]))
        untied.append(table.name)
    if untied:
        graph.ClearField("node")
        graph.node.extend(keep)
    return untied


def quantize_gathers(model_proto, min_elements: int = 1024) -> list[str]:
    """Store every large fp32 table that only Gather reads (the token embedding) as uint8.

    Per row, scale = (max - min) / 255 and an integer zero point (``factorize.quantize_int8``,
    so the search's int8 simulation holds here too); the lookup
    becomes Gather(codes), Gather(scale), Gather(zero), then (codes - zero) * scale. A table
    any other op reads (a tied head MatMul) is left alone. Returns the tables rewritten.
    """
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from ..factorize import quantize_int8

    graph = model_proto.graph
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in set(node.input):
            readers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}

    def gather_axis0_only(name: str) -> bool:
        nodes = [graph.node[i] for i in readers.get(name, [])]
        return bool(nodes) and name not in outputs and all(
            n.op_type == "Gather" and n.input[0] == name and name not in n.input[1:]
            and all(a.name != "axis" or helper.get_attribute_value(a) == 0 for a in n.attribute)
            for n in nodes)

    tables = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
              and t.dims[0] * t.dims[1] >= min_elements and gather_axis0_only(t.name)]
    after: dict[int, list] = {}   # index of a Gather node -> the dequantize nodes that follow it
    for table in tables:
        codes, scale, zero = (t.numpy() for t in quantize_int8(torch.from_numpy(numpy_helper.to_array(table))))
        name = table.name
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(codes, f"{name}.uint8"),
                                  numpy_helper.from_array(scale, f"{name}.scale"),
                                  numpy_helper.from_array(zero, f"{name}.zero")])
        for k, i in enumerate(readers[name]):
            node = graph.node[i]
            out, ids, tag = node.output[0], node.input[1], f"{name}.dq{k}"
            node.input[0], node.output[0] = f"{name}.uint8", f"{tag}.codes"
            after[i] = [
                helper.make_node("Gather", [f"{name}.scale", ids], [f"{tag}.scale"], axis=0, name=f"{tag}/scale"),
                helper.make_node("Gather", [f"{name}.zero", ids], [f"{tag}.zero"], axis=0, name=f"{tag}/zero"),
                helper.make_node("Cast", [f"{tag}.codes"], [f"{tag}.float"], to=TensorProto.FLOAT, name=f"{tag}/cast"),
                helper.make_node("Sub", [f"{tag}.float", f"{tag}.zero"], [f"{tag}.centered"], name=f"{tag}/sub"),
                helper.make_node("Mul", [f"{tag}.centered", f"{tag}.scale"], [out], name=f"{tag}/mul"),
            ]
    if after:
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.append(node)
            nodes.extend(after.get(i, []))
        graph.ClearField("node")
        graph.node.extend(nodes)
    return [t.name for t in tables]


def load(folder: Path, file_name: str = MODEL_FILE):
    """The exported model through optimum's ``ORTModelForCausalLM`` (CPU, KV cache)."""
    require()
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(
        str(folder), file_name=file_name, use_cache=True, provider="CPUExecutionProvider", trust_remote_code=False,
    )
    # optimum 2.1 sizes the empty KV cache with num_attention_heads for model types outside
    # its list of grouped-query models (Phi-3 among them): the graph wants the KV heads.
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    if kv_heads and getattr(model, "num_key_value_heads", kv_heads) != kv_heads:
        model.num_key_value_heads = kv_heads
    return model


def replace(src: Path, dst: Path) -> None:
    """Move the ONNX file ``src`` (and its external data, if any) over ``dst``.

    External data is renamed with it, and the graph's references to it rewritten, since
    ``_save`` names the data file after the model file."""
    data = src.with_name(src.name + "_data")
    if not data.exists():
        os.replace(src, dst)
        return
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data.name:
                entry.value = dst.name + "_data"
    os.replace(data, dst.with_name(dst.name + "_data"))
    onnx.save_model(model, str(dst))
    src.unlink()


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


GENAI_CONFIG = "genai_config.json"


def write_genai_config(folder: Path, config) -> dict:
    """``genai_config.json`` so that onnxruntime-genai's C++ generator runs this folder's
    optimum graph as it is (input / output names read from the graph, not assumed).

    Returns what ``export.json`` records. The runner sets the thread count at load time."""
    import json

    import onnx

    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    if "input_ids" not in inputs or "logits" not in outputs or "past_key_values.0.key" not in inputs:
        return {"ok": False, "error": "the graph has no input_ids / logits / past_key_values.0.key"}
    names = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
             "past_value_names": "past_key_values.%d.value"}
    for optional in ("attention_mask", "position_ids"):
        if optional in inputs:
            names[optional] = optional
    heads = config.num_attention_heads
    eos = getattr(config, "eos_token_id", None)
    body = {
        "model": {
            "type": config.model_type,
            "bos_token_id": getattr(config, "bos_token_id", None) or 0,
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": getattr(config, "pad_token_id", None) or 0,
            "context_length": int(getattr(config, "max_position_embeddings", 2048)),
            "vocab_size": int(config.vocab_size),
            "decoder": {
                "session_options": {"log_id": "sieve-edge", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(heads),
                "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
                "num_hidden_layers": int(config.num_hidden_layers),
                "inputs": names,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # greedy; optimum's graphs concatenate past and new keys, so no shared KV buffer
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "min_length": 0,
                   "max_length": int(getattr(config, "max_position_embeddings", 2048)),
                   "past_present_share_buffer": False},
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(body, indent=2) + "\n")
    return {"ok": True, "file": GENAI_CONFIG}

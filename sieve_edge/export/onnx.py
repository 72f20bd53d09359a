"""ONNX backend: optimum export with KV cache, onnxruntime int8 / int4 weight quantization.

Imported lazily by ``sieve_edge.export``; a missing backend is ``BackendMissingError``.

int8 has two candidates, both measured on the task by ``export_model`` and chosen by metric:
- ``dynamic``: ``quantize_dynamic`` on MatMul, per-channel QInt8 weights; activations are
  quantized per tensor at run time (the path onnxruntime issues 18430 / 21636 report as
  collapsing LLM accuracy);
- ``nbits8``: ``MatMulNBits`` with 8-bit blockwise weights (symmetric, block 32) and
  activations quantized per block (``accuracy_level`` 4, the only fast 8-bit kernel).
int4 is ``MatMulNBits`` 4-bit (symmetric, block 32).
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

        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
            weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
        )
        return {"method": "dynamic", "op": "MatMulInteger/DynamicQuantizeLinear", "weight_type": "QInt8",
                "per_channel": True, "activations": "uint8 per tensor at run time"}
    if method in ("nbits8", "nbits4"):
        bits = 8 if method == "nbits8" else 4
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as e:  # it needs onnx-ir, which onnxruntime does not pull in
            raise BackendMissingError(getattr(e, "name", None) or "onnx_ir", INSTALL) from e
        import onnx

        quant = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=NBITS_BLOCK, is_symmetric=True,
                                     accuracy_level=NBITS_ACCURACY_LEVEL)
        quant.process()
        _save(quant.model.model, dst)
        return {"method": method, "op": "MatMulNBits", "bits": bits, "block_size": NBITS_BLOCK,
                "symmetric": True, "accuracy_level": NBITS_ACCURACY_LEVEL,
                "activations": "int8 per block at run time (accuracy_level 4)"}
    raise ValueError(f"unknown ONNX quantization method '{method}'")


def load(folder: Path, file_name: str = MODEL_FILE):
    """The exported model through optimum's ``ORTModelForCausalLM`` (CPU, KV cache)."""
    require()
    from optimum.onnxruntime import ORTModelForCausalLM

    return ORTModelForCausalLM.from_pretrained(
        str(folder), file_name=file_name, use_cache=True, provider="CPUExecutionProvider",
    )


def replace(src: Path, dst: Path) -> None:
    """Move the ONNX file ``src`` (and its external data, if any) over ``dst``."""
    os.replace(src, dst)
    data = src.with_name(src.name + "_data")
    if data.exists():
        os.replace(data, dst.with_name(dst.name + "_data"))

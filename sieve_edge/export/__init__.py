"""Export: a (factorized) model → ONNX or OpenVINO with KV cache, int8 / int4, checked.

``export_model(model, fmt, weights, out, ...)`` is the one verb; see ``docs/EXPORT.md``.
Backends (optimum, onnxruntime, openvino, nncf) are imported inside the functions that use
them: importing this package is cheap, and a missing backend is ``BackendMissingError``
naming the install command.
"""
from __future__ import annotations

__all__ = ["export_model", "ExportResult", "FORMATS", "WEIGHTS"]

FORMATS = ("onnx", "openvino")
WEIGHTS = ("fp32", "int8", "int4")


def __getattr__(name: str):
    if name in ("export_model", "ExportResult"):
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module 'sieve_edge.export' has no attribute '{name}'")

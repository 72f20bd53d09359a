"""sieve-edge: task-aware low-rank pruning of language models for CPU edge boxes.

The package imports without torch (the edge runner, ``python -m sieve_edge.runtime``, needs
only numpy, tokenizers and a runtime); torch-backed names load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("sieve_edge.models", "load_model"),
    "load_tokenizer": ("sieve_edge.models", "load_tokenizer"),
    "load_task": ("sieve_edge.tasks", "load_task"),
}
# ``sieve_edge.evaluate`` is always the module (a function of that name would be replaced by
# the module as soon as anything imports it); the function is ``sieve_edge.evaluate.evaluate``.
_MODULES = ("evaluate",)


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _MODULES:
        return importlib.import_module(f"sieve_edge.{name}")
    raise AttributeError(f"module 'sieve_edge' has no attribute '{name}'")


__all__ = ["__version__", *_LAZY]

"""Which modules of each architecture are the linear matrices sieve-edge may factorize.

The registry is plain data: per Hugging Face ``model_type``, where the decoder layers live
and, inside one layer, the linear modules grouped by the input they share, in forward
order. The groups are what the sequential ``sieve`` method walks: a group's inputs come
from everything upstream of it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    layers: str                          # dotted path of the decoder-layer ModuleList
    groups: tuple[tuple[str, ...], ...]  # linear modules inside one layer, grouped by shared input
    conv1d: bool = False                 # GPT-2 style Conv1D: weight is (in, out), y = x W + b
    lm_head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", _LLAMA_GROUPS),
    "mistral": ArchSpec("mistral", "model.layers", _LLAMA_GROUPS),
    "qwen2": ArchSpec("qwen2", "model.layers", _LLAMA_GROUPS),
    "gemma3_text": ArchSpec("gemma3_text", "model.layers", _LLAMA_GROUPS),
    "phi3": ArchSpec(
        "phi3",
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "gpt2": ArchSpec(
        "gpt2",
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        conv1d=True,
    ),
}

# Short matrix-type names for tables and heat maps ("self_attn.q_proj" -> "q_proj").
def matrix_type(relative_name: str) -> str:
    return relative_name.rsplit(".", 1)[-1] if "." in relative_name else relative_name


def supported() -> list[str]:
    return sorted(REGISTRY)


def get_arch(model_or_config) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        model_type = "gemma3_text"
    spec = REGISTRY.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}' "
            f"({', '.join(getattr(config, 'architectures', None) or ['?'])}); "
            f"supported model types: {', '.join(supported())}"
        )
    return spec


def _get(root, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def decoder_layers(model):
    spec = get_arch(model)
    try:
        return _get(model, spec.layers)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"model type '{spec.name}': no decoder layers at '{spec.layers}' in {type(model).__name__}"
        ) from e


def linear_names(model) -> list[str]:
    """Qualified names of every factorizable matrix, in forward order."""
    spec = get_arch(model)
    return [f"{spec.layers}.{i}.{name}" for i in range(len(decoder_layers(model))) for name in spec.linears]


def linear_groups(model) -> list[list[str]]:
    """Qualified names grouped by shared input, in forward order (layer 0 group 0 first)."""
    spec = get_arch(model)
    return [
        [f"{spec.layers}.{i}.{name}" for name in group]
        for i in range(len(decoder_layers(model)))
        for group in spec.groups
    ]


def get_module(model, qualified_name: str):
    try:
        return _get(model, qualified_name)
    except (AttributeError, IndexError) as e:
        raise UnsupportedArchitectureError(
            f"module '{qualified_name}' not found in {type(model).__name__}: "
            "the architecture registry does not match this model"
        ) from e


def set_module(model, qualified_name: str, module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = _get(model, parent_name) if parent_name else model
    setattr(parent, child, module)


def set_modules(model, modules: dict) -> None:
    """``set_module`` for each (qualified name, module): e.g. putting back modules swapped out."""
    for name, module in modules.items():
        set_module(model, name, module)


def layer_index(qualified_name: str) -> int:
    """Decoder-layer index of a qualified linear name ('model.layers.3.mlp.up_proj' -> 3)."""
    for part in qualified_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no layer index in '{qualified_name}'")


def relative_name(qualified_name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'mlp.up_proj'."""
    parts = qualified_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:])
    return qualified_name

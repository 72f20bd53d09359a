"""Task-sized LM heads: a classifier needs the logits of its label tokens, not the vocabulary.

SmolLM2's head is 49152 x 576 = 28M of the 134M weights read for every token; restricted to
two label tokens it is 1,152 weights. The exported model then returns logits (B, T, k) whose
k-th column is the full head's logit of ``token_ids[k]`` (the first answer token of label k).
It can score a classification, not generate text.
"""
from __future__ import annotations

from ..errors import InputError


def restrict_head_(model, token_ids: list[int]):
    """Replace ``model``'s LM head, in place, by its rows ``token_ids``; returns the model.

    Unties the head from the input embedding (the embedding stays whole) so that no later
    ``tie_weights`` call puts the full matrix back.
    """
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise InputError(f"{type(model).__name__} has no LM head to restrict")
    vocab = head.weight.shape[0]
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad or not token_ids:
        raise InputError(f"label token ids {bad or token_ids} are not in the vocabulary (size {vocab})")
    index = torch.tensor(token_ids, dtype=torch.long)
    small = nn.Linear(head.weight.shape[1], len(token_ids), bias=getattr(head, "bias", None) is not None)
    with torch.no_grad():
        small.weight.copy_(head.weight.detach()[index])  # (k, hidden)
        if small.bias is not None:
            small.bias.copy_(head.bias.detach()[index])
    small.to(head.weight.dtype)
    model.config.tie_word_embeddings = False
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.tie_word_embeddings = False
    model.set_output_embeddings(small)
    return model


def head_params(model) -> int:
    head = model.get_output_embeddings()
    return sum(p.numel() for p in head.parameters())

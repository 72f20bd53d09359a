"""Tiny random models and a tiny tokenizer, built offline from configs, for unit tests."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "the movie was great and moving , a charming film", "a dull , boring and tedious mess",
    "positive negative ham spam free prize call now winner", "play music add to playlist weather",
    "book a restaurant table for two rate this book five stars", "what is the sentiment ? answer :",
    "Review: Sentiment: Message: Label: Intent:", "0123456789 hello world , . ! ? ' \" :",
] * 4


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


ARCH_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2, sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, pad_token_id=0),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, num_hidden_layers=2, head_dim=8, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def make_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None):
    """A tiny random causal LM of the given registry architecture, float32, eval mode."""
    kwargs = dict(ARCH_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    vocab = vocab_size or len(make_tokenizer())
    config = AutoConfig.for_model(model_type, vocab_size=vocab, max_position_embeddings=128, **kwargs)
    if model_type == "gpt2":
        config.bos_token_id = config.eos_token_id = 1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of this size is near-uniform; scale the weights so outputs are not trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def make_factorized(arch: str = "llama", rank: int = 8, seed: int = 0):
    """A tiny random model whose every registry matrix is a rank-`rank` LowRankLinear (random SVD factors)."""
    from sieve_edge.architectures import linear_names, get_module
    from sieve_edge.factorize import dense_weight, factorize_
    from sieve_edge.lowrank import decompose_svd

    model = make_model(arch, seed)
    factors = {}
    for name in linear_names(model):
        dec = decompose_svd(dense_weight(get_module(model, name)))
        factors[name] = dec.factors(min(rank, dec.max_rank))
    return factorize_(model, factors)

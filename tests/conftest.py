import pytest

from tiny import make_model, make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_model("llama")

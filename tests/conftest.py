"""Shared test fixtures: a tiny causal LM + tokenizer with a chat template, built locally (nothing downloaded).

    from conftest import make_tiny_model, make_tiny_tokenizer, TINY_CHAT_TEMPLATE

    make_tiny_model(path)                     # LlamaForCausalLM, 2 layers, hidden 64, head_dim 64, tied embeddings
    make_tiny_model(path, vocab_size=512)     # pad the embedding matrix beyond the tokenizer's vocabulary
    make_tiny_tokenizer()                     # WordLevel PreTrainedTokenizerFast with <unk>/<pad>/<eos>/<bos>

Fixtures: `tiny_model_dir` (session-scoped, saved once; treat it as read-only) and `tiny_model_factory`
(returns `make_tiny_model`, for tests that need a variant in their own `tmp_path`).

The model shape (head_dim 64, one head) is chosen so the same directory could also run in vLLM, whose CPU
attention rejects head_dim 16.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Words the tokenizer knows; anything else maps to <unk> (which is fine for length checks and generation).
TINY_CORPUS = [
    "the movie was great and the acting was wonderful",
    "a dull film with a terrible plot",
    "i loved every minute of it",
    "the story is slow but the ending is good",
    "write a short review of a film you liked",
    "tell me about the best movie you have seen",
    "what did you think of the music and the cast",
    "this is a test prompt for the pipeline",
]
TINY_SPECIAL_TOKENS = ["<unk>", "<pad>", "<bos>", "<eos>", "<system>", "<user>", "<assistant>"]
# `<role> content <eos>` per turn; the generation prompt is `<assistant>`.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, corpus: list[str] | None = None):
    """A WordLevel tokenizer trained on `corpus` (whitespace split), wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.train_from_iterator(corpus or TINY_CORPUS, trainers.WordLevelTrainer(special_tokens=TINY_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=["<system>", "<user>", "<assistant>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_tiny_model(
    path: str | Path,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 1,
    intermediate_size: int = 128,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    seed: int = 0,
    cls=None,
) -> Path:
    """Save a tiny Llama causal LM (fp32 safetensors) plus its tokenizer to `path`; returns `path`.

    `vocab_size` defaults to the tokenizer's size; a larger value pads the embedding matrix (as real models do).
    head_dim = hidden_size / num_attention_heads (64 by default); num_key_value_heads = num_attention_heads.
    `cls` defaults to LlamaForCausalLM (pass e.g. LlamaForSequenceClassification for a reward model).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tiny_tokenizer(chat_template)
    n_tok = len(tok)
    if vocab_size is None:
        vocab_size = n_tok
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {n_tok}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        head_dim=hidden_size // num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = (cls or LlamaForCausalLM)(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny causal LM + tokenizer with a chat template, saved once per session. Do not modify it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture
def tiny_model_factory():
    """`make_tiny_model(path, vocab_size=None, ...)` for tests that need their own variant."""
    return make_tiny_model

"""Shared test fixtures: a tiny causal LM + tokenizer with a chat template, built locally (nothing downloaded).

    from conftest import make_tiny_model, make_tiny_tokenizer, TINY_CHAT_TEMPLATE

    make_tiny_model(path)                     # LlamaForCausalLM, 2 layers, hidden 64, head_dim 64, tied embeddings
    make_tiny_model(path, vocab_size=512)     # pad the embedding matrix beyond the tokenizer's vocabulary
    make_tiny_tokenizer()                     # WordLevel PreTrainedTokenizerFast with <unk>/<pad>/<eos>/<bos>
    LogRecords()                              # a logging handler that keeps every record (.records, .lines;
                                              # `with LogRecords().on(name) as seen:` attaches it)

Fixtures: `tiny_model_dir` (session-scoped, saved once; treat it as read-only) and `tiny_model_factory`
(returns `make_tiny_model`, for tests that need a variant in their own `tmp_path`).

Real-model fixtures (slow to build; use them only from `@pytest.mark.slow` tests):
`base_model_dir` (session-scoped: the embedded SmolLM2-135M-Instruct GGUF converted once per session by
`stages.prepare.prepare_model`, ~30 s; read-only) and `vllm_sampler` (session-scoped: the session's one
vLLM engine on `base_model_dir`, fp32; a test that pushes other weights into it must restore them).

The model shape (head_dim 64, one head) is chosen so the same directory could also run in vLLM, whose CPU
attention rejects head_dim 16.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _own_lock_dir(tmp_path_factory):
    """The output dirs' locks (stages.loop.lock.output_lock_path) in this session's temporary dir, not in
    /tmp/rloo-locks: one file per output dir a test used (~700), removed with the session's dir. Set in the
    environment, so every process a test starts (a rank, a Prefect worker, `dvc repro`) meets the same locks."""
    import os

    if "RLOO_LOCK_DIR" in os.environ:
        yield
        return
    os.environ["RLOO_LOCK_DIR"] = str(tmp_path_factory.mktemp("rloo-locks"))
    yield
    os.environ.pop("RLOO_LOCK_DIR", None)

class LogRecords(logging.Handler):
    """Keeps every record it is handed, at any level: for tests of a logger's filters (caplog sits on the root
    logger, after a logger's own filters and only for records that propagate)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    @contextlib.contextmanager
    def on(self, name: str, level: int = logging.WARNING):
        """Attached to logger `name`, which is enabled at `level` while attached, whatever state earlier tests of
        the process left (a full CI run once saw no record at all on vLLM's reload logger: a logger disabled by
        some library's logging set-up, a raised level or `logging.disable` drops records before any handler);
        the logger's state is restored after."""
        logger = logging.getLogger(name)
        disabled, own_level, off = logger.disabled, logger.level, logging.root.manager.disable
        logger.disabled = False
        logger.setLevel(level)
        logging.disable(logging.NOTSET)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.disabled = disabled
            logger.setLevel(own_level)
            logging.disable(off)


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
    num_key_value_heads: int | None = None,
    intermediate_size: int = 128,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    seed: int = 0,
    cls=None,
) -> Path:
    """Save a tiny Llama causal LM (fp32 safetensors) plus its tokenizer to `path`; returns `path`.

    `vocab_size` defaults to the tokenizer's size; a larger value pads the embedding matrix (as real models do).
    head_dim = hidden_size / num_attention_heads (64 by default); num_key_value_heads defaults to num_attention_heads.
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
        num_key_value_heads=num_key_value_heads or num_attention_heads,
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


def repo_params_data(**sections) -> dict:
    """The repo's params.yaml as a dict (a fresh copy), with `sections` merged in: `sample={"k": 2}`."""
    data = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def repo_params(**sections):
    """`repo_params_data(**sections)` validated into `stages.params.Params`."""
    from stages.params import parse_params

    return parse_params(repo_params_data(**sections), "test-params")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """The real default base model (base.model: smollm2), converted once per session into a tmp dir. Read-only."""
    from stages.errors import PipelineError
    from stages.prepare import gguf_path, prepare_model

    try:
        gguf_path()
    except PipelineError as exc:
        pytest.skip(str(exc))
    dest = tmp_path_factory.mktemp("base_model") / "base"
    return prepare_model(repo_params(base={"model": "smollm2", "model_dir": str(dest)}))


@pytest.fixture(scope="session")
def vllm_sampler(base_model_dir):
    """The session's one in-process vLLM engine (fp32) on `base_model_dir`; closed at the end of the session.

    vLLM start-up is slow (~5-20 s here) and each engine holds its own KV cache, so every test shares this
    one. A test that pushes other weights into it (`update_weights`) must push the base weights back. Another
    engine may open and close beside it (vLLM's parallel state, process-wide, goes with the last engine open:
    `vllm_backend._shared_state_goes_with_the_last_engine`).
    """
    from stages.sample import make_sampler, vllm_available

    if not vllm_available():
        pytest.skip("vLLM does not import here")
    sampler = make_sampler(str(base_model_dir), repo_params(sample={"dtype": "float32"}), backend="vllm")
    yield sampler
    sampler.close()


def make_samples_table(tokenizer, rows):
    """rows: (prompt_id, sample_idx, prompt, completion words, finish_reason). A samples table as the sample stage writes it, for the tiny tokenizer and its chat template."""
    import polars as pl

    from stages.schemas import SAMPLES

    cols: dict[str, list] = {c: [] for c in SAMPLES}
    for pid, k, prompt, words, finish in rows:
        ids = tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
        if finish == "stop":
            ids = ids + [tokenizer.eos_token_id]
        cols["prompt_id"].append(pid)
        cols["sample_idx"].append(k)
        cols["prompt_text"].append(
            tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        )
        cols["completion"].append(words)
        cols["completion_token_ids"].append(ids)
        cols["sampler_logprobs"].append([-1.5] * len(ids))
        cols["num_tokens"].append(len(ids))
        cols["finish_reason"].append(finish)
        cols["policy_version"].append(0)
    return pl.DataFrame(cols, schema=SAMPLES)

"""Rewards of the score stage: built-in functions, a reward model and a user's function behind one interface.

Every reward component is a `Reward`: `reward(prompts, completions, extras, completion_ids=, messages=, **columns)`
-> one number (or None) per completion, in order. `columns` are the per-row extra columns of the prompts table
(e.g. a reference `answer`); `messages` the chat turns of conversational prompts; `extras` TRL's trainer_state,
log_metric and log_extra (`TrlExtras`). `prompts` and `completions` (and `extras`) are positional-only, so a
column may have any other name. `build_rewards` builds them
once per run (models are loaded once, the VADER analyzer is built once) and the score stage calls them every round:

    rewards = build_rewards(params.score.rewards, device="cpu", batch_size=16)
    parts = compute_rewards(rewards, prompts, completions, keys, answer=answers)  # name -> masked float64 array
    bad = first_invalid(parts["sentiment"], keys)                                  # NaN/inf? (on_invalid)
    score = combine(parts, {r.name: r.weight for r in rewards})                    # sum_i w_i * r_i

A `RewardSpec` names exactly one source:

- `function: <built-in>`: one of `BUILTINS` (`vader`, `length`, `regex`, `keywords`, `exact_match`),
  configured by `kwargs` (documented on each factory below; unknown kwargs are rejected).
- `function: "module:function"`: a user's function, imported from the repo root (the working directory
  is put on `sys.path`), called as TRL calls reward functions: keyword arguments `prompts`, `completions`,
  `completion_ids`, every extra column of the prompts table by name, and the spec's `kwargs`; prompts and
  completions in TRL's conversational form (`[{"role": "assistant", "content": ...}]`) when the prompts are chat
  messages, plain text otherwise or with `kwargs: {as_text: true}`. A function returns one float per completion,
  or None where it does not apply (TRL's convention: left out of the weighted sum). Functions written for TRL
  (`def reward_len(completions, **kwargs)`, `trl.rewards.think_format_reward`) run unchanged; async ones too.
  A function without a `completions` parameter or `**kwargs` gets the older positional form,
  `fn(prompts, completions, **kwargs)`.
- `model: DIR`: a local transformers `...ForSequenceClassification` directory with one scalar output
  (`num_labels == 1`; a classifier only with `kwargs.label_index`). Scored in batches without grad.

Outputs are checked once, the same way for every kind (`check_scores`): one number per completion, each
a real number or None, as a masked array (None masked: "does not apply"). NaN/inf are not raised there:
`invalid_rows` finds them and applies `score.on_invalid` (error | drop) for the score stage and the evaluation.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import os
import re
import string
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import PipelineError
from stages.models import load_config, load_tokenizer
from stages.params import RewardSpec
from stages.schemas import TRL_EXTRAS

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (prompt_id, sample_idx)
RewardFn = Callable[..., Sequence[float]]

# what a user function is called with (TRL's reward-function arguments): no `kwargs` key may take one of these names
PASSED_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


@dataclass
class TrlExtras:
    """TRL's `trainer_state`, `log_metric` and `log_extra` reward arguments for one scoring call: `trainer_state`
    has `global_step` (optimizer steps before this round) and `max_steps` (of the run); `log_metric(name, value)`
    values are averaged into the round's metrics under `log/<name>`; `log_extra(column, values)` adds a column
    `extra/<column>` (one value per completion) to the scores table."""

    trainer_state: Any = None
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    @classmethod
    def at(cls, global_step: int, max_steps: int) -> TrlExtras:
        from transformers import TrainerState

        return cls(TrainerState(global_step=global_step, max_steps=max_steps))

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: Sequence) -> None:
        self.extra.setdefault(str(column), []).extend(values)

    def kwargs(self) -> dict[str, Any]:
        return {"trainer_state": self.trainer_state, "log_extra": self.log_extra, "log_metric": self.log_metric}


@dataclass
class Reward:
    """One weighted reward component; every kind (built-in, model, user function) is one of these."""

    name: str  # component name -> column `score/<name>`
    weight: float  # weight in score = sum_i w_i * r_i
    fn: RewardFn  # fn(prompts, completions, **columns) -> one number per completion
    source: str  # for messages and logs: "built-in vader", "model models/rm", "function my_mod:fn"
    trl_style: bool = False  # a user function: called as TRL calls it (see the module docstring)

    def __call__(self, prompts: list[str], completions: list[str], extras: TrlExtras | None = None, /,
                 completion_ids: Sequence | None = None, messages: Sequence | None = None,
                 **columns: Sequence[Any]) -> Sequence[float]:
        try:
            if self.trl_style:
                return self.fn(prompts, completions, extras, completion_ids=completion_ids, messages=messages, **columns)
            if isinstance(self.fn, ModelReward):
                return self.fn(prompts, completions, messages=messages)
            return self.fn(prompts, completions, **columns)
        except PipelineError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise PipelineError(f"reward `{self.name}` ({self.source}) raised {type(exc).__name__}: {first}"
                                f"{_raised_at(exc)}") from exc


def _raised_at(exc: BaseException) -> str:
    """Where a reward function's exception came from, for its one-line error (no traceback is printed for bad
    input): the deepest frame of the traceback outside this module, the installed packages and Python's own library,
    i.e. the user's code (else the deepest frame outside this module: a packaged reward's own line), as
    ` (at path:line in function)`, the path relative to the working dir; a comprehension's frame is named by the
    function around it. Never raises: without a place the line just ends."""
    try:
        import site
        import sysconfig
        import traceback

        here = Path(__file__).resolve()
        dirs = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
        dirs |= set(site.getsitepackages()) | {site.getusersitepackages()}
        libs = [Path(d).resolve() for d in dirs if d]
        frames = [(f, Path(f.filename).resolve()) for f in traceback.extract_tb(exc.__traceback__)]
        frames = [(f, p) for f, p in frames if p != here]
        if not frames:
            return ""
        own = [i for i, (_, p) in enumerate(frames) if not any(p.is_relative_to(lib) for lib in libs)]
        i = own[-1] if own else len(frames) - 1
        f, path = frames[i]
        name = f.name
        while name in ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>") and i and frames[i - 1][1] == path:
            i -= 1
            name = frames[i][0].name
        try:
            path = path.relative_to(Path.cwd().resolve())
        except ValueError:
            pass
        return f" (at {path}:{f.lineno} in {name})"
    except Exception:
        return ""


# --- built-in functions ------------------------------------------------------------------------------------
# A factory takes the reward name and the spec's kwargs (validated against its signature) and returns
# fn(prompts, completions, **columns) -> list[float]. Built once per run.


def _vader(name: str) -> RewardFn:
    """VADER compound sentiment of the completion, in [-1, 1] (Hutto & Gilbert 2014; lexicon ships in the package)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def vader(prompts, completions, /, **columns):
        return [analyzer.polarity_scores(c)["compound"] for c in completions]

    return vader


def _length(name: str, min_words: int = 8, max_words: int | None = None) -> RewardFn:
    """Word-count shaping; words = `completion.split()` (runs of whitespace), w = their number:

    - w < min_words:             w / min_words                    (0 for an empty completion)
    - min_words <= w <= max_words: 1.0
    - w > max_words (if set):    max(0, 1 - (w - max_words) / max_words)  (0 at 2 * max_words)
    """
    if not isinstance(min_words, int) or min_words < 1:
        raise PipelineError(f"reward `{name}`: kwargs.min_words must be an integer >= 1 (got {min_words!r})")
    if max_words is not None and (not isinstance(max_words, int) or max_words < min_words):
        raise PipelineError(f"reward `{name}`: kwargs.max_words must be an integer >= min_words={min_words} or null (got {max_words!r})")

    def length(prompts, completions, /, **columns):
        out = []
        for c in completions:
            w = len(c.split())
            if w < min_words:
                out.append(w / min_words)
            elif max_words is not None and w > max_words:
                out.append(max(0.0, 1.0 - (w - max_words) / max_words))
            else:
                out.append(1.0)
        return out

    return length


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def _regex(name: str, pattern: str, flags: str = "") -> RewardFn:
    """1.0 when `re.search(pattern, completion)` matches, else 0.0; `flags`: letters of i, m, s, x."""
    bits = 0
    for letter in flags:
        if letter not in _REGEX_FLAGS:
            raise PipelineError(f"reward `{name}`: kwargs.flags {flags!r} has unknown flag {letter!r}; use letters of {''.join(_REGEX_FLAGS)}")
        bits |= _REGEX_FLAGS[letter]
    try:
        rx = re.compile(pattern, bits)
    except (re.error, TypeError) as exc:
        raise PipelineError(f"reward `{name}`: kwargs.pattern {pattern!r} is not a valid regular expression ({exc})") from None

    def regex(prompts, completions, /, **columns):
        return [1.0 if rx.search(c) else 0.0 for c in completions]

    return regex


def _keywords(name: str, words: list[str]) -> RewardFn:
    """Fraction of `words` (deduplicated, case-insensitive) found in the completion as whole words or
    phrases: "great" counts in "Great film!" but not in "greatest"."""
    if isinstance(words, str) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise PipelineError(f"reward `{name}`: kwargs.words must be a non-empty list of words (got {words!r})")
    unique = list(dict.fromkeys(w.strip().lower() for w in words))
    patterns = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE) for w in unique]

    def keywords(prompts, completions, /, **columns):
        return [sum(1 for p in patterns if p.search(c)) / len(patterns) for c in completions]

    return keywords


_PUNCT = str.maketrans("", "", string.punctuation)


def _normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def _exact_match(name: str, column: str = "answer", normalize: bool = False) -> RewardFn:
    """1.0 when the stripped completion equals the row's reference (`column`, stripped), else 0.0.
    `normalize`: compare lowercased, without ASCII punctuation, whitespace runs collapsed. A row whose
    reference is None scores NaN (no reference: `score.on_invalid` decides)."""

    def exact_match(prompts, completions, /, **columns):
        if column not in columns:
            raise missing_column(name, f"needs the reference column `{column}`", columns)
        out = []
        for c, ref in zip(completions, columns[column], strict=True):
            if ref is None:
                out.append(math.nan)
                continue
            a, b = c.strip(), str(ref).strip()
            if normalize:
                a, b = _normalize(a), _normalize(b)
            out.append(1.0 if a == b else 0.0)
        return out

    exact_match.required = [column]
    return exact_match


BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "vader": _vader,
    "length": _length,
    "regex": _regex,
    "keywords": _keywords,
    "exact_match": _exact_match,
}


def _check_builtins() -> None:
    """Each factory's first parameter is the reward's name (its kwargs follow): a factory written without it would
    get the name as its first kwarg, silently (README "Extending")."""
    for key, factory in BUILTINS.items():
        first = next(iter(inspect.signature(factory).parameters), None)
        if first != "name":
            raise TypeError(f"built-in reward `{key}`: its factory's first parameter must be `name` (the reward's "
                            f"name), then its kwargs; got {first!r}")


_check_builtins()


def _build_builtin(spec: RewardSpec) -> RewardFn:
    factory = BUILTINS[spec.function]
    params = list(inspect.signature(factory).parameters.values())[1:]  # after `name`
    allowed = [p.name for p in params]
    unknown = [k for k in spec.kwargs if k not in allowed]
    if unknown:
        raise PipelineError(
            f"reward `{spec.name}`: unknown kwarg `{unknown[0]}` for built-in `{spec.function}`; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in spec.kwargs]
    if missing:
        raise PipelineError(f"reward `{spec.name}`: built-in `{spec.function}` needs kwargs.{missing[0]}")
    _check_kwarg_types(spec, factory)
    return factory(spec.name, **spec.kwargs)


def _check_kwarg_types(spec: RewardSpec, factory: Callable[..., RewardFn]) -> None:
    """A built-in's kwargs against its factory's annotations, strictly (`normalize: "no"` is not a bool, `min_words:
    true` not an int): YAML gives them typed, so a wrong type is a mistake to name, not a value to coerce."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    hints = typing.get_type_hints(factory)
    for key, value in spec.kwargs.items():
        try:
            TypeAdapter(hints.get(key, Any)).validate_python(value, strict=True)
        except ValidationError:
            hint = hints[key]
            want = hint.__name__ if type(hint) is type else str(hint).replace("typing.", "")
            raise PipelineError(f"reward `{spec.name}`: kwargs.{key} of built-in `{spec.function}` must be {want} "
                                f"(got {value!r})") from None


# --- user function -----------------------------------------------------------------------------------------


def _build_user_function(spec: RewardSpec) -> RewardFn:
    target = spec.function
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `python -m` puts the repo root first; a plain script may not
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        from stages.errors import queued_checkout

        # the module itself missing (or a package on its path, or a module of the checkout it imports: a queued
        # experiment's copy lacks what git does not track), not an installed package it imports
        parts = module_name.split(".")
        home = queued_checkout()
        top = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
        ours = bool(top) and (top == parts[0] or any((d / f"{top}.py").is_file() or (d / top).is_dir()
                                                     for d in (Path.cwd(), home) if d is not None))
        if not ours:  # found, and it raised while being imported: its own line, and what it lacks
            fix = (f"install `{top}` in this environment (pip install ...), or remove that import" if top
                   else "fix the module")
            raise PipelineError(f"reward `{spec.name}`: module `{module_name}` of '{target}' raised while it was "
                                f"imported: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                                f"{_raised_at(exc)}; {fix}") from exc
        what = "the module" if top == parts[0] else f"the module and `{top}`, which it imports,"
        raise PipelineError(
            f"reward `{spec.name}`: cannot import module `{module_name}` of '{target}' ({type(exc).__name__}: {exc}); "
            + (f"this is a queued DVC experiment, which runs in a copy of the git-tracked files only: `git add` {what} "
               "(and commit it) before queuing" if home is not None else
               "make it importable from the repo root (a .py file or package there, or on PYTHONPATH)")
        ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise PipelineError(f"reward `{spec.name}`: module `{module_name}` has no attribute `{attr}` ('{target}'); check the name")
    if not callable(fn):
        raise PipelineError(f"reward `{spec.name}`: '{target}' is a {type(fn).__name__}, not a function")
    kwargs = dict(spec.kwargs)
    as_text = bool(kwargs.pop("as_text", False))
    passed = [k for k in kwargs if k in PASSED_ARGUMENTS]
    if passed:  # it would replace the completions (or TRL's trainer_state ...) the function is called with
        raise PipelineError(f"reward `{spec.name}`: kwargs.{passed[0]} is an argument the pipeline passes itself "
                            f"({', '.join(PASSED_ARGUMENTS)}, as TRL does); rename that kwarg")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables have no signature: call them TRL's way
        sig = None
    params = sig.parameters if sig is not None else {}
    var_kw = sig is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
    trl_style = var_kw or "completions" in params
    if not trl_style:  # the older positional convention: fn(prompts, completions, **spec kwargs)
        try:
            sig.bind([], [], **kwargs)
        except TypeError as exc:
            raise PipelineError(
                f"reward `{spec.name}`: '{target}' takes neither `completions` nor **kwargs (TRL's convention), and "
                f"cannot be called as fn(prompts, completions, **kwargs) with kwargs {sorted(kwargs)} ({exc}); name its "
                "arguments as TRL does: def reward(completions, **kwargs)"
            ) from None
    unknown = [k for k in kwargs if not var_kw and k not in params]
    if trl_style and unknown:
        raise PipelineError(f"reward `{spec.name}`: '{target}' has no parameter `{unknown[0]}` (from kwargs); its "
                            f"parameters: {', '.join(params)}; fix the kwargs or add **kwargs to the function")
    is_async = inspect.iscoroutinefunction(fn)

    def call(*args, **kw):
        out = fn(*args, **kw)
        if is_async or inspect.isawaitable(out):
            import asyncio

            out = asyncio.run(out) if inspect.isawaitable(out) else out
        return out

    def user_function(prompts, completions, extras=None, /, completion_ids=None, messages=None, **columns):
        if not trl_style:
            return call(prompts, completions, **kwargs)
        conversational = messages is not None and not as_text
        args = {"prompts": list(messages) if conversational else prompts,
                "completions": [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions,
                "completion_ids": completion_ids, **columns,
                **(extras or TrlExtras.at(0, 0)).kwargs(), **kwargs}  # kwargs win over a same-named column
        missing = [n for n, p in params.items() if p.default is p.empty and n not in args
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # with **kwargs too: a named column it needs
        if missing:
            raise missing_column(spec.name, f"'{target}' needs `{missing[0]}`", columns)
        if not var_kw:
            args = {k: v for k, v in args.items() if k in params}
        return call(**args)

    # the columns it names without a default, checked against the prompts table when a run loads (check_columns)
    user_function.required = [n for n, p in params.items() if trl_style and p.default is p.empty and n not in kwargs
                              and n not in ("prompts", "completions", "completion_ids", "messages", *TRL_EXTRAS)
                              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return user_function


MISSING_COLUMN = "which the prompts table lacks"


def missing_column(name: str, what: str, columns) -> PipelineError:
    have = ", ".join(sorted(columns)) or "none"
    return PipelineError(f"reward `{name}`: {what}, {MISSING_COLUMN} (extra columns: {have}); add that column to "
                         "the prompts file or set it in kwargs")


def check_columns(rewards: Sequence[Reward], columns: Sequence[str]) -> None:
    """Every column a reward names (a user function's argument without a default, exact_match's reference column)
    is in the prompts table: checked when a run loads, before it moves a superseded run aside or samples."""
    for r in rewards:
        for need in getattr(r.fn, "required", ()):
            if need not in columns:
                what = (f"'{r.source.removeprefix('function ')}' needs `{need}`" if r.trl_style
                        else f"needs the reference column `{need}`")
                raise missing_column(r.name, what, columns)


# --- reward model ------------------------------------------------------------------------------------------


class ModelReward:
    """A local sequence-classification reward model, loaded once and scored in batches without grad.

    kwargs: `max_length` (tokens, default 512; longer texts lose their beginning, since the head reads the
    last token), `template` ("concat": prompt + completion, or "chat": the tokenizer's chat template over
    [user: prompt, assistant: completion]), `label_index` (read this logit of a multi-label classifier),
    `dtype` (float32 | bfloat16 | float16).

    Padding is on the right: positions of real tokens match an unpadded forward pass, and the model reads
    the last non-pad token (config.pad_token_id, set to the tokenizer's pad/eos), so scores do not depend
    on the batch size.
    """

    def __init__(self, name: str, path: str, device: Any = "cpu", batch_size: int = 16, max_length: int = 512,
                 template: str = "concat", label_index: int | None = None, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.name, self.path, self.batch_size = name, path, batch_size
        field = f"reward `{name}`"
        check_reward_model(name, path, template, label_index, dtype, max_length)
        self.label_index = label_index or 0

        tok = load_tokenizer(path, field)  # pad token = eos when missing
        if tok.pad_token_id is None:
            raise PipelineError(f"reward `{name}`: the tokenizer in {path} has neither a pad nor an eos token; add a pad_token")
        if template == "chat" and not getattr(tok, "chat_template", None):
            raise PipelineError(f"reward `{name}`: template 'chat' needs a chat template, and {path} has none; use template: concat")
        tok.padding_side = "right"
        tok.truncation_side = "left"
        self.tokenizer, self.template, self.max_length = tok, template, max_length

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True,
                                                                       trust_remote_code=False)
        except Exception as exc:
            from stages.models import _first_line

            raise PipelineError(f"reward `{name}`: cannot load {path} ({_first_line(exc)}); {RM_FIX}") from None
        # The head reads the last non-pad token; without a pad id it refuses batches > 1.
        model.config.pad_token_id = tok.pad_token_id
        model.config.get_text_config().pad_token_id = tok.pad_token_id
        self.model = model.to(self.device).eval()

    def texts(self, prompts: list[str], completions: list[str], messages: Sequence | None = None) -> list[str]:
        """The scored texts. "chat": a conversational prompt's own turns (system and earlier turns included, as the
        policy saw them and as TRL scores them) plus the completion; a text prompt as one user turn."""
        if self.template == "concat":
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        turns = messages if messages is not None else [None] * len(prompts)
        return [
            self.tokenizer.apply_chat_template(
                [*(m if m else [{"role": "user", "content": p}]), {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c, m in zip(prompts, completions, turns, strict=True)
        ]

    def __call__(self, prompts: list[str], completions: list[str], messages: Sequence | None = None) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        texts = self.texts(prompts, completions, messages)
        # Similar lengths together waste less padding; results go back to their rows.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [0.0] * len(texts)
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc=f"reward {self.name}", leave=False, disable=len(starts) < 2):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_length, add_special_tokens=self.template == "concat",  # chat text has them
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits  # (batch, num_labels)
            for i, v in zip(idx, logits[:, self.label_index].float().cpu().tolist()):
                out[i] = v
        return out


# --- building ----------------------------------------------------------------------------------------------


def build_reward(spec: RewardSpec, device: Any = "cpu", batch_size: int = 16) -> Reward:
    """One `Reward` from its spec (see the module docstring for the three kinds)."""
    if spec.model is not None:
        fn = ModelReward(spec.name, spec.model, device=device, batch_size=batch_size, **_model_kwargs(spec))
        source = f"model {spec.model}"
    elif spec.function in BUILTINS:
        fn, source = _build_builtin(spec), f"built-in {spec.function}"
    elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec.function):
        fn, source = _build_user_function(spec), f"function {spec.function}"
        log.info("reward `%s`: %s, weight %g", spec.name, source, spec.weight)
        return Reward(spec.name, spec.weight, fn, source, trl_style=True)
    else:
        raise PipelineError(
            f"reward `{spec.name}`: unknown function `{spec.function}`; use a built-in "
            f"({', '.join(BUILTINS)}) or your own as 'module:function' (e.g. my_rewards:score)"
        )
    log.info("reward `%s`: %s, weight %g", spec.name, source, spec.weight)
    return Reward(spec.name, spec.weight, fn, source)


RM_FIX = "point `model` at a local transformers ...ForSequenceClassification directory with one output"


RM_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_reward_model(name: str, path: str, template: str = "concat", label_index: int | None = None,
                       dtype: str = "float32", max_length: int = 512) -> None:
    """What a reward model's dir and kwargs must be, read from its config.json and file names (no weights loaded): for
    the score stage before it loads the model, and for `python -m stages.params` (`check_specs`, which also loads the
    tokenizer, as the score stage does next)."""
    if not Path(path).is_dir():
        raise PipelineError(f"reward `{name}`: model directory {path} does not exist; {RM_FIX}")
    if template not in ("concat", "chat"):
        raise PipelineError(f"reward `{name}`: kwargs.template must be 'concat' or 'chat' (got {template!r})")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise PipelineError(f"reward `{name}`: kwargs.dtype must be float32, bfloat16 or float16 (got {dtype!r})")
    if not isinstance(max_length, int) or max_length < 2:
        raise PipelineError(f"reward `{name}`: kwargs.max_length must be an integer >= 2 (got {max_length!r})")
    config = load_config(path, f"reward `{name}`")
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        what = f"a {archs[0]}" if archs else "a model without `architectures` in config.json"
        raise PipelineError(f"reward `{name}`: {path} is {what}, not a sequence classifier; {RM_FIX}")
    num_labels = config.num_labels
    if label_index is None and num_labels != 1:
        raise PipelineError(
            f"reward `{name}`: {path} has num_labels={num_labels}, but a reward model has one scalar output "
            "(num_labels == 1); use a reward model, or set kwargs.label_index to read one class logit"
        )
    if label_index is not None and not (isinstance(label_index, int) and 0 <= label_index < num_labels):
        raise PipelineError(f"reward `{name}`: kwargs.label_index must be in 0..{num_labels - 1} (got {label_index!r})")
    if not any((Path(path) / f).is_file() for f in RM_WEIGHTS):
        raise PipelineError(f"reward `{name}`: {path} has no weights ({', '.join(RM_WEIGHTS)}); {RM_FIX}")


def _model_kwargs(spec: RewardSpec) -> dict[str, Any]:
    allowed = ("max_length", "template", "label_index", "dtype")
    unknown = [k for k in spec.kwargs if k not in allowed]
    if unknown:
        raise PipelineError(f"reward `{spec.name}`: unknown kwarg `{unknown[0]}` for a reward model; allowed: {', '.join(allowed)}")
    return dict(spec.kwargs)


def check_specs(specs: Sequence[RewardSpec], columns: Sequence[str] | None = None) -> None:
    """What `build_rewards` would refuse, without loading a model or logging: a built-in's kwargs, a user function
    importable and callable with its kwargs, a reward model dir whose config, kwargs, weights file and tokenizer the
    score stage accepts (for `python -m stages.params`); with
    `columns` (the prompts table's extra columns), also a column a reward names that the table lacks."""
    from stages.models import check_model_dir

    for spec in specs:
        if spec.model is not None:
            check_model_dir(spec.model, f"score.rewards[{spec.name}].model")
            check_reward_model(spec.name, spec.model, **_model_kwargs(spec))
            load_tokenizer(spec.model, f"reward `{spec.name}`")  # every family names its vocabulary files its own way
            continue
        if spec.function in BUILTINS:
            reward = Reward(spec.name, spec.weight, _build_builtin(spec), f"built-in {spec.function}")
        elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec.function):
            reward = Reward(spec.name, spec.weight, _build_user_function(spec), f"function {spec.function}", True)
        else:
            build_reward(spec)  # its one-line error for an unknown function
            continue
        if columns is not None:
            check_columns([reward], columns)


def build_rewards(specs: Sequence[RewardSpec], device: Any = "cpu", batch_size: int = 16) -> list[Reward]:
    """All reward components of `score.rewards`, built once (models loaded once) and called every round."""
    return [build_reward(s, device=device, batch_size=batch_size) for s in specs]


# --- checking and combining --------------------------------------------------------------------------------


def check_scores(name: str, values: Any, n: int, keys: Sequence[Key]) -> np.ma.MaskedArray:
    """A reward's output as a float64 masked array of length n: a list/tuple/array/tensor/generator of real numbers or None
    (None is masked: the reward does not apply to that completion, TRL's convention). Wrong count or a non-number
    raises PipelineError; NaN/inf are returned as they are, for `first_invalid` and `score.on_invalid`."""
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().float().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise PipelineError(f"reward `{name}` returned an array of shape {values.shape}; return one number per completion (a flat list)")
        if values.dtype.kind in "biuf":
            arr = values.astype(np.float64)
            if len(arr) != n:
                raise PipelineError(f"reward `{name}` returned {len(arr)} values for {n} completions; return one number per completion, in order")
            return np.ma.MaskedArray(arr, mask=np.zeros(n, dtype=bool))
        values = values.tolist()
    if isinstance(values, Iterator):  # a generator: TRL iterates what a reward returns
        values = list(values)
    if isinstance(values, (str, bytes, Mapping)) or not (hasattr(values, "__len__") and hasattr(values, "__iter__")):
        raise PipelineError(f"reward `{name}` returned a {type(values).__name__}; return a list of {n} numbers, one per completion")
    values = list(values)
    if len(values) != n:
        raise PipelineError(f"reward `{name}` returned {len(values)} values for {n} completions; return one number per completion, in order")
    arr = np.zeros(n, dtype=np.float64)
    missing = np.zeros(n, dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            missing[i] = True
        elif isinstance(v, numbers.Real):  # int, float, bool, numpy scalars
            arr[i] = float(v)
        else:
            pid, k = keys[i]
            raise PipelineError(
                f"reward `{name}` returned {v!r} ({type(v).__name__}) for prompt_id={pid} sample_idx={k}; "
                "return real numbers (or None where the reward does not apply)"
            )
    return np.ma.MaskedArray(arr, mask=missing)


def invalid(values: np.ndarray) -> np.ndarray:
    """Rows whose value is NaN/inf (a value None left out is not invalid)."""
    data = np.ma.getdata(values)
    return ~np.isfinite(data) & ~np.ma.getmaskarray(values)


def first_invalid(values: np.ndarray, keys: Sequence[Key]) -> Key | None:
    """The key of the first NaN/inf value, or None when all are finite (or None)."""
    bad = np.flatnonzero(invalid(values))
    return tuple(keys[bad[0]]) if len(bad) else None


def invalid_rows(components: Mapping[str, np.ndarray], keys: Sequence[Key], on_invalid: str, row: str,
                 drop_does: str) -> np.ndarray:
    """`score.on_invalid` over every component: rows any component gave NaN/inf. `error` stops at a component's first
    such row, naming it (`row`, formatted with `pid` and `idx`); `drop` returns them (a bool mask) for the caller to
    leave out. `drop_does` says what the drop would do here."""
    rows = np.zeros(len(keys), dtype=bool)
    for name, values in components.items():
        bad = first_invalid(values, keys)
        if bad is None:
            continue
        if on_invalid == "error":
            raise PipelineError(f"reward `{name}` gave NaN/inf for {row.format(pid=bad[0], idx=bad[1])}; fix the "
                                f"reward or set score.on_invalid: drop to {drop_does}")
        rows |= invalid(values)
    return rows


def compute_rewards(rewards: Sequence[Reward], prompts: list[str], completions: list[str], keys: Sequence[Key],
                    extras: TrlExtras | None = None, /, completion_ids: Sequence | None = None,
                    messages: Sequence | None = None, **columns: Sequence[Any]) -> dict[str, np.ma.MaskedArray]:
    """Call every reward on the same rows and check its output: name -> masked float64 array (may hold NaN/inf;
    masked where the reward returned None). `messages`: the chat turns, when the prompts are conversational;
    `extras`: TRL's trainer_state/log_metric/log_extra for user functions (a fresh one, step 0, when None)."""
    extras = extras if extras is not None else TrlExtras.at(0, 0)  # evaluation: TRL's default TrainerState
    out = {r.name: check_scores(r.name, r(prompts, completions, extras, completion_ids=completion_ids, messages=messages, **columns),
                                len(completions), keys) for r in rewards}
    for column, values in extras.extra.items():
        if len(values) != len(completions):
            raise PipelineError(f"log_extra('{column}') got {len(values)} values for {len(completions)} completions; "
                                "log one value per completion, in order")
    return out


def combine(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The task reward: score = sum_i w_i * r_i over the components; a component that returned None for a row is left
    out of that row's sum (TRL); NaN in any component stays NaN. A row that every component returned None for is
    NaN too: unscorable, as TRL 1.16's RLOOTrainer has it (the score stage writes it null, left out of its prompt's
    baseline with advantage 0; the evaluation leaves its prompt out), not a reward of 0 that no reward gave."""
    if not components:
        raise ValueError("combine: no reward components")
    if set(components) != set(weights):
        raise ValueError(f"combine: components {sorted(components)} and weights {sorted(weights)} differ")
    total = np.zeros(len(next(iter(components.values()))), dtype=np.float64)
    for n, r in components.items():
        total += weights[n] * np.ma.filled(np.ma.asarray(r, dtype=np.float64), 0.0)
    total[unscored_rows(components)] = np.nan
    return total


def unscored_rows(components: Mapping[str, np.ndarray]) -> np.ndarray:
    """The rows every component returned None for (masked in all): no reward applied to them (`combine`'s NaN)."""
    return np.logical_and.reduce([np.ma.getmaskarray(r) for r in components.values()])

"""Reward interface: built-ins checked by hand, a tiny reward model against a direct forward pass,
a user's module:function, output checks and the weighted sum. Nothing is downloaded."""

from __future__ import annotations

import math
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from stages.errors import PipelineError
from stages.params import RewardSpec
from stages.rewards import (
    BUILTINS,
    Reward,
    build_reward,
    build_rewards,
    check_scores,
    combine,
    compute_rewards,
    first_invalid,
)

SENTENCES = [
    "the movie was great and the acting was wonderful",
    "a dull film with a terrible plot",
    "i loved every minute of it",
    "the story is slow but the ending is good",
]
CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"


def keys(n: int) -> list[tuple[str, int]]:
    return [(f"p{i // 2}", i % 2) for i in range(n)]


def score(spec: dict, completions: list[str], prompts: list[str] | None = None, **columns) -> list[float]:
    reward = build_reward(RewardSpec(name="r", **spec))
    prompts = prompts or [""] * len(completions)
    return list(check_scores("r", reward(prompts, completions, **columns), len(completions), keys(len(completions))))


# --- built-ins ---------------------------------------------------------------------------------------------


def test_builtins_listed():
    assert set(BUILTINS) == {"vader", "length", "regex", "keywords", "exact_match"}  # a new built-in: add it here


def test_a_built_in_s_kwargs_are_checked_against_its_factory_s_types(monkeypatch):
    """YAML gives kwargs typed: a wrong type is named in one line (`normalize: "no"` counted as true before), and a
    factory whose first parameter is not the reward's name stops the import (it got the name as a kwarg)."""
    import stages.rewards as rewards

    for function, kwargs, want in (
            ("exact_match", {"normalize": "no"}, "kwargs.normalize of built-in `exact_match` must be bool (got 'no')"),
            ("length", {"min_words": True}, "kwargs.min_words of built-in `length` must be int (got True)"),
            ("length", {"max_words": 3.5}, "kwargs.max_words of built-in `length` must be int | None (got 3.5)"),
            ("keywords", {"words": "film"}, "kwargs.words of built-in `keywords` must be list[str] (got 'film')")):
        with pytest.raises(PipelineError) as exc:
            build_rewards([RewardSpec(name="x", function=function, kwargs=kwargs)])
        assert str(exc.value) == f"reward `x`: {want}"
    for function, kwargs in (("length", {"max_words": None, "min_words": 2}), ("keywords", {"words": ["a"]}),
                             ("exact_match", {"normalize": True, "column": "answer"}), ("regex", {"pattern": "a"})):
        build_rewards([RewardSpec(name="x", function=function, kwargs=kwargs)])  # the right types pass
    monkeypatch.setitem(BUILTINS, "contains", lambda word="film": None)
    with pytest.raises(TypeError, match=r"^built-in reward `contains`: its factory's first parameter must be `name`"):
        rewards._check_builtins()


def test_vader_matches_the_analyzer():
    texts = ["This movie is wonderful, I loved it and the cast is great!", "A horrible, boring, awful waste of time.", "It is a movie."]
    got = score({"function": "vader"}, texts)
    analyzer = SentimentIntensityAnalyzer()
    assert got == [analyzer.polarity_scores(t)["compound"] for t in texts]
    assert got[0] > 0.5 and got[1] < -0.5 and -1 <= got[2] <= 1


def test_length():
    texts = ["", "one two", "one  two\nthree four", " ".join(["w"] * 8), " ".join(["w"] * 12), " ".join(["w"] * 20)]
    assert score({"function": "length", "kwargs": {"min_words": 4}}, texts) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    got = score({"function": "length", "kwargs": {"min_words": 4, "max_words": 6}}, texts)
    assert got == pytest.approx([0.0, 0.5, 1.0, 1 - 2 / 6, 0.0, 0.0])
    assert score({"function": "length"}, ["a b c d", " ".join(["w"] * 9)]) == [0.5, 1.0]  # default min_words 8
    with pytest.raises(PipelineError, match=r"reward `r`: kwargs.max_words"):
        score({"function": "length", "kwargs": {"min_words": 4, "max_words": 2}}, ["x"])


def test_regex():
    texts = ["The end.", "the end", "no match here"]
    assert score({"function": "regex", "kwargs": {"pattern": r"^The\b"}}, texts) == [1.0, 0.0, 0.0]
    assert score({"function": "regex", "kwargs": {"pattern": r"^The\b", "flags": "i"}}, texts) == [1.0, 1.0, 0.0]
    with pytest.raises(PipelineError, match=r"reward `r`: kwargs.pattern '\(' is not a valid regular expression"):
        score({"function": "regex", "kwargs": {"pattern": "("}}, texts)
    with pytest.raises(PipelineError, match=r"unknown flag 'q'"):
        score({"function": "regex", "kwargs": {"pattern": "a", "flags": "q"}}, texts)
    with pytest.raises(PipelineError, match=r"reward `r`: built-in `regex` needs kwargs.pattern"):
        score({"function": "regex"}, texts)


def test_keywords():
    words = ["great", "Fun", "must see", "great"]  # the duplicate counts once
    texts = ["A GREAT, fun film.", "the greatest funfair", "Must  see? must see! Great fun", ""]
    assert score({"function": "keywords", "kwargs": {"words": words}}, texts) == pytest.approx([2 / 3, 0.0, 1.0, 0.0])
    with pytest.raises(PipelineError, match=r"kwargs.words of built-in `keywords` must be list\[str\] \(got 'great'\)"):
        score({"function": "keywords", "kwargs": {"words": "great"}}, texts)
    for bad in ([], ["great", " "]):
        with pytest.raises(PipelineError, match=r"kwargs.words must be a non-empty list"):
            score({"function": "keywords", "kwargs": {"words": bad}}, texts)


def test_exact_match():
    completions = [" 42 ", "Paris.", "paris", "7"]
    answers = ["42", "paris", "Paris", None]
    got = score({"function": "exact_match"}, completions, answer=answers)
    assert got[:3] == [1.0, 0.0, 0.0] and math.isnan(got[3])  # no reference: NaN, on_invalid decides
    got = score({"function": "exact_match", "kwargs": {"normalize": True, "column": "gold"}}, completions, gold=answers)
    assert got[:3] == [1.0, 1.0, 1.0]
    with pytest.raises(PipelineError, match=r"reward `r`: needs the reference column `gold`.*\(extra columns: answer\)"):
        score({"function": "exact_match", "kwargs": {"column": "gold"}}, completions, answer=answers)


def test_unknown_builtin_kwarg_lists_the_allowed_ones():
    with pytest.raises(PipelineError, match=r"unknown kwarg `min_word` for built-in `length`; allowed: min_words, max_words"):
        score({"function": "length", "kwargs": {"min_word": 3}}, ["x"])


def test_unknown_name_lists_builtins_and_module_form():
    with pytest.raises(PipelineError) as exc:
        build_reward(RewardSpec(name="s", function="vadr"))
    msg = str(exc.value)
    assert "reward `s`: unknown function `vadr`" in msg and "module:function" in msg
    assert all(name in msg for name in BUILTINS)


# --- reward model ------------------------------------------------------------------------------------------


def _tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    words = sorted({w for s in SENTENCES for w in s.split()} | {"<user>", "<assistant>"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")  # no pad token
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _save_model(path, cls=LlamaForSequenceClassification, num_labels=1, chat_template=None):
    tok = _tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=128, num_labels=num_labels, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = cls(config)
    if hasattr(model, "score"):
        with torch.no_grad():
            model.score.weight.normal_(0, 1)  # default init gives ~0.01 logits; make differences visible
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("rm"), chat_template=CHAT)


def _direct(path, texts, label=0, add_special_tokens=True):
    """One unpadded forward pass per text: the reference the batched scorer must reproduce."""
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", add_special_tokens=add_special_tokens)
            out.append(model(**enc).logits[0, label].item())
    return out


PROMPTS = ["the movie was", "a dull", "i loved", "the story is slow but", "the", "the ending"]
COMPLETIONS = [" great and wonderful", " film", " every minute of it and the acting was great", " good", " plot", " is good"]


def test_model_batches_match_direct_forward(rm_dir):
    want = _direct(rm_dir, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    assert len(set(np.round(want, 4))) == len(want)  # the texts really score differently
    for batch_size in (1, 2, 4, 16):
        reward = build_reward(RewardSpec(name="rm", model=str(rm_dir)), batch_size=batch_size)
        got = check_scores("rm", reward(PROMPTS, COMPLETIONS), len(PROMPTS), keys(len(PROMPTS)))
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_model_chat_template(rm_dir):
    reward = build_reward(RewardSpec(name="rm", model=str(rm_dir), kwargs={"template": "chat"}), batch_size=4)
    rendered = [f"<user> {p} <assistant> {c} " for p, c in zip(PROMPTS, COMPLETIONS)]
    want = _direct(rm_dir, rendered, add_special_tokens=False)
    np.testing.assert_allclose(reward(PROMPTS, COMPLETIONS), want, atol=1e-4)


def test_model_chat_template_scores_a_conversation_with_all_its_turns(rm_dir):
    """A conversational prompt is scored as the policy saw it (TRL scores prompt + completion messages): its system
    and earlier turns too, not only the last user turn."""
    reward = build_reward(RewardSpec(name="rm", model=str(rm_dir), kwargs={"template": "chat"}), batch_size=4)
    turns = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": p}] for p in PROMPTS]
    rendered = [f"<system> be kind <user> {p} <assistant> {c} " for p, c in zip(PROMPTS, COMPLETIONS)]
    want = _direct(rm_dir, rendered, add_special_tokens=False)
    np.testing.assert_allclose(reward(PROMPTS, COMPLETIONS, messages=turns), want, atol=1e-4)
    assert not np.allclose(reward(PROMPTS, COMPLETIONS), want, atol=1e-4)  # the system turn changes the score


def test_columns_may_have_the_names_of_internal_parameters():
    """The reward call's own positional names (prompts, completions, keys, rewards, self) do not clash with a prompts
    table column of that name: it reaches the functions as a column."""
    reward = build_reward(RewardSpec(name="em", function="exact_match", kwargs={"column": "keys"}))
    parts = compute_rewards([reward], ["q"] * 2, ["a", "b"], keys(2), None, keys=["a", "c"], rewards=[1, 2], self=[0, 0])
    assert parts["em"].tolist() == [1.0, 0.0]


def test_a_weight_must_be_finite():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            RewardSpec(name="a", function="vader", weight=bad)


def test_model_truncation_keeps_the_end(rm_dir):
    reward = build_reward(RewardSpec(name="rm", model=str(rm_dir), kwargs={"max_length": 3}), batch_size=2)
    want = _direct(rm_dir, ["loved every minute"])  # the last 3 words of the text
    np.testing.assert_allclose(reward(["i"], [" loved every minute"]), want, atol=1e-4)


def test_two_label_classifier_rejected_unless_label_index(tmp_path):
    path = _save_model(tmp_path / "clf", num_labels=2)
    with pytest.raises(PipelineError, match=r"reward `clf`: .*clf has num_labels=2.*one scalar output.*kwargs.label_index"):
        build_reward(RewardSpec(name="clf", model=str(path)))
    reward = build_reward(RewardSpec(name="clf", model=str(path), kwargs={"label_index": 1}), batch_size=2)
    want = _direct(path, [p + c for p, c in zip(PROMPTS, COMPLETIONS)], label=1)
    np.testing.assert_allclose(reward(PROMPTS, COMPLETIONS), want, atol=1e-4)
    with pytest.raises(PipelineError, match=r"kwargs.label_index must be in 0..1"):
        build_reward(RewardSpec(name="clf", model=str(path), kwargs={"label_index": 2}))


def test_causal_lm_rejected(tmp_path):
    path = _save_model(tmp_path / "lm", cls=LlamaForCausalLM)
    with pytest.raises(PipelineError, match=r"reward `rm`: .*lm is a LlamaForCausalLM, not a sequence classifier; point `model` at"):
        build_reward(RewardSpec(name="rm", model=str(path)))


def test_a_reward_model_whose_weights_do_not_load_is_one_line(tmp_path):
    path = _save_model(tmp_path / "rm")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PipelineError, match=r"^reward `rm`: cannot load .*rm \(.*\); point `model` at a local "
                                            r"transformers ...ForSequenceClassification directory with one output$"):
        build_reward(RewardSpec(name="rm", model=str(path)))


def test_missing_model_dir_rejected(tmp_path):
    with pytest.raises(PipelineError, match=r"reward `rm`: model directory .*nowhere does not exist; point `model` at"):
        build_reward(RewardSpec(name="rm", model=str(tmp_path / "nowhere")))


def test_the_params_check_refuses_what_the_score_stage_would_refuse_of_a_reward_model(tmp_path, rm_dir):
    """`python -m stages.params` (check_specs) reads a reward model's config: a 2-label classifier without
    label_index, a causal LM, a template that is not one, passed it, and the run failed at its first scoring."""
    from stages.rewards import check_specs

    clf, lm = _save_model(tmp_path / "clf", num_labels=2), _save_model(tmp_path / "lm", cls=LlamaForCausalLM)
    for spec, says in [(RewardSpec(name="clf", model=str(clf)), "has num_labels=2"),
                       (RewardSpec(name="rm", model=str(lm)), "is a LlamaForCausalLM, not a sequence classifier"),
                       (RewardSpec(name="rm", model=str(rm_dir), kwargs={"template": "chatml"}),
                        "kwargs.template must be 'concat' or 'chat' (got 'chatml')")]:
        with pytest.raises(PipelineError, match=re.escape(says)):
            check_specs([spec])
    check_specs([RewardSpec(name="clf", model=str(clf), kwargs={"label_index": 1}),
                 RewardSpec(name="rm", model=str(rm_dir), kwargs={"template": "chat"})])


def test_unknown_model_kwarg(rm_dir):
    with pytest.raises(PipelineError, match=r"unknown kwarg `max_len` for a reward model; allowed: max_length"):
        build_reward(RewardSpec(name="rm", model=str(rm_dir), kwargs={"max_len": 8}))


def test_a_reward_model_dir_without_weights_or_tokenizer_is_refused_by_the_params_check(rm_dir, tmp_path):
    """`python -m stages.params` (check_specs) says what the run would meet loading the dir: no weights, or no
    tokenizer files, each one line naming the dir and the fix, before any model loads."""
    import shutil

    from stages.rewards import check_specs

    check_specs([RewardSpec(name="rm", model=str(rm_dir))])  # the whole dir passes
    for lacking, said, fix in (("model.safetensors", "{d} has no weights (model.safetensors, ", "point `model` at"),
                               ("tokenizer.json", "cannot load a tokenizer from {d} (", "copy the model's tokenizer")):
        d = tmp_path / lacking
        shutil.copytree(rm_dir, d)
        (d / lacking).unlink()
        with pytest.raises(PipelineError, match=rf"^reward `rm`: {re.escape(said.format(d=d))}.*; {re.escape(fix)}"):
            check_specs([RewardSpec(name="rm", model=str(d))])


# --- user function -----------------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_t.py").write_text(textwrap.dedent("""
        def plain(prompts, completions, bonus=0.0):
            return [len(c) + bonus for c in completions]

        def with_columns(prompts, completions, **kwargs):
            return [float(c == a) * kwargs["scale"] for c, a in zip(completions, kwargs["answer"])]

        def boom(prompts, completions):
            raise ValueError("bad row 3\\nsecond line")

        def short(prompts, completions):
            return [1.0]

        def positional(ps, cs):  # the older form, other names: called positionally
            return [float(len(c)) for c in cs]

        NOT_A_FUNCTION = 3

        def in_a_library(prompts, completions):
            import json
            return [json.loads(c) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_t", raising=False)  # this test's file, not an earlier test's (gone)
    return "my_rewards_t"


def test_user_function_gets_its_kwargs(user_module):
    reward = build_reward(RewardSpec(name="u", function=f"{user_module}:plain", kwargs={"bonus": 0.5}))
    assert isinstance(reward, Reward) and reward.weight == 1.0
    assert reward(["p", "q"], ["ab", ""], answer=["x", "y"]) == [2.5, 0.5]  # columns not passed: no **kwargs


def test_user_function_with_var_kwargs_gets_columns(user_module):
    reward = build_reward(RewardSpec(name="u", function=f"{user_module}:with_columns", kwargs={"scale": 2.0}))
    assert reward(["p", "q"], ["x", "z"], answer=["x", "y"]) == [2.0, 0.0]


@pytest.mark.parametrize("name", ["completions", "prompts", "completion_ids", "trainer_state", "log_metric",
                                  "log_extra"])
def test_a_kwarg_named_like_an_argument_the_pipeline_passes_is_refused(user_module, name):
    """A `kwargs` key named like one of TRL's reward arguments would replace what the function is called with (the
    completions themselves): refused when the reward is built, naming the key, not blamed on the function later."""
    with pytest.raises(PipelineError, match=rf"^reward `u`: kwargs\.{name} is an argument the pipeline passes itself "
                                            r"\(prompts, completions, .*\); rename that kwarg$"):
        build_reward(RewardSpec(name="u", function=f"{user_module}:with_columns", kwargs={name: 3}))


def test_a_queued_dvc_experiment_is_told_to_git_add_its_reward_module(tmp_path, monkeypatch):
    """DVC runs a queued experiment in a copy of the git-tracked files (.dvc/tmp/exps/...): a module not added to git
    is not there, and "make it importable from the repo root" would send the user to a file that is there."""
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpq1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(PipelineError) as exc:
        build_reward(RewardSpec(name="u", function="not_added_mod:f"))
    assert str(exc.value).endswith("this is a queued DVC experiment, which runs in a copy of the git-tracked files "
                                   "only: `git add` the module (and commit it) before queuing")
    (copy / "needs_a_package.py").write_text("import not_installed_pkg\n\ndef f(completions, **kw):\n    return []\n")
    with pytest.raises(PipelineError) as exc:  # a package it imports: no git add, and it was found
        build_reward(RewardSpec(name="u", function="needs_a_package:f"))
    assert str(exc.value) == ("reward `u`: module `needs_a_package` of 'needs_a_package:f' raised while it was imported: "
                              "ModuleNotFoundError: No module named 'not_installed_pkg' (at needs_a_package.py:1 in "
                              "<module>); install `not_installed_pkg` in this environment (pip install ...), or remove "
                              "that import")
    # a module of the checkout's that the reward module imports, not added to git: in the checkout, not in the copy
    (tmp_path / "reward_utils_t.py").write_text("X = 1\n")
    (copy / "uses_a_helper.py").write_text("import reward_utils_t\n\ndef f(completions, **kw):\n    return []\n")
    with pytest.raises(PipelineError) as exc:
        build_reward(RewardSpec(name="u", function="uses_a_helper:f"))
    assert str(exc.value).endswith("only: `git add` the module and `reward_utils_t`, which it imports, (and commit it) "
                                   "before queuing"), str(exc.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="make it importable from the repo root"):
        build_reward(RewardSpec(name="u", function="not_added_mod:f"))


def test_a_reward_module_that_raises_on_import_is_named_with_its_line(tmp_path, monkeypatch):
    """Found, but it raised while being imported: its own line and exception, not "make it importable"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "raises_on_import.py").write_text("import math\n\nX = 1 / 0\n\ndef f(completions, **kw):\n    return []\n")
    with pytest.raises(PipelineError) as exc:
        build_reward(RewardSpec(name="u", function="raises_on_import:f"))
    assert str(exc.value) == ("reward `u`: module `raises_on_import` of 'raises_on_import:f' raised while it was "
                              "imported: ZeroDivisionError: division by zero (at raises_on_import.py:3 in <module>); "
                              "fix the module")


def test_user_function_errors(user_module):
    with pytest.raises(PipelineError, match=r"reward `u`: cannot import module `no_such_mod` of 'no_such_mod:f'"):
        build_reward(RewardSpec(name="u", function="no_such_mod:f"))
    with pytest.raises(PipelineError, match=rf"reward `u`: module `{user_module}` has no attribute `nope` \('{user_module}:nope'\)"):
        build_reward(RewardSpec(name="u", function=f"{user_module}:nope"))
    with pytest.raises(PipelineError, match=r"is a int, not a function"):
        build_reward(RewardSpec(name="u", function=f"{user_module}:NOT_A_FUNCTION"))
    with pytest.raises(PipelineError, match=r"has no parameter `bonnus` \(from kwargs\); its parameters: prompts, completions, bonus"):
        build_reward(RewardSpec(name="u", function=f"{user_module}:plain", kwargs={"bonnus": 1}))
    with pytest.raises(PipelineError, match=r"takes neither `completions` nor \*\*kwargs .* with kwargs \['x'\]"):
        build_reward(RewardSpec(name="u", function=f"{user_module}:positional", kwargs={"x": 1}))


def test_raising_function_names_reward_first_line_and_where(user_module, monkeypatch):
    """One line (no traceback for a reward's error), with where in the user's code it was raised: the deepest frame
    outside Python's library and the installed packages, relative to the working dir."""
    import importlib

    monkeypatch.chdir(importlib.import_module(user_module).__file__.rpartition("/")[0])  # the file as imported
    reward = build_reward(RewardSpec(name="boom", function=f"{user_module}:boom"))
    with pytest.raises(PipelineError) as exc:
        reward(["p"], ["c"])
    assert str(exc.value) == (f"reward `boom` (function {user_module}:boom) raised ValueError: bad row 3 "
                              f"(at {user_module}.py:9 in boom)")
    reward = build_reward(RewardSpec(name="lib", function=f"{user_module}:in_a_library"))
    with pytest.raises(PipelineError) as exc:
        reward(["p"], ["{"])
    assert str(exc.value).startswith(f"reward `lib` (function {user_module}:in_a_library) raised JSONDecodeError: ")
    # the user's line, not json's, named by its function (a list comprehension is a frame of its own before 3.12)
    assert str(exc.value).endswith(f" (at {user_module}.py:21 in in_a_library)"), str(exc.value)


def test_a_packaged_reward_s_error_points_at_its_package_not_the_pipeline(tmp_path, monkeypatch):
    """A reward from an installed package (TRL's, say) has no user frame: the line points at the package's own
    line, never at this pipeline's wrapper around the call."""
    import site

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "pkg_reward_t.py").write_text("def score(completions, **kwargs):\n    return [c['content'] for c in completions]\n")
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.delitem(sys.modules, "pkg_reward_t", raising=False)
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(lib)])
    reward = build_reward(RewardSpec(name="pkg", function="pkg_reward_t:score"))
    with pytest.raises(PipelineError) as exc:
        reward(["p"], ["text"])
    assert "stages/rewards.py" not in str(exc.value) and "raised TypeError" in str(exc.value)
    assert re.search(r"\(at \S*pkg_reward_t\.py:2 in (score|<listcomp>)\)$", str(exc.value)), str(exc.value)


# --- checks and combination --------------------------------------------------------------------------------


def test_wrong_count(user_module):
    reward = build_reward(RewardSpec(name="x", function=f"{user_module}:short"))
    with pytest.raises(PipelineError, match=r"^reward `x` returned 1 values for 3 completions"):
        compute_rewards([reward], ["a"] * 3, ["b"] * 3, keys(3))
    with pytest.raises(PipelineError, match=r"^reward `x` returned 5 values for 8 completions"):
        check_scores("x", np.zeros(5), 8, keys(8))


def test_non_numeric_names_the_row():
    with pytest.raises(PipelineError, match=r"reward `x` returned 'high' \(str\) for prompt_id=p1 sample_idx=0"):
        check_scores("x", [1.0, 2, "high", 0.5], 4, keys(4))
    with pytest.raises(PipelineError, match=r"reward `x` returned a float; return a list of 2 numbers"):
        check_scores("x", 1.0, 2, keys(2))
    with pytest.raises(PipelineError, match=r"reward `x` returned a str"):
        check_scores("x", "ab", 2, keys(2))


def test_check_scores_accepts_lists_arrays_tensors_generators_and_none():
    for values in ([1, 2.5, True], np.array([1, 2.5, 1.0], dtype=np.float32), torch.tensor([1.0, 2.5, 1.0]),
                   (1, 2.5, np.float32(1)), (v for v in [1, 2.5, 1.0])):  # TRL iterates a generator too
        got = check_scores("x", values, 3, keys(3))
        assert got.dtype == np.float64 and got.tolist() == [1.0, 2.5, 1.0]
    got = check_scores("x", [1.0, None], 2, keys(2))
    assert math.isnan(got[1])


def test_first_invalid_names_the_key():
    k = keys(6)
    assert first_invalid(np.array([0.0, 1.0, -2.0, 3.0, 4.0, 5.0]), k) is None
    assert first_invalid(np.array([0.0, 1.0, 2.0, np.nan, np.inf, 5.0]), k) == ("p1", 1)
    assert first_invalid(check_scores("x", [0.0, 1.0, 2.0, 3.0, -np.inf, None], 6, k), k) == ("p2", 0)


def test_combine_is_the_weighted_sum():
    parts = {"a": np.array([1.0, -1.0, 0.5]), "b": np.array([0.0, 2.0, 4.0])}
    got = combine(parts, {"a": 1.0, "b": 0.25})
    want = [sum(w * parts[n][i] for n, w in (("a", 1.0), ("b", 0.25))) for i in range(3)]  # score = sum_i w_i r_i
    np.testing.assert_allclose(got, want)
    assert got.dtype == np.float64
    assert np.isnan(combine({"a": np.array([np.nan, 1.0])}, {"a": 0.0})[0])  # NaN stays visible
    # None (masked) is left out of a row's sum; a row no reward applied to is NaN (unscored, TRL 1.16), not 0
    got = combine({"a": np.ma.masked_array([1.0, 2.0, 3.0], mask=[True, False, True]),
                   "b": np.ma.masked_array([4.0, 5.0, 6.0], mask=[False, True, True])}, {"a": 1.0, "b": 0.5})
    assert got[:2].tolist() == [2.0, 2.0] and np.isnan(got[2])
    with pytest.raises(ValueError):
        combine(parts, {"a": 1.0})


def test_build_rewards_end_to_end(rm_dir, user_module):
    specs = [
        RewardSpec(name="sentiment", function="vader", weight=1.0),
        RewardSpec(name="length", function="length", weight=0.2, kwargs={"min_words": 8}),
        RewardSpec(name="rm", model=str(rm_dir), weight=0.5),
        RewardSpec(name="mine", function=f"{user_module}:plain", weight=-0.01),
    ]
    rewards = build_rewards(specs, device="cpu", batch_size=4)
    assert [r.name for r in rewards] == ["sentiment", "length", "rm", "mine"]
    parts = compute_rewards(rewards, PROMPTS, COMPLETIONS, keys(len(PROMPTS)), answer=["x"] * len(PROMPTS))
    assert all(v.shape == (len(PROMPTS),) and first_invalid(v, keys(len(PROMPTS))) is None for v in parts.values())
    total = combine(parts, {r.name: r.weight for r in rewards})
    np.testing.assert_allclose(total, sum(r.weight * parts[r.name] for r in rewards))

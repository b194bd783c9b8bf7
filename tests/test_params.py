"""stages.params: the repo's params.yaml, one-line errors for every kind of bad value, hash/flat, and the CLIs."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.errors import EXIT_BAD_INPUT, PipelineError
from stages.params import (
    BUILTIN_MODEL,
    AdvantageParams,
    Params,
    SampleParams,
    UpdateParams,
    load_params,
    parse_params,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


@pytest.fixture
def data(raw) -> dict:
    """A fresh, mutable copy of the repo's params.yaml mapping."""
    return copy.deepcopy(raw)


def error_of(data, source: str = "p.yaml") -> str:
    with pytest.raises(PipelineError) as exc:
        parse_params(data, source)
    msg = str(exc.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    assert msg.startswith(f"{source}: "), msg
    return msg


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the repo's params.yaml ------------------------------------------------------------------------------


def test_repo_params_load_and_are_sane():
    p = load_params(PARAMS_YAML)
    assert isinstance(p, Params)
    assert p.base.model == BUILTIN_MODEL and p.base.device in ("auto", "cpu", "cuda")
    assert p.advantage.estimator == "rloo" and p.sample.k >= 2  # leave-one-out needs K >= 2
    assert 0 < p.sample.temperature and 0 < p.sample.top_p <= 1
    assert p.sample.max_completion_length < p.sample.max_model_len
    assert p.prepare.max_prompt_tokens + p.sample.max_completion_length <= p.sample.max_model_len
    assert 0 < p.update.learning_rate < 1e-3
    assert 0 <= p.score.beta < 1
    assert [r.name for r in p.score.rewards] == ["sentiment", "length"]
    assert all((r.function is None) != (r.model is None) for r in p.score.rewards)
    assert p.train.rounds >= 1 and p.train.prompts_per_round >= 1
    assert p.prepare.eval_size >= 1
    assert (REPO / p.prepare.prompts).is_file()  # the shipped prompts file exists


def test_repo_params_load_from_str_path_and_cwd(monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_params() == load_params(str(PARAMS_YAML))  # default path: params.yaml in the cwd


def test_pydantic_defaults_are_valid():
    p = Params(score={"rewards": [{"name": "r", "function": "vader"}]})
    assert p.sample.k >= 2 and p.advantage.estimator == "rloo"
    assert SampleParams().k == 4 and UpdateParams().learning_rate > 0 and AdvantageParams().estimator == "rloo"


def test_params_are_frozen():
    from pydantic import ValidationError

    p = load_params(PARAMS_YAML)
    with pytest.raises(ValidationError, match="frozen"):
        p.sample.k = 8  # type: ignore[misc]
    assert p.sample.k == load_params(PARAMS_YAML).sample.k


def test_omitted_sections_take_defaults(data):
    minimal = {"score": data["score"]}
    p = parse_params(minimal)
    assert p.update == UpdateParams() and p.sample == SampleParams()


def test_overrides(tmp_path, data):
    path = write_yaml(tmp_path / "p.yaml", data)
    p = load_params(path, {"update.learning_rate": 1e-5, "advantage.estimator": "grpo"})
    assert p.update.learning_rate == 1e-5 and p.advantage.estimator == "grpo"
    with pytest.raises(PipelineError, match=r"`advantage.estimator`"):
        load_params(path, {"advantage.estimator": "nope"})


def test_override_into_an_empty_section_takes_effect(tmp_path, data):
    data["advantage"] = None  # `advantage:` with every key commented out
    path = write_yaml(tmp_path / "p.yaml", data)
    p = load_params(path, {"advantage.estimator": "reinforce"})
    assert p.advantage.estimator == "reinforce" and p.advantage.alpha == AdvantageParams().alpha


# --- one-line errors ---------------------------------------------------------------------------------------


def test_unknown_top_level_section(data):
    data["updates"] = {"learning_rate": 1e-5}
    msg = error_of(data)
    assert "`updates`" in msg
    for section in ("base", "prepare", "sample", "score", "advantage", "update", "evaluate", "train", "mlflow"):
        assert section in msg


def test_unknown_key_in_section_lists_allowed_fields(data):
    data["update"]["learnig_rate"] = data["update"].pop("learning_rate")
    msg = error_of(data)
    assert "unknown field `update.learnig_rate`" in msg
    assert "allowed fields here:" in msg
    for field in UpdateParams.model_fields:
        assert field in msg
    assert "learning_rate" in msg.split("allowed fields here:")[1]
    assert "unknown field `update.learnig_rate`; did you mean `learning_rate`?; allowed" in msg


@pytest.mark.parametrize("section,name,ours", [("sample", "num_generations", "sample.k"), ("update", "beta", "score.beta"),
                                               ("score", "reward_weights", "score.rewards[].weight"),
                                               ("sample", "max_new_tokens", "sample.max_completion_length")])
def test_trl_s_names_of_our_fields_say_ours(data, section, name, ours):
    """A TRL user's RLOOConfig/GRPOConfig names: the message says what the field is called here."""
    data[section][name] = 1
    assert f"unknown field `{section}.{name}` (TRL's `{name}` is `{ours}` here); allowed fields here: " in error_of(data)


def test_unknown_key_in_reward_spec(data):
    data["score"]["rewards"][0]["wieght"] = 2.0
    msg = error_of(data)
    assert "`score.rewards.0.wieght`" in msg and "weight" in msg and "kwargs" in msg


def test_wrong_type(data):
    data["sample"]["k"] = "four"
    msg = error_of(data)
    assert "`sample.k`" in msg and "valid integer" in msg and "'four'" in msg


def test_fractional_int(data):
    data["sample"]["k"] = 4.5
    assert "`sample.k`" in error_of(data)


def test_wrong_type_for_a_section(data):
    data["sample"] = 5
    msg = error_of(data)
    assert "`sample`" in msg and "dictionary" in msg


def test_list_field_rejects_a_string(data):
    data["sample"]["stop"] = "</s>"
    assert "`sample.stop`" in error_of(data)


@pytest.mark.parametrize(
    ("section", "field", "value", "phrase"),
    [
        ("update", "learning_rate", -1, "greater than 0"),
        ("update", "learning_rate", 0, "greater than 0"),
        ("update", "learning_rate", float("nan"), "a finite number"),
        ("sample", "top_p", 1.5, "less than or equal to 1"),
        ("sample", "temperature", 0, "greater than 0"),
        ("advantage", "alpha", 1.0, "less than 1"),
        ("base", "threads", -1, "greater than or equal to 0"),
        ("prepare", "eval_size", 0, "greater than or equal to 1"),
        ("score", "beta", -0.1, "greater than or equal to 0"),
    ],
)
def test_out_of_range(data, section, field, value, phrase):
    data[section][field] = value
    msg = error_of(data)
    assert f"`{section}.{field}`" in msg and phrase in msg


def test_literal_lists_allowed_values(data):
    data["advantage"]["estimator"] = "foo"
    msg = error_of(data)
    assert "`advantage.estimator`" in msg and "'foo'" in msg
    for name in ("rloo", "reinforce", "batch_mean", "moving_average", "ema", "grpo"):
        assert f"'{name}'" in msg


def test_literal_device(data):
    data["base"]["device"] = "gpu"
    msg = error_of(data)
    assert "`base.device`" in msg and "'cuda'" in msg and "'cpu'" in msg


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_k1_rejected_for_leave_one_out(data, estimator):
    data["sample"]["k"] = 1
    data["advantage"]["estimator"] = estimator
    msg = error_of(data)
    assert msg.startswith("p.yaml: sample.k: must be >= 2")
    assert f"advantage.estimator={estimator}" in msg and "reinforce" in msg


@pytest.mark.parametrize("estimator, k, bound", [("rloo", 0, ">= 2 for advantage.estimator=rloo (got 0)"),
                                                 ("grpo", -1, ">= 2 for advantage.estimator=grpo (got -1)"),
                                                 ("ema", 0, ">= 1 (got 0)")])
def test_k_below_one_names_the_bound_that_applies(data, estimator, k, bound):
    """One message with the bound of the estimator in use: k = 0 with rloo says 2 at once (not 1, then 2)."""
    data["sample"]["k"], data["advantage"]["estimator"] = k, estimator
    assert error_of(data).startswith(f"p.yaml: sample.k: must be {bound}")


@pytest.mark.parametrize("estimator", ["reinforce", "batch_mean", "moving_average", "ema"])
def test_k1_valid_without_leave_one_out(data, estimator):
    data["sample"]["k"] = 1
    data["advantage"]["estimator"] = estimator
    p = parse_params(data)
    assert p.sample.k == 1 and p.advantage.estimator == estimator


def test_reward_with_function_and_model(data):
    data["score"]["rewards"][0]["model"] = "models/rm"
    msg = error_of(data)
    assert "`score.rewards.0`" in msg and "exactly one of `function`" in msg and "`model`" in msg


def test_reward_with_neither_function_nor_model(data):
    del data["score"]["rewards"][1]["function"]
    msg = error_of(data)
    assert "`score.rewards.1`" in msg and "exactly one of" in msg


def test_duplicate_reward_names(data):
    data["score"]["rewards"][1]["name"] = "sentiment"
    msg = error_of(data)
    assert "`score`" in msg and "reward names must be unique" in msg and "sentiment" in msg


def test_bad_reward_name(data):
    data["score"]["rewards"][0]["name"] = "my reward"
    assert "`score.rewards.0.name`" in error_of(data)


def test_empty_rewards(data):
    data["score"]["rewards"] = []
    assert "`score.rewards`" in error_of(data)


def test_missing_score_section(data):
    del data["score"]
    msg = error_of(data)
    assert "`score`" in msg and "required" in msg


def test_several_errors_reported_as_one_line_with_count(data):
    data["sample"]["k"] = "four"
    data["update"]["learning_rate"] = -1
    msg = error_of(data)
    assert "[+1 more]" in msg


@pytest.mark.parametrize("bad, why", [(-1, "greater than or equal to 0"), ("all", "valid integer"),
                                      (1.5, "fractional")])
def test_a_field_of_two_types_gets_one_error_naming_both(data, bad, why):
    data["update"]["micro_batch_size"] = bad  # an integer >= 0 or "auto"
    msg = error_of(data)
    assert "`update.micro_batch_size`:" in msg and why in msg and "or Input should be 'auto'" in msg
    assert "more]" not in msg and "constrained-int" not in msg and "\n" not in msg


def test_micro_batch_size_auto_resolves_by_cpu_kind(monkeypatch):
    import torch

    from stages import runtime

    assert load_params(PARAMS_YAML).update.micro_batch_size == "auto"  # the default this pins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, want in ((True, 32), (False, 16)):
        monkeypatch.setattr(runtime, "amx_bf16", lambda amx=amx: amx)
        assert runtime.micro_batch_size("auto") == want and runtime.micro_batch_size(8) == 8
        assert runtime.micro_batch_size("auto", bf16_autocast=False) == 16  # an fp32 update: the AMX reason is gone
    assert runtime.micro_batch_size(0) == 0  # no cap


def test_not_a_mapping():
    msg = error_of([1, 2])
    assert "expected a mapping" in msg


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  seed: 1\nsample: [k: 4\n")
    with pytest.raises(PipelineError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert msg == (f"{path}: not valid YAML (line 4: expected ',' or ']', but got '<stream end>', "
                   f"while parsing a flow sequence from line 3); fix the syntax")


def test_a_key_without_its_colon_is_named_by_its_own_line_anywhere_in_params_yaml(tmp_path):
    """Each key of the shipped params.yaml with its ':' deleted, one at a time: the error names that key's line
    (PyYAML stops further on, at the next key, in several ways). A key that then reads as another key's text (a
    flow mapping's `kwargs {min_words: 8}`) is reported as an unknown field instead."""
    import re

    lines = PARAMS_YAML.read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*(?:- )?)([A-Za-z_]\w*):(\s|$)", line)
        if not m:
            continue
        keys += 1
        path = tmp_path / f"line{i + 1}.yaml"
        path.write_text("\n".join([*lines[:i], line[: m.end(2)] + line[m.end(2) + 1 :], *lines[i + 1 :]]) + "\n")
        with pytest.raises(PipelineError) as exc:
            load_params(path)
        if "{" in line.split("#")[0]:  # a flow mapping on the line (not in its comment)
            assert "unknown field" in str(exc.value)
        else:
            assert f"(line {i + 1}: no ':' after the key '{m.group(2)}')" in str(exc.value), str(exc.value)
    assert keys > 80


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes("base:\n  model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PipelineError) as exc:
        load_params(path)
    assert str(exc.value) == f"{path}: not UTF-8 text (at byte offset 18); save it as UTF-8"


@pytest.mark.parametrize("text, where", [
    # a key without its ':' runs on into the next line, where PyYAML sees the error: the key's line is named
    ("base:\n  seed 1\n  model: smollm2\n", "line 2: no ':' after the key 'seed'"),
    ("base:\n  seed 1\n\n  # the model\n  model: smollm2\n", "line 2: no ':' after the key 'seed'"),
    ("base:\r\n  seed 1\r\n  model: x\r\n", "line 2: no ':' after the key 'seed'"),
    ("score:\n  rewards:\n    - name sentiment\n      function: vader\n", "line 3: no ':' after the key 'name'"),
    # a real `a: b` on its line, whatever comes before it, is that line's
    ("base:\n  seed: 1\n  model: a: b\n", "line 3: mapping values are not allowed here"),
    ("base:\n  desc: |\n    some text\n  model: a: b\n", "line 4: mapping values are not allowed here"),
    ("score:\n  rewards:\n    - foo\n  model: a: b\n", "line 4: mapping values are not allowed here"),
    ("x: [1,\n  2]\ny: a: b\n", "line 3: mapping values are not allowed here"),
    ("base:\n\tseed: 1\n", "line 2: found character '\\t' that cannot start any token"),
    ("base:\n  seed: 1\x07\n", "line 2: special characters are not allowed ('\\x07')"),
])
def test_invalid_yaml_names_the_line_to_fix(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as exc:
        load_params(path)
    assert str(exc.value) == f"{path}: not valid YAML ({where}); fix the syntax"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(PipelineError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "not found" in msg and "--params" in msg


def test_load_params_names_the_file(tmp_path, data):
    data["sample"]["k"] = "four"
    path = write_yaml(tmp_path / "mine.yaml", data)
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}: `sample.k`"):
        load_params(path)


def test_empty_file_says_score_is_required(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(PipelineError, match=r"`score`"):
        load_params(path)


# --- hash / flat -------------------------------------------------------------------------------------------


def test_hash_is_stable_and_changes_with_a_field(data):
    a, b = parse_params(data), parse_params(copy.deepcopy(data))
    assert a.hash() == b.hash() and len(a.hash()) == 16
    int(a.hash(), 16)  # hex
    data["update"]["learning_rate"] = 1e-5
    c = parse_params(data)
    assert c.hash() != a.hash()
    assert c.hash("update") != a.hash("update")
    assert c.hash("sample", "advantage") == a.hash("sample", "advantage")  # other sections untouched
    assert a.hash("update") != a.hash("sample")


def test_hash_ignores_key_order(data):
    reordered = {k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v for k, v in reversed(list(data.items()))}
    assert parse_params(reordered).hash() == parse_params(data).hash()


def test_hash_changes_with_a_nested_reward_field(data):
    before = parse_params(data).hash("score")
    data["score"]["rewards"][1]["kwargs"]["min_words"] = 9
    assert parse_params(data).hash("score") != before


def test_flat_keys(data):
    p = parse_params(data)
    flat = p.flat()
    assert all(k.count(".") == 1 for k in flat)
    sections = {k.split(".")[0] for k in flat}
    assert sections == set(Params.model_fields)
    assert flat["update.learning_rate"] == p.update.learning_rate
    assert flat["sample.k"] == p.sample.k
    assert flat["base.model"] == "smollm2"
    assert flat["prepare.system_prompt"] is None
    # lists/dicts become JSON strings (MLflow params are scalars)
    assert flat["sample.stop"] == "[]"
    assert isinstance(flat["score.rewards"], str) and '"sentiment"' in flat["score.rewards"]
    assert flat["update.lora_target_modules"] == '["q_proj", "k_proj", "v_proj", "o_proj"]'
    n_fields = sum(len(type(getattr(p, s)).model_fields) for s in Params.model_fields)
    assert len(flat) == n_fields


# --- CLI ---------------------------------------------------------------------------------------------------


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for part in parts:
        assert part in lines[0]
    return lines[0]


def test_cli_validates_the_repo_params():
    proc = run(["-m", "stages.params"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["advantage"]["estimator"] == "rloo"


def test_cli_bad_value(tmp_path, data):
    data["update"]["learnig_rate"] = data["update"].pop("learning_rate")
    bad = write_yaml(tmp_path / "bad.yaml", data)
    assert_one_line_error(run(["-m", "stages.params", str(bad)], cwd=REPO), "update.learnig_rate", "learning_rate")


@pytest.mark.parametrize("reward, parts", [
    ({"name": "s", "function": "vadr"}, ("reward `s`: unknown function `vadr`",)),
    ({"name": "s", "function": "length", "kwargs": {"min_wrds": 3}}, ("unknown kwarg `min_wrds`", "min_words")),
    ({"name": "s", "function": "nosuch_module_xyz:f"}, ("cannot import module `nosuch_module_xyz`",)),
    ({"name": "s", "model": "no/such/rm"}, ("score.rewards[s].model", "no/such/rm", "fix the path")),
])
def test_cli_checks_the_rewards_as_a_run_would(tmp_path, data, reward, parts):
    data["score"]["rewards"] = [reward]
    bad = write_yaml(tmp_path / "bad.yaml", data)
    assert_one_line_error(run(["-m", "stages.params", str(bad)], cwd=REPO), *parts)


def test_cli_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: {k: 4\n")
    assert_one_line_error(run(["-m", "stages.params", str(bad)], cwd=REPO), "not valid YAML")


def test_cli_missing_file(tmp_path):
    assert_one_line_error(run(["-m", "stages.params", str(tmp_path / "nope.yaml")], cwd=REPO), "not found")


def test_prepare_cli_stops_before_any_work(tmp_path, data):
    data["prepare"]["eval_size"] = -3
    write_yaml(tmp_path / "bad.yaml", data)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = run(["-m", "stages.prepare", "--params", "bad.yaml"], cwd=tmp_path, env=env)
    assert_one_line_error(proc, "bad.yaml", "`prepare.eval_size`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no data/, no models/


# --- documented once ---------------------------------------------------------------------------------------


def test_every_field_has_a_description():
    from stages.params import field_rows

    rows = field_rows()
    missing = [key for key, _, _, _, doc in rows if len(doc.strip()) < 8]
    assert not missing, f"params fields without a description: {missing}"
    assert len(rows) >= 70


def test_docs_params_md_is_the_generated_table():
    from stages.params import markdown_table

    text = (REPO / "docs" / "params.md").read_text()
    assert markdown_table() in text, "docs/params.md is stale: run `python -m stages.params --markdown` and paste the table"


def test_params_yaml_sets_only_known_fields_and_every_field():
    """params.yaml shows every field (its comments are for the reader; the descriptions live in the models)."""
    raw = yaml.safe_load(PARAMS_YAML.read_text())
    for section, model in Params.model_fields.items():
        sub = type(getattr(load_params(PARAMS_YAML), section))
        assert set(raw[section]) == set(sub.model_fields), section


def test_cli_prints_the_markdown_table():
    proc = run(["-m", "stages.params", "--markdown"], cwd=REPO)
    assert proc.returncode == 0 and "| `update.learning_rate` |" in proc.stdout and "| run identity |" in proc.stdout


@pytest.mark.parametrize("change, named", [
    (lambda d: d["score"]["rewards"][1]["kwargs"].update(min_wrds=3), "unknown kwarg `min_wrds` for built-in `length`"),
    (lambda d: d["score"]["rewards"][0].update(function="vaderr"), "unknown function `vaderr`"),
    (lambda d: d["score"]["rewards"][0].update(function="no_such_module:score"), "cannot import module `no_such_module`"),
    (lambda d: d["score"].update(ref_model="models/nonexistent"), "score.ref_model: model directory"),
])
def test_the_warm_load_s_inputs_are_checked_without_loading(data, change, named, tmp_path, monkeypatch):
    """What the flow checks once before starting several ranks (`stages.loop.warm.check_inputs`): each a one-line
    error naming the reward or field; the shipped params pass. In an empty dir: the checkout's own data/prepared
    (made by whatever task it last ran) is not this test's."""
    from stages.loop.warm import check_inputs

    monkeypatch.chdir(tmp_path)
    check_inputs(parse_params(copy.deepcopy(data)))
    change(data)
    with pytest.raises(PipelineError, match=re.escape(named)):
        check_inputs(parse_params(data))


def test_no_float_setting_takes_infinity(data):
    """YAML's `.inf` passed `gt=0` (`update.learning_rate: .inf` made round 1's weights NaN and archived the run
    before; `sample.temperature: .inf` trained on uniform noise with exit 0): every float field refuses it."""
    import typing

    from stages.params import Params, _submodel

    checked = []
    for section, field in Params.model_fields.items():
        model = _submodel(field.annotation)
        for name, f in getattr(model, "model_fields", {}).items():
            if float not in (f.annotation, *typing.get_args(f.annotation)):
                continue
            for value in (float("inf"), float("-inf")):
                bad = copy.deepcopy(data)
                bad.setdefault(section, {})[name] = value
                assert error_of(bad).startswith(f"p.yaml: `{section}.{name}`: Input should be a finite number"), name
            checked.append(f"{section}.{name}")
    assert {"update.learning_rate", "score.beta", "sample.temperature", "advantage.epsilon"} <= set(checked)

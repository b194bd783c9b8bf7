"""The README's reward and dataset examples run as written: the reward functions it defines are called the way the
pipeline calls them, and its `datasets` example prepares."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.params import RewardSpec
from stages.prepare import clean_prompts, read_prompts_source
from stages.rewards import build_reward

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def heredoc(marker: str, name: str) -> str:
    m = re.search(rf"cat > {re.escape(name)} <<'{marker}'\n(.*?)\n\s*{marker}\n", README, re.S)
    assert m, f"README has no `cat > {name}` example"
    return "\n".join(line[2:] if line.startswith("  ") else line for line in m.group(1).splitlines()) + "\n"


def test_the_readme_reward_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(heredoc("PY", "my_rewards.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    length = build_reward(RewardSpec(name="len", function="my_rewards:reward_len"))
    assert length(["q", "q"], ["x" * 20, "x" * 5], completion_ids=[[1], [2]]) == [0, -15]
    acc = build_reward(RewardSpec(name="acc", function="my_rewards:accuracy"))
    assert acc(["q", "q"], ["It is 14.", "13"], completion_ids=[[1], [2]], answer=["14", "12"]) == [1.0, 0.0]
    conv = [[{"role": "user", "content": "q"}]] * 2
    with pytest.raises(Exception) as exc:  # conversational completions are message lists: `.lower()` needs text
        acc(["q", "q"], ["14", "12"], completion_ids=[[1], [2]], messages=conv, answer=["14", "12"])
    # the README's example of the one-line error: the user's own line, named by its function
    assert re.search(r"raised AttributeError: 'list' object has no attribute 'lower' \(at \S*my_rewards\.py:5 in "
                     r"accuracy\)$", str(exc.value)), str(exc.value)
    assert "(at my_rewards.py:5 in accuracy)" in README
    as_text = build_reward(RewardSpec(name="acc", function="my_rewards:accuracy", kwargs={"as_text": True}))
    assert as_text(["q", "q"], ["14", "12"], completion_ids=[[1], [2]], messages=conv, answer=["14", "12"]) == [1.0, 1.0]


def test_the_readme_question_answering_params_build(tmp_path):
    """The README's QA snippet writes a prompts file and params that validate and whose rewards build."""
    m = re.search(r"\.venv/bin/python - <<'PY'   # a question-answering task[^\n]*\n(.*?)\n\s*PY\n", README, re.S)
    assert m
    code = "\n".join(line[2:] for line in m.group(1).splitlines())
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    (tmp_path / "my_rewards.py").write_text(heredoc("PY", "my_rewards.py"))
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    from stages.params import load_params
    from stages.rewards import build_rewards

    p = load_params(tmp_path / "params.qa.yaml")
    sys.path.insert(0, str(tmp_path))
    try:
        assert [r.name for r in build_rewards(p.score.rewards)] == ["accuracy", "exact", "short"]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_rewards", None)
    table, _ = clean_prompts(read_prompts_source(tmp_path / p.prepare.prompts), "sums")
    assert table.height == 144 and "answer" in table.columns


def test_the_readme_conversational_dataset(tmp_path):
    m = re.search(r"\.venv/bin/python - <<'PY'\n(from datasets import Dataset.*?)\nPY\n", README, re.S)
    assert m, "README has no conversational datasets example"
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", m.group(1)], cwd=tmp_path, check=True)
    table, dropped = clean_prompts(read_prompts_source(tmp_path / "data" / "prompts" / "qa"), "qa")
    assert table.height == 120 and dropped == 0 and "42" in set(table["solution"])
    # the eval_size the example sets leaves prompts to train on (the shipped 96 would leave 24)
    size = int(re.search(r"prepare\.eval_size: (\d+)", README[m.end():m.end() + 400]).group(1))
    from stages.prepare import split_prompts

    train, held_out = split_prompts(table, size, 42)
    assert held_out.height == size and train.height == 120 - size > 0

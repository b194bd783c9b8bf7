"""flows/pipeline.py's edit of params.yaml for `more_rounds` (a scheduled run that adds rounds): only the number of
`train.rounds` changes, comments and layout stay, and a file it cannot edit safely is refused with the fix. The flow
itself runs against a real Prefect server in the slow tests (tests/test_deployment.py)."""

from __future__ import annotations

import pytest

from flows.pipeline import raise_rounds
from stages.errors import PipelineError

PARAMS = """\
base:
  seed: 42           # the run's seed
  rounds: 3          # not train.rounds: must stay
train:
  # how long the job runs
  rounds: 12         # rounds of sample -> score -> advantage -> update
  prompts_per_round: 8
evaluate:
  rounds: 5
"""


def test_more_rounds_raise_only_train_rounds_and_keep_the_rest(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    assert raise_rounds(path, 4) == (12, 16)
    assert path.read_text() == PARAMS.replace("  rounds: 12 ", "  rounds: 16 ")
    assert raise_rounds(path, 1) == (16, 17)


@pytest.mark.parametrize("text,phrase", [
    ("base:\n  seed: 1\n", "no `train:` section"),
    ("train:\n  prompts_per_round: 8\nevaluate:\n  rounds: 5\n", "`train.rounds` is not set"),
])
def test_a_params_file_without_train_rounds_is_refused_and_left_alone(tmp_path, text, phrase):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=phrase):
        raise_rounds(path, 2)
    assert path.read_text() == text

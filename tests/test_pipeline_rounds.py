"""flows/pipeline.py's edit of params.yaml for `more_rounds` (a scheduled run that adds rounds): only the number of
`train.rounds` changes, comments and layout stay, and a file it cannot edit safely is refused with the fix. The flow
itself runs against a real Prefect server in the slow tests (tests/test_deployment.py)."""

from __future__ import annotations

import logging

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


def _rounds_done(tmp_path, n: int) -> None:
    for r in range(n):
        (tmp_path / "data" / "rounds" / f"round={r:04d}").mkdir(parents=True)
        (tmp_path / "data" / "rounds" / f"round={r:04d}" / "manifest.json").write_text("{}")
    (tmp_path / "data" / "rounds" / f"round={n:04d}").mkdir()  # a partial round: no manifest, not complete


@pytest.mark.parametrize("done, kept", [(12, 12), (11, 12), (14, 14), (16, 16)])
def test_a_failed_run_puts_params_back_but_keeps_the_rounds_it_completed(tmp_path, monkeypatch, done, kept):
    """A scheduled run that raised train.rounds 12 -> 16 and then failed: params.yaml as it was, except that
    train.rounds keeps the rounds that completed (putting back 12 after 14 complete rounds would refuse every later
    run: '12 rounds asked, but 14 are complete')."""
    from flows.pipeline import _put_back

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    _rounds_done(tmp_path, done)
    rounds = raise_rounds(path, 4)
    _put_back(path, PARAMS, rounds, logging.getLogger("t"))
    assert path.read_text() == PARAMS.replace("  rounds: 12 ", f"  rounds: {kept} ")


def test_a_failed_run_leaves_an_edit_made_during_it(tmp_path, monkeypatch, caplog):
    from flows.pipeline import _put_back

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    rounds = raise_rounds(path, 4)
    edited = path.read_text().replace("seed: 42", "seed: 7")
    path.write_text(edited)
    _put_back(path, PARAMS, rounds, logging.getLogger("t"))
    assert path.read_text() == edited and "edited during the failed run: left as it is (train.rounds there: 16)" in caplog.text
    path.write_text(PARAMS)
    _put_back(path, PARAMS, None, logging.getLogger("t"))  # nothing changed: nothing written
    assert path.read_text() == PARAMS


@pytest.mark.parametrize("output, why", [
    ("running...\nerror: reward `acc` raised KeyError: 'answer'\nERROR: failed to reproduce 'train': failed to run: "
     "python -m flows.train, exited with 2\n",
     "reward `acc` raised KeyError: 'answer' (ERROR: failed to reproduce 'train': failed to run: python -m flows.train, "
     "exited with 2)"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\nIsADirectoryError: [Errno 21] metrics/eval.json\n"
     "ERROR: failed to reproduce 'evaluate': exited with 1\n",
     "IsADirectoryError: [Errno 21] metrics/eval.json (ERROR: failed to reproduce 'evaluate': exited with 1)"),
    ("ERROR: unexpected error - lock held\n", "ERROR: unexpected error - lock held"),
])
def test_a_failed_stage_says_its_own_reason(output, why):
    """The pipeline's error carries the stage's own `error:` line or its traceback's last line, not only DVC's
    'failed to reproduce' summary."""
    from flows.pipeline import _why

    assert _why(output) == why

"""stages.loop.resume: the resume plan on synthetic run directories (manifests + checkpoint metadata, no weights):
continue, re-do after the checkpoint, repair a manifest from the checkpoint, move another run aside, and refuse every
inconsistent state with one line; nothing outside the run's own round dirs is removed. Also the run identity and the
output-dir checks of the params, and `round_prompts`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from conftest import repo_params, repo_params_data
from stages import checkpoint
from stages.errors import PipelineError, params_file_named
from stages.io import write_json, write_table
from stages.loop.resume import (
    MANIFEST,
    RESTART,
    SEAL,
    apply_plan,
    file_record,
    plan_resume,
    read_manifest,
    round_dir,
    round_prompts,
    seal_manifest,
    write_manifest,
)
from stages.loop.writer import manifest_for, round_write
from stages.params import parse_params

REPO = Path(__file__).resolve().parents[1]

ID = "run-a"


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return repo_params()


def write_round(tp, r, identity=ID, *, manifest=True, ckpt=True, ema=None):
    d = round_dir(tp.rounds_dir, r)
    df = pl.DataFrame({"prompt_id": [f"p{r}"], "x": [float(r)]})
    write_table(df, d / "samples.parquet")
    m = manifest_for(r, identity, "h", {"samples.parquet": file_record(d / "samples.parquet", 1)}, {"reward": r},
                     {"estimator": "ema", "ema": ema if ema is not None else float(r)}, None) | {"checkpoint": ckpt}
    if manifest:
        write_json(m, d / MANIFEST)
    return m


def write_checkpoint(tp, rnd, identity=ID, manifest=None, state=False):
    meta = {"format": checkpoint.FORMAT, "checkpoint_id": f"c{rnd}", "round": rnd, "identity": identity,
            "base_id": "b", "lora": False, "manifest": manifest}
    write_json(meta, f"{tp.checkpoint_dir}/{checkpoint.META}")
    if state:  # its optimizer state (a stand-in: the plan only looks for the file)
        path = checkpoint.state_file(tp.state_dir, meta["checkpoint_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"state")
    return meta


def test_a_checkpoint_without_its_optimizer_state_is_rebuilt_from_the_base(params):
    """The state never enters DVC's cache (a clone that pulled the run has the checkpoint and the rounds): with every
    round on disk the plan replays them all from the base model instead of refusing the run, whatever rounds wrote
    checkpoints; the checkpoint it rebuilds is named."""
    from stages.loop.resume import plan_resume

    tp = params.train
    ms = [write_round(tp, r, ckpt=r in (1, 3)) for r in range(4)]
    meta = write_checkpoint(tp, 4, state=False)
    plan = plan_resume(params, ID)
    assert plan.start == 4 and plan.checkpoint is None and plan.rebuilt == meta
    assert [m["round"] for m in plan.replay] == [0, 1, 2, 3] and plan.done == plan.replay
    assert [m["round"] for m in ms] == [0, 1, 2, 3]
    write_checkpoint(tp, 4, state=True)  # with its state: the usual plan
    plan = plan_resume(params, ID)
    assert plan.checkpoint["checkpoint_id"] == "c4" and plan.replay == [] and plan.rebuilt is None


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_fresh_start(params):
    plan = plan_resume(params, ID)
    assert plan.start == 0 and plan.checkpoint is None and plan.superseded is None and plan.adv_state is None


def test_continue_after_the_checkpoint(params, caplog):
    tp = params.train
    ms = [write_round(tp, r) for r in range(3)]
    write_checkpoint(tp, 3, state=True)
    round_dir(tp.rounds_dir, 3).mkdir()  # a partial round (killed mid-round): no manifest
    (round_dir(tp.rounds_dir, 3) / "samples.parquet").write_bytes(b"half")
    plan = plan_resume(params, ID)
    assert plan.start == 3 and [m["round"] for m in plan.done] == [0, 1, 2] and plan.done[-1] == ms[-1]
    assert plan.adv_state == {"estimator": "ema", "ema": 2.0}  # round 3's baseline, from its manifest
    assert plan.identity == ID and plan.checkpoint["checkpoint_id"] == "c3"  # the weights round 4 starts from
    assert plan.stale == [round_dir(tp.rounds_dir, 3)]
    (tp_dir := round_dir(tp.rounds_dir, 0).parent / "notes.txt").write_text("mine")
    (round_dir(tp.rounds_dir, 0).parent / "plots").mkdir()  # not a round dir either
    assert plan_resume(params, ID).stale == plan.stale
    with caplog.at_level(logging.INFO, logger="stages.loop.resume"):
        apply_plan(plan, params)
    assert f"removed {round_dir(tp.rounds_dir, 3)}, the partial round 4 an interrupted run left (only files a round " \
           "writes): it is re-done" in caplog.text
    assert not round_dir(tp.rounds_dir, 3).exists() and round_dir(tp.rounds_dir, 2).is_dir()
    assert tp_dir.read_text() == "mine"  # not a round dir: never touched


def test_rounds_after_the_last_checkpoint_are_replayed(params):
    tp = params.train
    write_round(tp, 0, ckpt=False)
    write_round(tp, 1, ckpt=True)
    r2 = write_round(tp, 2, ckpt=False)  # update.save_every = 2: rounds 3 and 4 wrote no checkpoint
    r3 = write_round(tp, 3, ckpt=False, ema=0.25)
    write_round(tp, 4, manifest=False)  # killed during round 5
    write_checkpoint(tp, 2, state=True)
    plan = plan_resume(params, ID)
    assert plan.start == 4 and plan.replay == [r2, r3] and plan.done[2:] == [r2, r3]
    assert plan.adv_state["ema"] == 0.25  # round 5 starts from round 4's baseline
    assert plan.stale == [round_dir(tp.rounds_dir, 4)]


def test_a_damaged_round_after_the_checkpoint_is_refused_with_the_ways_out_and_nothing_deleted(params):
    """A complete round after the checkpoint whose artifact no longer matches its manifest could be re-done, but
    only by discarding it and the rounds after it: the run stops and says so, deleting nothing."""
    tp = params.train
    write_round(tp, 0, ckpt=False)
    write_round(tp, 1, ckpt=True)
    write_round(tp, 2, ckpt=False)
    write_round(tp, 3, ckpt=False)
    write_round(tp, 4, ckpt=False)
    write_checkpoint(tp, 2, state=True)
    (round_dir(tp.rounds_dir, 3) / "samples.parquet").write_bytes(b"damaged")
    (round_dir(tp.rounds_dir, 4) / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    msg = one_line(exc)
    assert "round=0003/samples.parquet has 7 bytes" in msg and "round 4 is damaged" in msg
    assert "re-do it from the checkpoint at round 2 by removing round=0003 and the round dirs after it" in msg
    # only the damaged file, from DVC's cache (--force: a damaged copy is in the way); never the whole rounds dir,
    # whose checkout would put back what DVC last recorded and remove later rounds it never cached
    assert f"restore it with `dvc checkout --force {round_dir(tp.rounds_dir, 3) / 'samples.parquet'}`" in msg
    assert f"dvc checkout {tp.rounds_dir}`" not in msg and f"dvc checkout --force {tp.rounds_dir}`" not in msg
    assert RESTART in msg
    assert (round_dir(tp.rounds_dir, 4) / "notes.txt").read_text() == "mine"
    (round_dir(tp.rounds_dir, 0) / "samples.parquet").write_bytes(b"damaged")  # before the checkpoint: no re-do
    with pytest.raises(PipelineError, match="round 1 is damaged") as exc:
        plan_resume(params, ID)
    assert "re-do" not in one_line(exc)


def test_a_partial_round_holding_a_file_no_round_writes_is_refused(params):
    """A partial round (no manifest) is removed and re-done, but only when its dir holds nothing but what a round
    writes (artifacts and their temporary files): a file the user put there stops the run, named."""
    tp = params.train
    write_round(tp, 0)
    write_checkpoint(tp, 1)
    d = round_dir(tp.rounds_dir, 1)
    d.mkdir()
    (d / "samples.parquet").write_bytes(b"half")
    (d / ".scores.parquet.abc123.parquet.tmp").write_bytes(b"")  # a write the kill interrupted
    assert plan_resume(params, ID).stale == [d]
    (d / "my_notes.txt").write_text("mine")
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "round=0001/my_notes.txt" in one_line(exc) and "move it out of" in one_line(exc)
    assert (d / "my_notes.txt").read_text() == "mine" and (d / "samples.parquet").exists()


def test_fewer_rounds_than_completed_are_refused_but_not_for_another_run(params):
    from stages.loop.resume import check_total

    tp = params.train
    for r in range(3):
        write_round(tp, r)
    write_checkpoint(tp, 3)
    plan = plan_resume(params, ID)
    check_total(plan, 3)  # all done: fine
    check_total(plan, 5)  # more to train: fine
    with pytest.raises(PipelineError) as exc:
        check_total(plan, 2, "--rounds")  # a command-line flag: no params.yaml hint
    assert str(exc.value) == ("--rounds: 2 rounds asked, but 3 rounds of this run are already complete; ask for 3 or "
                              f"more (more continue the run), or start over: {RESTART}")
    for field in ("train.rounds", "train.rounds (or --rounds)"):  # set in params.yaml: where to change it
        with pytest.raises(PipelineError) as exc:
            check_total(plan, 2, field) if field != "train.rounds" else check_total(plan, 2)
        assert str(exc.value) == (f"{field}: 2 rounds asked, but 3 rounds of this run are already complete; ask for 3 "
                                  "or more (train.rounds in params.yaml, `--rounds N` on the command line, or "
                                  "`-S train.rounds=N` in a dvc exp run) (more continue the "
                                  f"run), or start over: {RESTART}")
    check_total(plan_resume(params, "run-b"), 1)  # another identity starts over: its rounds are not this run's
    with params_file_named("runs/my params.yaml"), pytest.raises(PipelineError) as exc:  # `--params` given: named
        check_total(plan, 2)
    assert str(exc.value).endswith("(train.rounds in runs/my params.yaml, `--rounds N` on the command line, or `-S "
                                   "train.rounds=N` in a dvc exp run) (more continue the run), or start over: python "
                                   "-m flows.train --restart --params 'runs/my params.yaml'")
    with pytest.raises(PipelineError) as exc:  # and after the command: params.yaml again
        check_total(plan, 2)
    assert str(exc.value).endswith(f"or start over: {RESTART}") and "train.rounds in params.yaml" in str(exc.value)


def test_manifest_repaired_from_the_checkpoint(params, caplog):
    """Killed between the checkpoint and the manifest of round 3: the checkpoint carries that manifest, with the
    carried EMA baseline the next round needs."""
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    lost = write_round(tp, 2, manifest=False, ema=0.125)
    write_checkpoint(tp, 3, manifest=lost)
    plan = plan_resume(params, ID)
    assert plan.start == 3 and plan.repair == lost and plan.adv_state == lost["advantage_state"]
    assert plan.adv_state["ema"] == 0.125  # round 4 starts from round 3's baseline, not from scratch
    with caplog.at_level(logging.INFO, logger="stages.loop.resume"):
        apply_plan(plan, params)
    assert "repaired the manifest of round 3 from its checkpoint" in [r.getMessage() for r in caplog.records]
    repaired = json.loads((round_dir(tp.rounds_dir, 2) / MANIFEST).read_text())
    assert repaired == seal_manifest(lost) and repaired[SEAL]  # sealed as the round would have written it
    assert plan_resume(params, ID).start == 3 and plan_resume(params, ID).repair is None


def test_a_repaired_run_still_verifies_its_other_rounds(params):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    write_checkpoint(tp, 3, manifest=write_round(tp, 2, manifest=False))
    path = round_dir(tp.rounds_dir, 1) / "samples.parquet"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(PipelineError, match=r"round 2 is damaged"):
        plan_resume(params, ID)


def test_a_deleted_round_is_not_repaired_from_the_checkpoint(params):
    """The checkpoint carries round 3's manifest for a kill between the two writes; a round dir deleted by hand has
    no artifacts to go with it: the run stops and says so, instead of writing a manifest over nothing."""
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    write_checkpoint(tp, 3, manifest=write_round(tp, 2, manifest=False))
    shutil.rmtree(round_dir(tp.rounds_dir, 2))
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert f"round 3 is damaged; restore it with `dvc checkout {round_dir(tp.rounds_dir, 2)}` (DVC's copy" in one_line(exc)
    assert not round_dir(tp.rounds_dir, 2).exists()


def test_removed_checkpoint_is_refused_not_a_reason_to_delete(params):
    tp = params.train
    for r in range(2):
        write_round(tp, r)
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "round 2 wrote a checkpoint, but the checkpoint is missing" in one_line(exc) and "--restart" in str(exc.value)
    assert all((round_dir(tp.rounds_dir, r) / MANIFEST).is_file() for r in range(2))


def test_a_checkpoint_older_than_the_rounds_that_wrote_one_is_refused(params):
    """Rounds 2 to 4 each wrote a checkpoint, but the checkpoint dir holds round 1's (e.g. restored from an old
    `dvc checkout`): resuming from it would silently redo three rounds that are on record."""
    tp = params.train
    for r in range(4):
        write_round(tp, r)
    write_checkpoint(tp, 1, state=True)
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "round 4 wrote a checkpoint, but the checkpoint is at round 1" in one_line(exc)  # the last of rounds 2-4
    # the checkpoint dir holds another (uncached) checkpoint: DVC replaces it only with --force
    assert f"restore it with `dvc checkout --force {tp.checkpoint_dir}` (DVC's copy, when DVC cached that checkpoint)" \
        in str(exc.value)


@pytest.mark.parametrize("content,phrase", [("{}", "manifest lacks round, identity, artifacts, metrics"),
                                            ("{garbage", "unreadable manifest")])
def test_a_broken_manifest_is_refused(params, content, phrase):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    write_checkpoint(tp, 2)
    (round_dir(tp.rounds_dir, 1) / MANIFEST).write_text(content)
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert phrase in one_line(exc) and str(round_dir(tp.rounds_dir, 1) / MANIFEST) in str(exc.value)
    assert RESTART in one_line(exc)  # the way out it names works: the run moves aside as it is
    (Path(tp.rounds_dir) / "round=0007").write_text("not a dir")  # neither counts as a round of the run moved aside
    (Path(tp.rounds_dir) / "round=notes").mkdir()
    plan = plan_resume(params, ID, restart=True)
    assert (plan.identity, plan.start) == (ID, 0)  # the new run: this configuration, from round 1
    assert plan.superseded == {"identity": "unreadable", "rounds": 2, "restart": True}
    write_json({"format": checkpoint.FORMAT}, f"{tp.checkpoint_dir}/{checkpoint.META}")  # an unreadable checkpoint too
    assert plan_resume(params, ID, restart=True).superseded["identity"] == "unreadable"


def test_checkpoint_ahead_of_the_rounds_is_refused(params):
    tp = params.train
    write_round(tp, 0)
    write_checkpoint(tp, 3)
    with pytest.raises(PipelineError, match=r"the checkpoint is at round 3 but only 1 rounds are complete"):
        plan_resume(params, ID)


def test_a_checkpoint_whose_rounds_dir_holds_no_round_says_where_the_rounds_went(params):
    """A changed train.rounds_dir (or rounds deleted): the checkpoint is this run's, its rounds are not where the
    params say: the error says to put the setting back before it offers to start over (which would archive the
    checkpoint without its rounds)."""
    tp = params.train
    write_checkpoint(tp, 28)
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert one_line(exc) == (f"{tp.checkpoint_dir}: the checkpoint is at round 28, but {tp.rounds_dir} holds no round "
                             "of its run: if train.rounds_dir changed, put it back to the dir that holds them (or move "
                             f"them to {tp.rounds_dir}); if they were deleted, start over: {RESTART}")
    round_dir(tp.rounds_dir, 0).mkdir(parents=True)  # a partial round: rounds were here, so the general line
    with pytest.raises(PipelineError, match="the checkpoint is at round 28 but only 0 rounds are complete"):
        plan_resume(params, ID)
    shutil.rmtree(tp.rounds_dir)
    write_checkpoint(tp, 1, manifest={"round": 0})  # a checkpoint at round 1 carries its round's manifest
    with pytest.raises(PipelineError, match="the checkpoint is at round 1, but data/rounds holds no round of its run"):
        plan_resume(params, ID)  # not repaired from it: there is no round dir to repair


def test_a_checkpoint_moved_aside_without_rounds_is_said(params, caplog):
    """--restart over a checkpoint whose rounds are elsewhere: the log says the run moved aside had a checkpoint at
    round N, not only "0 complete rounds"; an unreadable one is not guessed at."""
    from stages.loop.resume import archive_run

    tp = params.train
    write_checkpoint(tp, 28)
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        moved = archive_run(params, {"identity": ID, "rounds": 0, "restart": True})
    assert f"--restart: the previous run (0 complete rounds, a checkpoint at round 28) was moved to {moved.dest}" \
        in caplog.text
    write_json({"format": "unknown"}, f"{tp.checkpoint_dir}/{checkpoint.META}")
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        moved = archive_run(params, {"identity": ID, "rounds": 0, "restart": True})
    assert f"--restart: the previous run (0 complete rounds) was moved to {moved.dest}" in caplog.text


def test_rounds_of_two_runs_are_refused(params):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1, identity="run-b")
    with pytest.raises(PipelineError, match=r"more than one run"):
        plan_resume(params, ID)


def test_a_gap_in_the_manifests_is_refused(params):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1, manifest=False)
    write_round(tp, 2)
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "round 2 has no manifest but later rounds are complete" in one_line(exc)
    assert f"restore it with `dvc checkout {round_dir(tp.rounds_dir, 1) / MANIFEST}` (DVC's copy" in one_line(exc)
    assert RESTART in one_line(exc)
    shutil.rmtree(round_dir(tp.rounds_dir, 1))  # the whole round dir gone: the checkout names the dir
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "round 2 is missing but later rounds are complete" in one_line(exc)
    assert f"restore it with `dvc checkout {round_dir(tp.rounds_dir, 1)}` (DVC's copy" in one_line(exc)


@pytest.mark.parametrize("damage", ["missing", "size", "checksum"])
def test_each_kind_of_damage_is_named_with_the_fix(params, damage):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    write_checkpoint(tp, 2)
    path = round_dir(tp.rounds_dir, 1) / "samples.parquet"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
        problem = "is missing"
    elif damage == "size":
        path.write_bytes(data + b"xx")
        problem = f"has {len(data) + 2} bytes, its manifest recorded {len(data)}"
    else:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
        problem = "does not match the checksum its manifest recorded"
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    force = "" if damage == "missing" else "--force "  # DVC replaces a file it has not cached only when forced
    assert str(exc.value) == (f"{path} {problem}: round 2 is damaged; restore it with `dvc checkout {force}{path}` "
                              f"(DVC's copy, when DVC cached this round) or start over: {RESTART}")


def test_a_manifest_in_another_round_s_dir_or_unreadable_is_refused_with_the_fix(params):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    write_checkpoint(tp, 2)
    wrong = round_dir(tp.rounds_dir, 1) / MANIFEST
    wrong.write_text((round_dir(tp.rounds_dir, 0) / MANIFEST).read_text())  # round 1's manifest copied over round 2's
    fix = f"restore it with `dvc checkout --force {wrong}` (DVC's copy, when DVC cached this round) or start over: {RESTART}"
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert str(exc.value) == f"{wrong}: manifest says round 0 in the dir of round 1; {fix}"
    wrong.write_text("{garbage")
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert str(exc.value) == f"{wrong}: unreadable manifest (JSONDecodeError); {fix}"


def test_a_manifest_changed_since_its_round_wrote_it_is_refused_with_the_fix(params, tmp_path):
    """The flow seals each manifest with the checksum of its own content: its metrics, carried baseline and prompt
    schedule feed the rounds after it, so one edited (or damaged) since its round wrote it stops the resume, naming
    it and the fix; a manifest from before seals (none) is read as it is."""
    tp = params.train
    write_round(tp, 0)
    m = write_round(tp, 1, manifest=False) | {"prompt_ids": ("p1", "p2"), "note": tmp_path}  # JSON's list, str
    write_checkpoint(tp, 2)
    path = round_dir(tp.rounds_dir, 1) / MANIFEST
    trainer = type("T", (), {"rng_state": lambda self: {}})()
    round_write(trainer, params, m, path, save=False)()  # the flow's write of a round's manifest (no checkpoint)
    written = read_manifest(path)
    assert written[SEAL] and written["prompt_ids"] == ["p1", "p2"] and plan_resume(params, ID).done[-1] == written
    for key, value in (("advantage_state", {"estimator": "ema", "ema": 0.5}), ("metrics", {"reward": 9.0})):
        path.write_text(json.dumps(written | {key: value}, indent=2))  # an edit by hand
        with pytest.raises(PipelineError) as exc:
            plan_resume(params, ID)
        assert one_line(exc) == (f"{path}: the manifest was changed since its round wrote it (its content does not "
                                 f"match its {SEAL}); restore it with `dvc checkout --force {path}` (DVC's copy, when DVC cached this round) or "
                                 f"start over: {RESTART}")
    path.write_text(json.dumps({k: v for k, v in written.items() if k != SEAL}))  # from before seals
    assert plan_resume(params, ID).start == 2
    # ... but not after a sealed round: seals came in at one moment, so a later round's seal was deleted
    first = round_dir(tp.rounds_dir, 0) / MANIFEST
    write_manifest(json.loads(first.read_text()), first)
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert one_line(exc) == (f"{path}: the manifest has no {SEAL} though round 1's before it has one: it was edited "
                             f"since its round wrote it; restore it with `dvc checkout --force {path}` (DVC's copy, "
                             f"when DVC cached this round) or start over: {RESTART}")
    path.write_text(json.dumps(written))
    assert plan_resume(params, ID).start == 2


def test_file_record_is_size_and_sha256_and_rows_only_when_given(tmp_path):
    path = tmp_path / "a.bin"
    data = bytes(range(256)) * 5000  # over one read block
    path.write_bytes(data)
    assert file_record(path) == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert file_record(path, 7) == {**file_record(path), "rows": 7}


def test_a_damaged_artifact_is_named(params):
    tp = params.train
    write_round(tp, 0)
    write_round(tp, 1)
    write_checkpoint(tp, 2)
    path = round_dir(tp.rounds_dir, 0) / "samples.parquet"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert f"{path} has" in one_line(exc) and "round 1 is damaged" in str(exc.value)


def test_another_run_is_moved_aside_whole(params, tmp_path):
    tp = params.train
    for r in range(2):
        write_round(tp, r, identity="old")
    write_checkpoint(tp, 2, identity="old")
    (tmp_path / tp.state_dir).mkdir(parents=True)
    (tmp_path / tp.state_dir / "state-c2.pt").write_bytes(b"s")
    plan = plan_resume(params, ID)
    assert plan.start == 0 and plan.superseded == {"identity": "old", "rounds": 2, "restart": False}
    assert plan.identity == ID and plan.done == [] and plan.stale == []  # nothing is deleted: it all moves
    apply_plan(plan, params)
    (dest,) = (tmp_path / tp.archive_dir).iterdir()
    assert dest.name.endswith("-old")
    assert (dest / "rounds" / "round=0001" / MANIFEST).is_file() and (dest / "policy" / checkpoint.META).is_file()
    assert (dest / "state" / "state-c2.pt").read_bytes() == b"s"
    assert not (tmp_path / tp.rounds_dir).exists() and plan_resume(params, ID).start == 0


def test_another_runs_checkpoint_alone_or_rounds_of_two_other_runs_are_moved_aside(params):
    tp = params.train
    write_checkpoint(tp, 2, identity="old")  # its rounds are gone (or elsewhere): the checkpoint still says whose
    plan = plan_resume(params, ID)
    assert plan.start == 0 and plan.superseded == {"identity": "old", "rounds": 0, "restart": False}
    write_round(tp, 0, identity="run-c")
    write_round(tp, 1, identity="run-b")
    assert plan_resume(params, ID).superseded["identity"] == "old,run-b,run-c"


@pytest.mark.parametrize("restart", [False, True])
def test_a_checkpoint_of_the_update_stage_run_alone_is_another_run(params, restart):
    """`python -m stages.update` from the base model writes a checkpoint without a run identity: a flow moves it
    aside like any other run's (with or without --restart), it does not crash on it."""
    tp = params.train
    write_checkpoint(tp, 1, identity=None)
    plan = plan_resume(params, ID, restart)
    assert plan.start == 0 and plan.superseded["identity"] == "stages.update" and plan.stale == []
    write_round(tp, 0)  # this run's rounds beside it: inconsistent, a line that says so and the way out, which works
    if restart:
        assert plan_resume(params, ID, restart).superseded["identity"] == "stages.update"  # both move aside, whole
    else:
        with pytest.raises(PipelineError) as exc:
            plan_resume(params, ID)
        assert one_line(exc).startswith(f"{tp.checkpoint_dir}: the checkpoint is of another run than the rounds in")
        assert RESTART in one_line(exc)


def test_a_checkpoint_the_update_stage_continued_is_still_the_stage_s(params):
    """Older stage checkpoints kept the identity of the policy they continued: their `source` says whose they are."""
    tp = params.train
    write_round(tp, 0)
    write_json({"format": checkpoint.FORMAT, "checkpoint_id": "c", "round": 2, "identity": ID, "base_id": "b",
                "lora": False, "source": "stages.update"}, f"{tp.checkpoint_dir}/{checkpoint.META}")
    with pytest.raises(PipelineError, match="the checkpoint is of another run than the rounds"):
        plan_resume(params, ID)


def test_the_two_runs_error_names_the_odd_side(params):
    tp = params.train
    write_round(tp, 0, identity="run-b")
    write_checkpoint(tp, 1)  # this run's checkpoint, another run's rounds
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert one_line(exc).startswith(f"{tp.rounds_dir}: the rounds are of another run than the checkpoint in")


def test_the_round_the_checkpoint_resumes_at_is_re_done_when_damaged(params):
    tp = params.train
    write_round(tp, 0, ckpt=False)
    write_round(tp, 1, ckpt=True)
    write_round(tp, 2, ckpt=False)  # round 3: right after the checkpoint (which is at round 2)
    write_checkpoint(tp, 2)
    (round_dir(tp.rounds_dir, 2) / "samples.parquet").write_bytes(b"damaged")
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "round 3 is damaged" in one_line(exc)
    assert "re-do it from the checkpoint at round 2 by removing round=0002 and the round dirs after it" in one_line(exc)


def test_a_damaged_round_without_a_checkpoint_is_re_done_from_the_base_model(params):
    tp = params.train
    write_round(tp, 0, ckpt=False)
    write_round(tp, 1, ckpt=False)
    (round_dir(tp.rounds_dir, 1) / "samples.parquet").write_bytes(b"damaged")
    with pytest.raises(PipelineError) as exc:
        plan_resume(params, ID)
    assert "re-do it from the base model (no checkpoint yet) by removing round=0001" in one_line(exc)


def test_restart_moves_this_run_aside(params, tmp_path):
    tp = params.train
    write_round(tp, 0)
    write_checkpoint(tp, 1)
    plan = plan_resume(params, ID, restart=True)
    assert plan.start == 0 and plan.superseded["restart"]
    apply_plan(plan, params)
    assert len(list((tmp_path / tp.archive_dir).iterdir())) == 1


# ---------------------------------------------------------------- identity, output dirs, round prompts


def test_identity_ignores_outputs_rounds_and_speed_knobs_but_not_the_training():
    base = repo_params().identity()
    same = {"train": {"rounds": 99, "rounds_dir": "x/r", "checkpoint_dir": "x/p", "state_dir": "x/s", "archive_dir": "x/a",
                      "eval_every": 3, "async_checkpoint": False},
            "base": {"threads": 1}, "score": {"batch_size": 3}, "update": {"micro_batch_size": 4, "save_every": 5},
            "mlflow": {"experiment": "other"}, "evaluate": {"num_examples": 1}}
    assert repo_params(**same).identity() == base
    for change in ({"update": {"learning_rate": 1e-4}}, {"sample": {"k": 3}}, {"advantage": {"estimator": "ema"}},
                   {"train": {"prompts_per_round": 3}}, {"base": {"seed": 1}}, {"score": {"beta": 0.5}}):
        assert repo_params(**change).identity() != base, change


def test_identity_ignores_a_field_the_configuration_does_not_read_and_keeps_earlier_runs_identity():
    from stages.params import _digest, _in_identity

    params = repo_params()
    base = params.identity()
    # a run made before fields became conditional resumes: the default configuration hashes as it did
    data = params.model_dump(mode="json")
    assert base == _digest({s: {k: v for k, v in data[s].items() if _in_identity(s, k)} for s in data})
    assert params.advantage.estimator == "rloo" and not params.update.use_lora
    for inert in ({"advantage": {"alpha": 0.5}}, {"advantage": {"window": 3}}, {"advantage": {"epsilon": 0.1}},
                  {"update": {"lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj"]}},
                  {"update": {"grad_variance": True}}):
        assert repo_params(**inert).identity() == base, inert
    # where the configuration reads the field, it is the training's: a change is a new run
    for estimator, field, value in (("ema", "alpha", 0.5), ("moving_average", "window", 3), ("grpo", "epsilon", 0.1)):
        chosen = repo_params(advantage={"estimator": estimator}).identity()
        assert chosen != base
        assert repo_params(advantage={"estimator": estimator, field: value}).identity() != chosen, field
        other = next(f for f in ("alpha", "window", "epsilon") if f != field)
        assert repo_params(advantage={"estimator": estimator, other: {"alpha": 0.5, "window": 3, "epsilon": 0.1}[other]}
                           ).identity() == chosen, (estimator, other)
    lora = repo_params(update={"use_lora": True}).identity()
    assert lora != base and repo_params(update={"use_lora": True, "lora_r": 4}).identity() != lora
    assert params.identity_aliases() == set()  # the default: nothing changed


def test_a_new_estimator_s_own_setting_counts_only_with_it_and_a_bad_read_stops_the_import(tmp_path):
    """README "Extending": an estimator's `reads` names the advantage fields that count in its runs' identity, for a
    new estimator and its new field too (the list was typed out as the three built-in fields: a new estimator's own
    setting changed every run's identity). A `reads` that names no field, or a field every estimator's run reads
    (`normalize_advantages`: it would drop whitening from every other run's identity), stops the import in one line.
    A copy of the code with the new field added, as a user extends it, in a fresh interpreter (the table is read at
    import)."""
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params_py = tmp_path / "stages" / "params.py"
    anchor = '    normalize_advantages: bool = F(False, "whiten the advantages over the round\'s batch (TRL)")\n'
    assert anchor in params_py.read_text()
    params_py.write_text(params_py.read_text().replace(
        anchor, anchor + '    quantile: float = F(0.5, "max_others: which quantile", gt=0, lt=1)\n'))
    code = """
import sys
import stages.estimators as est
est.ESTIMATORS['max_others'] = est.Estimator('max_others', 'the best other completion', True,
    lambda c: (c.reward.max().over(c.group), None), reads=(sys.argv[1],))
try:
    import stages.params as P
except TypeError as exc:
    print('TypeError:', exc); raise SystemExit(0)
from conftest import repo_params
ident = lambda e, v: repo_params(advantage={'estimator': e, 'quantile': v}).identity()
print(P.CONDITIONAL_IDENTITY['advantage.quantile'][1], ident('rloo', 0.3) == ident('rloo', 0.7),
      ident('max_others', 0.3) == ident('max_others', 0.7))
"""
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO / 'tests'}"}
    run = lambda field: subprocess.run([sys.executable, "-c", code, field], capture_output=True, text=True,  # noqa: E731
                                       env=env, cwd=tmp_path, timeout=120)
    got = run("quantile")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "only with advantage.estimator max_others True False"
    for field, why in (("quantiles", "which AdvantageParams lacks: add the field (stages/params.py) with its "
                                     "params.yaml line, or fix `reads`"),
                       ("normalize_advantages", "which every estimator's run reads (it counts in every run's "
                                                "identity): leave it out of `reads`")):
        got = run(field)
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == f"TypeError: estimator `max_others` reads advantage.{field}, {why}"


def test_a_run_an_earlier_version_named_by_a_field_it_does_not_read_resumes(tmp_path, monkeypatch):
    """Before CONDITIONAL_IDENTITY a run with `update.grad_variance: true` (or ema's alpha beside rloo) had an identity
    of its own; that run resumes under the new identity, its old rounds and checkpoint beside the new rounds."""
    from stages.params import _digest, _in_identity

    monkeypatch.chdir(tmp_path)
    params = repo_params(update={"grad_variance": True}, advantage={"alpha": 0.5})
    data = params.model_dump(mode="json")
    legacy = _digest({s: {k: v for k, v in data[s].items() if _in_identity(s, k)} for s in data})
    assert legacy != params.identity() and params.identity_aliases() == {legacy}
    tp = params.train
    for r in range(2):
        write_round(tp, r, legacy, ckpt=r == 1)
    write_checkpoint(tp, 2, legacy, state=True)
    plan = plan_resume(params, params.identity())
    assert plan.superseded is None and plan.start == 2 and plan.checkpoint["round"] == 2
    write_round(tp, 2, params.identity(), ckpt=False)  # its next round, under the new identity: still one run
    assert plan_resume(params, params.identity()).start == 3
    assert plan_resume(params, "run-b").superseded is not None  # the aliases are those of the identity asked for only
    other = repo_params(update={"grad_variance": True}, advantage={"alpha": 0.5}, base={"seed": 9})
    assert plan_resume(other, other.identity()).superseded is not None  # another configuration is another run


@pytest.mark.parametrize("field,value,phrase", [
    ("rounds_dir", "data", "holds prepare.prompts"),
    ("rounds_dir", ".", "is the working directory or above it"),
    ("rounds_dir", "..", "is the working directory or above it"),
    ("checkpoint_dir", "models", "holds base.model_dir"),
    ("archive_dir", "data/prepared", "holds data/prepared"),
    ("state_dir", "models/policy/state", "holds train.state_dir"),  # reported on the enclosing checkpoint_dir
    ("rounds_dir", "data/archive/r", "holds train.rounds_dir"),
])
def test_output_dirs_must_be_dedicated(field, value, phrase):
    data = repo_params_data(train={field: value})
    with pytest.raises(PipelineError) as exc:
        parse_params(data, "p.yaml")
    assert phrase in one_line(exc) and "train." in str(exc.value)


def test_round_prompts_cover_the_split_without_repeats_within_a_round_or_an_epoch():
    train = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(10)]})
    rounds = [round_prompts(train, r, 3, 7)["prompt_id"].to_list() for r in range(12)]
    assert all(len(set(ids)) == 3 for ids in rounds)
    first_epoch = [p for ids in rounds[:3] for p in ids]
    assert len(set(first_epoch)) == 9  # rounds 1-3 are 9 distinct prompts of the first shuffle
    assert rounds[0] != rounds[1] and rounds == [round_prompts(train, r, 3, 7)["prompt_id"].to_list() for r in range(12)]
    assert round_prompts(train, 0, 3, 8)["prompt_id"].to_list() != rounds[0]  # the seed matters


def test_in_training_evaluation_uses_the_first_eval_prompts_or_all():
    from stages.loop.warm import eval_subset

    heldout = pl.DataFrame({"prompt_id": [f"e{i}" for i in range(5)]})
    assert eval_subset(heldout, 0)["prompt_id"].to_list() == heldout["prompt_id"].to_list()
    assert eval_subset(heldout, 2)["prompt_id"].to_list() == ["e0", "e1"]


def test_prompts_added_to_a_running_job_come_first_then_the_least_recently_trained():
    train = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(6)]})
    history = [round_prompts(train, r, 2, 7)["prompt_id"].to_list() for r in range(2)]  # rounds 0 and 1
    untrained = {p for p in train["prompt_id"] if p not in history[0] + history[1]} | {"new"}
    grown = pl.concat([train, pl.DataFrame({"prompt_id": ["new"]})])
    third = round_prompts(grown, 2, 2, 7, history)["prompt_id"].to_list()
    assert set(third) < untrained  # 2 of the 3 never-trained prompts, none trained before
    fourth = round_prompts(grown, 3, 2, 7, history + [third])["prompt_id"].to_list()
    assert set(fourth) - set(history[0]) == untrained - set(third)  # the last untrained one ...
    assert len(set(fourth) & set(history[0])) == 1  # ... and one of round 0's, the least recently trained


def test_prompts_added_come_before_the_never_trained_prompts_of_the_old_split():
    """A scheduled run adds rounds for the prompts added to the file: they are trained in those rounds, even while
    prompts of the old split have never been trained (the default job trains 96 of its 224)."""
    train = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(20)]})
    history = [round_prompts(train, r, 2, 7)["prompt_id"].to_list() for r in range(2)]  # 16 never trained
    grown = pl.concat([train, pl.DataFrame({"prompt_id": ["new1", "new2", "new3"]})])
    added = frozenset({"new1", "new2", "new3"})
    third = round_prompts(grown, 2, 2, 7, history, added)["prompt_id"].to_list()
    fourth = round_prompts(grown, 3, 2, 7, history + [third], added)["prompt_id"].to_list()
    assert set(third) < added and set(fourth) & added == added - set(third)  # all three first, then the old split
    # among the added, the order is sha1("seed:-2:id"), the same in every version (resumes replay it)
    assert third == sorted(added, key=lambda p: hashlib.sha1(f"7:-2:{p}".encode()).hexdigest())[:2]
    assert round_prompts(grown, 2, 2, 7, history)["prompt_id"].to_list() == (
        round_prompts(grown, 2, 2, 7, history, frozenset())["prompt_id"].to_list())


def test_split_record_names_the_split_independently_of_row_order():
    from stages.loop.resume import split_record

    a = split_record(pl.DataFrame({"prompt_id": ["p2", "p0", "p1"]}))
    assert a["size"] == 3 and a["ids"] == ["p0", "p1", "p2"]
    assert len(a["hash"]) == 16 and a == split_record(pl.DataFrame({"prompt_id": ["p1", "p2", "p0"]}))
    import hashlib

    assert a["hash"] == hashlib.sha1(b"p0,p1,p2").hexdigest()[:16]  # what older manifests recorded: keep it stable
    assert split_record(pl.DataFrame({"prompt_id": ["p0", "p1", "p3"]}))["hash"] != a["hash"]


def test_new_prompts_are_those_missing_from_the_last_rounds_split():
    from stages.loop.resume import new_prompts, split_record

    last = {"round": 4, "train_split": split_record(pl.DataFrame({"prompt_id": ["p0", "p1"]}))}
    grown = split_record(pl.DataFrame({"prompt_id": ["p1", "n1", "p0", "n0"]}))
    assert new_prompts(last, grown) == ["n0", "n1"]  # in the split's (sorted) order
    assert new_prompts(last, last["train_split"]) == []
    assert new_prompts({"round": 4}, grown) == []  # a manifest from before splits were recorded: nothing is "new"


class _Log:
    """A logger that keeps its lines (info and warning alike)."""

    def __init__(self):
        self.lines = []

    def info(self, fmt, *args):
        self.lines.append(fmt % args)

    warning = info


def test_untrained_prompts_are_reported_with_the_round_and_the_fix():
    from stages.loop.resume import report_untrained, split_record

    log = _Log()
    last = {"round": 4, "train_split": split_record(pl.DataFrame({"prompt_id": ["p0"]}))}
    report_untrained(log, last, split_record(pl.DataFrame({"prompt_id": ["p0", "n0", "n1"]})), 5)
    assert log.lines == ["2 prompt(s) were added to the train split since round 5; raise train.rounds past 5 to "
                         "train on them (they come first), or let a scheduled pipeline run do it"]
    report_untrained(log, last, last["train_split"], 5)
    assert len(log.lines) == 1  # nothing added: nothing said


def test_a_resume_whose_auto_settings_resolve_otherwise_is_warned_with_the_fix():
    from stages.loop.resume import report_resolution_change

    log = _Log()
    last = {"round": 3, "sample_dtype": "float32", "score_dtype": "bfloat16", "micro_batch_size": 16}
    now = {"sample_dtype": "bfloat16", "score_dtype": "bfloat16", "micro_batch_size": 16, "world_size": 1}
    assert report_resolution_change(log, last, now) == ["sample_dtype"]
    assert log.lines == ["resuming after round 4: sample.dtype resolves to bfloat16 here, it was float32 for the "
                         "rounds so far (`auto` follows the machine's kind, docs/design.md §7); set sample.dtype to "
                         "float32 to keep it"]
    assert report_resolution_change(log, last, last) == [] and len(log.lines) == 1  # the same: nothing said
    assert report_resolution_change(log, {"round": 3}, now) == []  # a manifest from before these were recorded
    # where the KL's policy logprobs come from: no advice to set the field (it is part of the run identity, and what
    # it resolves to follows the engine's dtype and the update's micro-batches)
    assert report_resolution_change(log, {"round": 3, "policy_logprobs": "trainer"}, {"policy_logprobs": "update"}) \
        == ["policy_logprobs"]
    assert log.lines[-1] == ("resuming after round 4: the KL's policy logprobs come from the update here, from "
                             "the trainer for the rounds so far (score.policy_logprobs: auto follows the engine's "
                             "dtype and the update's micro-batches, docs/design.md §7)")


def test_archive_dirs_are_named_by_time_and_identity_and_never_shared(params, tmp_path, monkeypatch):
    from stages.loop import resume

    tp = params.train
    real = resume.time.strftime
    monkeypatch.setattr(resume.time, "strftime", lambda fmt, *a: "20261201-101500" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a))
    ident = "0123456789abcdef0123"  # cut to 16 characters in the name
    dests = []
    for r in range(3):  # three runs moved aside within one second
        write_round(tp, 0, identity=f"old{r}")
        (tmp_path / tp.state_dir).mkdir(parents=True, exist_ok=True)  # empty: nothing of it to keep
        dests.append(resume.archive_run(params, {"identity": ident, "rounds": 1}).dest)
        assert (tmp_path / tp.state_dir).is_dir()  # an empty dir is left where it is, not archived
    assert [d.name for d in dests] == ["20261201-101500-0123456789abcdef", "20261201-101500-0123456789abcdef-1",
                                       "20261201-101500-0123456789abcdef-2"]
    assert all(sorted(p.name for p in d.iterdir()) == [resume.PENDING, "rounds"] for d in dests)
    assert all((d / "rounds" / "round=0000" / "samples.parquet").is_file() for d in dests)
    assert resume.archive_run(params, {"identity": ident, "rounds": 0}) is None  # nothing left to move


def test_round_prompts_ignore_history_past_round_r_and_keep_their_seeded_order():
    import hashlib

    train = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(7)]})
    full = [round_prompts(train, r, 2, 5)["prompt_id"].to_list() for r in range(4)]
    # the manifests of rounds redone after the last checkpoint may still be there: only rounds 0..r-1 count
    assert round_prompts(train, 1, 2, 5, full)["prompt_id"].to_list() == full[1]
    assert round_prompts(train, 2, 2, 5, full[:2] + [["p0", "p1"]])["prompt_id"].to_list() == full[2]
    # round 0, all untrained: the order is sha1("seed:-1:id"), the same in every version (resumes replay it)
    want = sorted(train["prompt_id"], key=lambda p: hashlib.sha1(f"5:-1:{p}".encode()).hexdigest())[:2]
    assert full[0] == want
    # round 1: the 5 untrained first (same hash order), then the trained ones by sha1("seed:round:id")
    rest = [p for p in sorted(train["prompt_id"], key=lambda p: hashlib.sha1(f"5:-1:{p}".encode()).hexdigest())
            if p not in want]
    assert full[1] == rest[:2]


def test_staging_dirs_of_both_the_checkpoint_and_the_state_are_cleaned_when_a_run_starts(params, tmp_path):
    tp = params.train
    left = [tmp_path / tp.checkpoint_dir, tmp_path / tp.state_dir]
    for d in left:  # what a writer killed mid-checkpoint leaves beside each dir
        (d.parent / f".{d.name}.tmp-1234").mkdir(parents=True)
    (tmp_path / "models" / ".other.tmp-1").mkdir(parents=True, exist_ok=True)  # not ours: stays
    apply_plan(plan_resume(params, ID), params)
    assert not any((d.parent / f".{d.name}.tmp-1234").exists() for d in left)
    assert (tmp_path / "models" / ".other.tmp-1").is_dir()


@pytest.mark.parametrize("restart,why", [(True, "--restart"), (False, "the configuration changed")])
def test_moving_a_run_aside_says_why_how_many_rounds_and_where(params, caplog, restart, why):
    from stages.loop.resume import archive_run

    write_round(params.train, 0, identity="old")
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        dest = archive_run(params, {"identity": "old", "rounds": 1, "restart": restart}).dest
    assert [r.getMessage() for r in caplog.records] == [
        f"{why}: the previous run (1 complete rounds) was moved to {dest}; delete it when you no longer need it"]


def test_going_back_to_an_archived_configuration_says_where_its_run_is(params, caplog):
    """Back to a configuration whose run was archived earlier: a new run starts (the warm load took the base model),
    and the log names the earlier run and the moves that would continue it instead."""
    from stages.loop.resume import PENDING, archive_run

    tp = params.train
    write_round(tp, 0, identity=params.identity())
    write_round(tp, 1, identity=params.identity())
    first = archive_run(params, {"identity": params.identity(), "rounds": 2, "restart": False}).dest
    (first / PENDING).unlink()  # the run after it completed a round: the archive is final
    write_round(tp, 0, identity="other")
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        archive_run(params, {"identity": "other", "rounds": 1, "restart": False})
    said = [r.getMessage() for r in caplog.records if "an earlier run of this configuration" in r.getMessage()]
    assert len(said) == 1 and f"(2 complete rounds) is in {first}" in said[0], said
    assert f"`python -m stages.restore {first}`" in said[0]
    caplog.clear()
    write_round(tp, 0, identity="third")
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):  # --restart: said nothing of the kind
        archive_run(params, {"identity": "third", "rounds": 1, "restart": True})
    assert not [r for r in caplog.records if "earlier run" in r.getMessage()]


def test_a_training_split_smaller_than_a_round_is_said_once_at_load(caplog):
    from stages.loop.warm import warn_small_split

    with caplog.at_level("WARNING", logger="stages.loop.warm"):
        assert warn_small_split(4, 2) and not warn_small_split(4, 4)
    assert len(caplog.records) == 1
    assert "train.prompts_per_round=4, but the training split has 2 prompts" in caplog.records[0].getMessage()
    train = pl.DataFrame({"prompt_id": ["a", "b"]})
    assert sorted(round_prompts(train, 0, 4, 0)["prompt_id"]) == ["a", "b"]  # what the warning says


def _snapshot(tmp_path):
    """Every file under tmp_path and its bytes (not the run lock's file: a command's, not the run's)."""
    return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*"))
            if p.is_file() and p.relative_to(tmp_path).parts[0] != ".rloo"}


def test_a_run_that_stops_before_completing_a_round_puts_the_previous_run_back(params, tmp_path, caplog):
    """The failed command leaves the checkout as it found it: its partial round goes, the old rounds, checkpoint and
    state come back, and the archive dirs the move made are removed (no duplicate archive per failed run)."""
    from stages.loop.resume import archive_run, restore_run

    tp = params.train
    write_round(tp, 0, identity="old")
    write_checkpoint(tp, 1, identity="old")
    (tmp_path / tp.state_dir).mkdir(parents=True)
    (tmp_path / tp.state_dir / "state-0.pt").write_bytes(b"optimizer")
    before = _snapshot(tmp_path)
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    dest = moved.dest
    assert Path(tp.archive_dir) in moved.made  # the move made it: restore_run removes it again
    partial = round_dir(tp.rounds_dir, 0)  # the new run's round 1, cut short: samples written, no manifest
    write_table(pl.DataFrame({"prompt_id": ["new"]}), partial / "samples.parquet")
    (partial / ".scores.parquet.77.tmp").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert restore_run(params, moved)
    assert _snapshot(tmp_path) == before and not (tmp_path / tp.archive_dir).exists()
    assert caplog.records[-1].getMessage() == ("this run stopped before completing a round: the previous run is back "
                                               f"in place (moved back from {dest})")
    assert plan_resume(params, "old").start == 1  # and it resumes as before


def test_the_previous_run_stays_archived_after_a_completed_round_or_beside_a_file_of_yours(params, tmp_path, caplog):
    from stages.loop.resume import archive_run, restore_run

    tp = params.train
    (tmp_path / tp.archive_dir).mkdir(parents=True)
    (tmp_path / tp.archive_dir / "older").mkdir()  # an archive dir the user had: never removed
    write_round(tp, 0, identity="old")
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    dest = moved.dest
    assert moved.made == ()  # the archive dir was there: restore_run never removes it
    write_round(tp, 0, identity="new")  # the new run completed round 1: it is the run now
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert not restore_run(params, moved)
    assert not caplog.records and (dest / "rounds" / "round=0000" / MANIFEST).is_file()
    assert not (dest / ".pending-restore.json").exists()  # decided: the next start does not try again
    shutil.rmtree(tmp_path / tp.rounds_dir)
    (tmp_path / tp.checkpoint_dir).mkdir(parents=True)
    (tmp_path / tp.checkpoint_dir / "notes.txt").write_text("mine")  # not the failed run's: nothing moves
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert not restore_run(params, moved)
    assert "notes.txt: this run left more than a partial round, so the previous run stays in" in caplog.text
    assert (dest / "rounds" / "round=0000" / MANIFEST).is_file() and (tmp_path / tp.archive_dir / "older").is_dir()
    (tmp_path / tp.checkpoint_dir / "notes.txt").unlink()
    assert restore_run(params, moved)  # the way clear: back, and only the dir the move made is gone
    assert (tmp_path / tp.rounds_dir / "round=0000" / MANIFEST).is_file() and not dest.exists()
    assert [p.name for p in (tmp_path / tp.archive_dir).iterdir()] == ["older"]


def test_a_run_killed_outright_in_round_1_is_undone_by_the_next_start(params, tmp_path, caplog):
    """kill -9 after the move and before round 1 completed: no handler ran, but the move's marker in the archive
    dir makes the next start (`restore_interrupted`, before plan_resume) put the old run back, as restore_run would
    have; a marker whose run completed a round is dropped, and the run stays archived."""
    from stages.loop.resume import PENDING, archive_run, restore_interrupted

    tp = params.train
    assert not restore_interrupted(params)  # no archive dir at all
    write_round(tp, 0, identity="old")
    write_checkpoint(tp, 1, identity="old")
    before = _snapshot(tmp_path)
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    assert (moved.dest / PENDING).is_file()
    write_table(pl.DataFrame({"prompt_id": ["new"]}), round_dir(tp.rounds_dir, 0) / "samples.parquet")  # killed here
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert restore_interrupted(params)
    assert _snapshot(tmp_path) == before and not (tmp_path / tp.archive_dir).exists()
    assert caplog.records[-1].getMessage() == (
        "a run killed before it completed a round had moved the previous run aside: the previous run is back in place "
        f"(moved back from {moved.dest})")
    assert plan_resume(params, "old").start == 1

    moved = archive_run(params, {"identity": "old", "rounds": 1})
    write_round(tp, 0, identity="new")  # this one completed round 1 (and was killed later): it is the run
    assert not restore_interrupted(params)
    assert not (moved.dest / PENDING).exists() and (moved.dest / "rounds" / "round=0000" / MANIFEST).is_file()
    assert not restore_interrupted(params)  # said and done once


def test_a_damaged_restore_marker_still_moves_the_run_back(params, tmp_path):
    from stages.loop.resume import PENDING, archive_run, restore_interrupted

    tp = params.train
    (tmp_path / tp.archive_dir).mkdir(parents=True)  # there before: stays either way
    write_round(tp, 0, identity="old")
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    (moved.dest / PENDING).write_text("{not json")
    assert restore_interrupted(params)
    assert (tmp_path / tp.rounds_dir / "round=0000" / MANIFEST).is_file() and not moved.dest.exists()
    assert (tmp_path / tp.archive_dir).is_dir()


def test_a_completed_run_keeps_the_previous_one_archived_for_good(params, tmp_path):
    """Once the run that moved another aside completes, its marker goes (`keep_archived`): removing this run's own
    outputs by hand later does not bring the archived run back at the next start."""
    from stages.loop.resume import PENDING, archive_run, keep_archived, restore_interrupted

    tp = params.train
    write_round(tp, 0, identity="old")
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    write_round(tp, 0, identity="new")
    keep_archived(moved)
    assert not (moved.dest / PENDING).exists()
    shutil.rmtree(tmp_path / tp.rounds_dir)  # the user clears the new run by hand
    assert not restore_interrupted(params)
    assert (moved.dest / "rounds" / "round=0000" / MANIFEST).is_file() and not (tmp_path / tp.rounds_dir).exists()


def test_a_kill_in_the_middle_of_the_move_is_undone_too(params, tmp_path, monkeypatch):
    """Killed after the rounds moved and before the checkpoint did: the checkpoint still in place is the old run's
    own (neither a completed round of the new run nor in the way); the rounds come back beside it."""
    from stages.loop import resume

    tp = params.train
    write_round(tp, 0, identity="old")
    write_checkpoint(tp, 1, identity="old")
    before = _snapshot(tmp_path)
    real, calls = resume.rename_part, []

    def killed_at_the_second_move(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise SystemExit("killed")
        return real(src, dst)

    monkeypatch.setattr(resume, "rename_part", killed_at_the_second_move)
    with pytest.raises(SystemExit):
        resume.archive_run(params, {"identity": "old", "rounds": 1})
    monkeypatch.setattr(resume, "rename_part", real)
    assert not (tmp_path / tp.rounds_dir).exists() and (tmp_path / tp.checkpoint_dir).is_dir()  # half moved
    assert resume.restore_interrupted(params)
    assert _snapshot(tmp_path) == before and not (tmp_path / tp.archive_dir).exists()
    assert plan_resume(params, "old").start == 1


def test_a_marker_of_other_output_dirs_is_left_alone_and_a_failed_move_back_is_named(params, tmp_path, monkeypatch,
                                                                                    caplog):
    """An archive dir shared with another checkout (or params file): a marker written for other output dirs is that
    run's, and stays for its own next start. A move back that fails is one warning naming the marker, not a crash."""
    import json

    from stages.loop import resume

    tp = params.train
    write_round(tp, 0, identity="old")
    moved = resume.archive_run(params, {"identity": "old", "rounds": 1})
    marker = moved.dest / resume.PENDING
    info = json.loads(marker.read_text())
    elsewhere = {**info, "from": {k: f"/elsewhere/{k}" for k in info["from"]}}
    marker.write_text(json.dumps(elsewhere))
    assert not resume.restore_interrupted(params)
    assert json.loads(marker.read_text()) == elsewhere and (moved.dest / "rounds").is_dir()

    marker.write_text(json.dumps(info))

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume, "rename_part", disk_full)
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert not resume.restore_interrupted(params)
    assert f"{marker}: could not move the previous run back ([Errno 28] No space left on device)" in caplog.text


def _archived_at(monkeypatch, when):
    """archive_run's clock set to `when` (its dir names sort by time)."""
    from stages.loop import resume

    real = resume.time.strftime
    monkeypatch.setattr(resume.time, "strftime", lambda fmt, *a: when if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a))


def test_the_archived_run_named_is_the_newest_final_one_with_rounds(params, tmp_path, monkeypatch, caplog):
    """Four archives of this configuration: the newest still has its marker (its run may move back), the next holds
    no rounds; the one named is the third, not the older fourth, with the whole message and the command that brings
    it back."""
    from stages.loop import resume

    tp, me = params.train, params.identity()
    assert len(me) == 16  # what an archive's name holds of it
    _archived_at(monkeypatch, "20261201-090000")  # an older final one: not named
    write_round(tp, 0, identity=me)
    resume.keep_archived(older := resume.archive_run(params, {"identity": me, "rounds": 1}))
    _archived_at(monkeypatch, "20261201-100000")
    for r in range(3):
        write_round(tp, r, identity=me)
    write_checkpoint(tp, 3, identity=me)
    chosen = resume.archive_run(params, {"identity": me, "rounds": 3}).dest
    resume.keep_archived(resume.Archived(chosen))
    _archived_at(monkeypatch, "20261201-110000")
    (tmp_path / tp.state_dir).mkdir(parents=True)
    (tmp_path / tp.state_dir / "state-x.pt").write_bytes(b"s")
    no_rounds = resume.archive_run(params, {"identity": me, "rounds": 0}).dest
    resume.keep_archived(resume.Archived(no_rounds))
    _archived_at(monkeypatch, "20261201-120000")
    write_round(tp, 0, identity=me)
    pending = resume.archive_run(params, {"identity": me, "rounds": 1}).dest  # keeps its marker
    _archived_at(monkeypatch, "20261201-130000")
    write_round(tp, 0, identity="other")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        resume.archive_run(params, {"identity": "other", "rounds": 1})
    assert sorted(p.name for p in Path(tp.archive_dir).iterdir() if me in p.name) == [
        older.dest.name, chosen.name, no_rounds.name, pending.name]
    assert caplog.records[-1].getMessage() == (
        f"an earlier run of this configuration (3 complete rounds) is in {chosen}; this one starts over. To continue "
        f"that one instead: stop this run, then `python -m stages.restore {chosen}` (it moves this one aside) and run "
        "again")
    from stages.errors import params_file_named

    caplog.clear()  # a run of another params file: the restore it advises reads that file too
    with params_file_named("exp/p.yaml"), caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        resume._say_archived_twin(params)
    assert f"`python -m stages.restore {chosen} --params exp/p.yaml`" in caplog.records[-1].getMessage()


def test_an_archive_marker_records_the_resolved_output_dirs(params, tmp_path):
    from stages.loop.resume import PENDING, archive_run

    tp = params.train
    write_round(tp, 0, identity="old")
    info = json.loads((archive_run(params, {"identity": "old", "rounds": 1}).dest / PENDING).read_text())
    assert info["from"] == {"rounds": str(tmp_path / tp.rounds_dir), "policy": str(tmp_path / tp.checkpoint_dir),
                            "state": str(tmp_path / tp.state_dir)}
    assert info["parts"] == ["rounds"] and info["made"] == [str(Path(tp.archive_dir))]


def test_a_failure_after_the_first_completed_round_leaves_the_previous_run_archived_quietly(params, tmp_path,
                                                                                             caplog):
    """The flow drops the marker once round 1's manifest is on disk (keep_archived) and still calls restore_run when
    it fails later: no error, no move, no warning; keep_archived twice is harmless too."""
    from stages.loop.resume import PENDING, archive_run, keep_archived, restore_run

    tp = params.train
    write_round(tp, 0, identity="old")
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    write_round(tp, 0, identity="new")
    keep_archived(moved)
    keep_archived(moved)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert restore_run(params, moved) is False
    assert not caplog.records and not (moved.dest / PENDING).exists()
    assert (moved.dest / "rounds" / "round=0000" / MANIFEST).is_file()


@pytest.mark.parametrize("leftover", ["a file where the state dir goes", "a dir in rounds/ that is not a round",
                                      "a file in rounds/", "a round dir in the checkpoint dir",
                                      "a file of yours in a partial round", "a stray .tmp file in a partial round"])
def test_a_failed_run_that_left_anything_but_a_partial_round_keeps_the_previous_run_archived(params, tmp_path, caplog,
                                                                                             leftover):
    """Only a partial round made of what a round writes is removed to put the old run back; anything else stays,
    and so does the old run, with the whole warning."""
    from stages.loop.resume import PENDING, archive_run, restore_run

    tp = params.train
    write_round(tp, 0, identity="old")  # the old run had rounds only: the policy and state dirs are the new run's
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    partial = round_dir(tp.rounds_dir, 0)
    write_table(pl.DataFrame({"prompt_id": ["new"]}), partial / "samples.parquet")
    if leftover == "a file where the state dir goes":
        (Path(tp.state_dir)).parent.mkdir(parents=True, exist_ok=True)
        (blocked := Path(tp.state_dir)).write_text("mine")
    elif leftover == "a dir in rounds/ that is not a round":
        (blocked := Path(tp.rounds_dir) / "plots").mkdir()
        (blocked / "a.png").write_bytes(b"png")
    elif leftover == "a file in rounds/":
        (blocked := Path(tp.rounds_dir) / "notes.txt").write_text("mine")
    elif leftover == "a round dir in the checkpoint dir":
        (blocked := Path(tp.checkpoint_dir) / "round=0000").mkdir(parents=True)
        (blocked / "samples.parquet").write_bytes(b"x")
    elif leftover == "a file of yours in a partial round":
        (partial / "notes.txt").write_text("mine")
        blocked = partial
    else:
        (partial / "scores.tmp").write_bytes(b"x")  # not a round's temporary file (those are .<name>.<random>.tmp)
        blocked = partial
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert restore_run(params, moved) is False
    assert caplog.records[-1].getMessage() == (
        f"{blocked}: this run left more than a partial round, so the previous run stays in {moved.dest}; move its "
        "rounds/, policy/ and state/ back by hand if you want it")
    assert blocked.exists() and (partial / "samples.parquet").is_file() and not (moved.dest / PENDING).exists()
    assert (moved.dest / "rounds" / "round=0000" / MANIFEST).is_file()


def test_a_previous_run_moves_back_where_its_output_dirs_parents_are_gone(params, tmp_path):
    """The parent dirs of an output dir went after the move (say, you removed out/): the previous run still moves
    back, the parents made again."""
    from stages.loop.resume import archive_run, restore_run

    params = repo_params(train={"checkpoint_dir": "out/models/policy", "state_dir": "out/models/state"})
    tp = params.train
    write_round(tp, 0, identity="old")
    write_checkpoint(tp, 1, identity="old")
    before = _snapshot(tmp_path)
    moved = archive_run(params, {"identity": "old", "rounds": 1})
    shutil.rmtree(tmp_path / "out")
    assert restore_run(params, moved) is True
    assert _snapshot(tmp_path) == before


def test_interrupted_moves_are_undone_newest_first_and_past_another_checkout_s(params, tmp_path, monkeypatch,
                                                                               caplog):
    """Two runs killed in turn, each after moving the one before aside (the second killed after its first round):
    undone newest first, the second is the run and the first stays archived. A newer marker of another checkout is
    skipped, not the end of the search."""
    from stages.loop import resume

    tp = params.train
    assert resume.restore_interrupted(params) is False  # no archive dir at all
    _archived_at(monkeypatch, "20261201-100000")
    write_round(tp, 0, identity="first")
    older = resume.archive_run(params, {"identity": "first", "rounds": 1})
    _archived_at(monkeypatch, "20261201-110000")
    write_round(tp, 0, identity="second")  # completed round 1, killed before its marker went
    newer = resume.archive_run(params, {"identity": "second", "rounds": 1})
    _archived_at(monkeypatch, "20261201-120000")
    write_round(tp, 0, identity="elsewhere")
    foreign = resume.archive_run(params, {"identity": "elsewhere", "rounds": 1})
    marker = foreign.dest / resume.PENDING
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "from": {k: f"/elsewhere/{k}" for k in info["from"]}}))
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert resume.restore_interrupted(params) is True
    assert json.loads((tmp_path / tp.rounds_dir / "round=0000" / MANIFEST).read_text())["identity"] == "second"
    assert (older.dest / "rounds" / "round=0000" / MANIFEST).is_file() and not (older.dest / resume.PENDING).exists()
    assert not newer.dest.exists() and marker.is_file()
    assert resume.restore_interrupted(params) is False  # done once


def test_a_killed_run_s_own_state_keeps_the_previous_run_archived_and_a_failed_move_back_is_one_warning(
        params, tmp_path, monkeypatch, caplog):
    """The marker lists the parts that moved: a trainer state the killed run wrote where the previous run had none is
    the killed run's own, and keeps the previous run archived. Where the move back fails, the warning is whole and
    names the marker."""
    from stages.loop import resume

    tp = params.train
    write_round(tp, 0, identity="old")
    moved = resume.archive_run(params, {"identity": "old", "rounds": 1})
    marker = moved.dest / resume.PENDING
    info = json.loads(marker.read_text())
    (tmp_path / tp.state_dir).mkdir(parents=True)
    (tmp_path / tp.state_dir / "state-new.pt").write_bytes(b"s")  # the killed run's: in the way of no part moved
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert resume.restore_interrupted(params) is False
    assert "state-new.pt: this run left more than a partial round" in caplog.text and moved.dest.is_dir()
    marker.write_text(json.dumps(info))
    (tmp_path / tp.state_dir / "state-new.pt").unlink()

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume, "rename_part", disk_full)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert resume.restore_interrupted(params) is False
    assert caplog.records[-1].getMessage() == (
        f"{marker}: could not move the previous run back ([Errno 28] No space left on device); move its rounds/, "
        "policy/ and state/ back by hand, then delete this file")


# ---------------------------------------------------------------- python -m stages.restore: an archived run back


def _two_runs(params, tmp_path):
    """An archived run of this configuration (2 rounds, its checkpoint and trainer state) and another configuration's
    run in the output dirs; returns the archive's dir and a snapshot of each run's files, by their path in place."""
    from stages.loop.resume import archive_run, keep_archived

    tp, me = params.train, params.identity()
    for r in range(2):
        write_round(tp, r, identity=me)
    write_checkpoint(tp, 2, identity=me)
    (tmp_path / tp.state_dir).mkdir(parents=True)
    (tmp_path / tp.state_dir / "state-c2.pt").write_bytes(b"mine")
    mine = _snapshot(tmp_path)
    moved = archive_run(params, {"identity": me, "rounds": 2})
    keep_archived(moved)
    write_round(tp, 0, identity="other")
    write_checkpoint(tp, 1, identity="other")
    other = {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(tp.archive_dir)}
    return moved.dest, mine, other


def test_an_archived_run_is_swapped_back_in_and_resumes(params, tmp_path, caplog):
    from stages.loop.resume import PENDING
    from stages.restore import restore_archived

    tp = params.train
    src, mine, other = _two_runs(params, tmp_path)
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        rounds, aside = restore_archived(params, src)
    assert rounds == 2 and not src.exists() and not (aside / PENDING).exists()  # the other run's archive is final
    assert f"restoring {src}: the previous run (1 complete rounds) was moved to {aside}" in caplog.text
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(tp.archive_dir)} == mine
    parts = {tp.rounds_dir: "rounds", tp.checkpoint_dir: "policy"}  # the other run, whole, in its archive
    assert {str(p.relative_to(aside)): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == {
        f"{name}/{k[len(d) + 1:]}": v for k, v in other.items() for d, name in parts.items() if k.startswith(d + "/")}
    plan = plan_resume(params, params.identity())
    assert plan.superseded is None and plan.start == 2 and plan.checkpoint["round"] == 2
    with pytest.raises(PipelineError, match="a run of another configuration"):  # that one is not this params' run
        restore_archived(params, aside)


def test_restoring_into_empty_output_dirs_moves_nothing_aside(params, tmp_path):
    from stages.restore import restore_archived

    tp = params.train
    src, mine, other = _two_runs(params, tmp_path)
    for d in (tp.rounds_dir, tp.checkpoint_dir):
        shutil.rmtree(tmp_path / d)
    (tmp_path / tp.checkpoint_dir).mkdir()  # an empty dir: nothing to keep, and out of the way
    assert restore_archived(params, src) == (2, None)
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(tp.archive_dir)} == mine


@pytest.mark.parametrize("case", ["missing", "no rounds", "pending", "another configuration", "damaged",
                                  "no complete round", "an output dir"])
def test_restore_refuses_what_is_not_a_final_archived_run_of_this_configuration_and_changes_nothing(params, tmp_path,
                                                                                                     case):
    from stages.loop.resume import PENDING
    from stages.restore import restore_archived

    src, _, _ = _two_runs(params, tmp_path)
    if case == "missing":
        src = src.with_name("20990101-000000-nothing")
        phrase = "not an archived run (no rounds/ in it); `ls data/archive` lists the runs moved aside"
    elif case == "no rounds":
        shutil.rmtree(src / "rounds")
        phrase = "not an archived run (no rounds/ in it)"
    elif case == "pending":
        write_json({"made": [], "parts": ["rounds"], "from": {"rounds": "/elsewhere/rounds"}}, src / PENDING)
        phrase = "this archive is not final: the run that moved it aside has not completed a round"
    elif case == "another configuration":
        params = repo_params(base={"seed": 99})
        phrase = f"a run of another configuration (identity {repo_params().identity()}) than params.yaml (identity " \
                 f"{params.identity()}); put params.yaml back to the settings that run trained with"
    elif case == "damaged":
        (src / "rounds" / "round=0001" / MANIFEST).write_text("{garbage")
        phrase = (f"this archived run cannot be continued: {src / 'rounds' / 'round=0001' / MANIFEST}: unreadable "
                  "manifest (JSONDecodeError); put that back from a copy of the archive, or leave the archive be")
    elif case == "no complete round":
        shutil.rmtree(src / "policy")
        for m in (src / "rounds").glob(f"*/{MANIFEST}"):
            m.unlink()
        phrase = "this archived run has no complete round: there is nothing to continue"
    else:
        src = Path(params.train.rounds_dir).parent  # `data`: it holds rounds/ (the run in place) and the archives
        phrase = "data: overlaps train.rounds_dir (data/rounds), an output dir; name the dir of an archived run"
    before = _snapshot(tmp_path)
    with pytest.raises(PipelineError) as exc:
        restore_archived(params, src)
    assert phrase in one_line(exc) and "dvc checkout" not in str(exc.value)
    assert _snapshot(tmp_path) == before


def test_a_restore_killed_before_its_marker_is_undone_by_the_next_start(params, tmp_path, monkeypatch):
    """Killed (no handler runs) after the run in place moved aside and before the restore's own marker: the next
    start (restore_interrupted) puts the run that was in place back; the archived run is where it was."""
    from stages import io, restore
    from stages.loop import resume

    src, _, _ = _two_runs(params, tmp_path)
    before = _snapshot(tmp_path)
    real = io.write_json

    def killed(obj, dest):
        if Path(dest).name == resume.RESTORING:
            raise SystemExit("killed")  # a kill -9 runs no handler: nothing after this point happens
        return real(obj, dest)

    monkeypatch.setattr(io, "write_json", killed)
    with pytest.raises(SystemExit):
        restore.restore_archived(params, src)
    assert not (tmp_path / params.train.rounds_dir).exists()  # the run in place is archived, with its marker
    assert resume.restore_interrupted(params)
    assert _snapshot(tmp_path) == before


def _restore_killed_after(monkeypatch, params, src: Path, moves: int) -> None:
    """`restore_archived(params, src)` killed outright after the first `moves` moves of its swap (a kill -9 runs no
    handler: no undo)."""
    from stages import restore
    from stages.loop import resume

    def killed(places, src, parts, params, moved):
        for name in [n for n in ("state", "policy", "rounds") if n in parts][:moves]:
            resume.move_in(src, name, places[name])
        raise SystemExit("killed")

    with monkeypatch.context() as m:
        m.setattr(restore, "_swap_in", killed)
        with pytest.raises(SystemExit):
            restore.restore_archived(params, src)


@pytest.mark.parametrize("moves", [0, 1, 2])
def test_a_restore_killed_midway_is_finished_by_the_next_start(params, tmp_path, monkeypatch, caplog, moves):
    """Killed after its marker, before the first move, between two moves or before the rounds (the last): the next
    start finishes the swap, as the restore would have left it: the archived run in place, whole, the other run a
    final archive, no marker left anywhere, once."""
    from stages.loop import resume

    tp = params.train
    src, mine, other = _two_runs(params, tmp_path)
    _restore_killed_after(monkeypatch, params, src, moves)
    assert (src / resume.RESTORING).exists()
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert resume.restore_interrupted(params)
    aside = next(d for d in Path(tp.archive_dir).iterdir())
    assert f"a restore of {src} was killed midway: finished, the archived run is in the output dirs and the run " \
           f"that was there in {aside}" in caplog.text
    assert not src.exists() and not list(Path(tp.archive_dir).glob("*/.*.json"))  # no marker: every archive final
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(tp.archive_dir)} == mine
    assert len(resume.complete_rounds(aside / "rounds")) == 1 and len(_snapshot(tmp_path)) == len(mine) + len(other)
    assert plan_resume(params, params.identity()).start == 2
    assert not resume.restore_interrupted(params)  # done once


def test_a_killed_restore_into_empty_output_dirs_is_finished_too(params, tmp_path, monkeypatch, caplog):
    """Nothing was in place (no run moved aside: the marker's `aside` is null): the parts left move in, nothing else."""
    from stages.loop import resume

    tp = params.train
    src, mine, _ = _two_runs(params, tmp_path)
    for d in (tp.rounds_dir, tp.checkpoint_dir):
        shutil.rmtree(tmp_path / d)
    _restore_killed_after(monkeypatch, params, src, 1)
    with caplog.at_level(logging.WARNING, logger="stages.loop.resume"):
        assert resume.restore_interrupted(params)
    assert f"a restore of {src} was killed midway: finished, the archived run is in the output dirs\n" in caplog.text
    assert _snapshot(tmp_path) == mine and not src.exists()


def test_running_a_killed_restore_again_finds_it_finished(params, tmp_path, monkeypatch, caplog):
    """The same `python -m stages.restore DIR` again after the kill: its start-up step finishes the swap, and the
    command says so instead of refusing a dir that is gone."""
    from stages import restore

    tp = params.train
    src, mine, _ = _two_runs(params, tmp_path)
    _restore_killed_after(monkeypatch, params, src, 2)
    with caplog.at_level(logging.WARNING, logger="stages.restore"):
        assert restore.restore_archived(params, src) == (2, None)
    assert f"{src}: its run was already moved back into the output dirs" in caplog.text
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(tp.archive_dir)} == mine


def test_a_restore_of_another_dir_after_a_killed_one_checks_its_own_dir(params, tmp_path, monkeypatch):
    """The start-up step finishes the killed restore of one dir; the dir named (a typo here) is still checked as its
    own: refused, not reported as moved back."""
    from stages import restore

    tp = params.train
    src, mine, _ = _two_runs(params, tmp_path)
    _restore_killed_after(monkeypatch, params, src, 0)
    with pytest.raises(PipelineError, match="20990101-000000-typo: not an archived run"):
        restore.restore_archived(params, src.with_name("20990101-000000-typo"))
    assert not src.exists()  # finished all the same
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(tp.archive_dir)} == mine


@pytest.mark.parametrize("blocked", ["state", "policy", "rounds"])
def test_a_killed_restore_that_cannot_be_finished_stops_the_start_and_moves_nothing(params, tmp_path, monkeypatch,
                                                                                    blocked):
    """Something of yours in an output dir the killed restore had not reached yet (any of them: each is checked
    before the first moves): the start stops with one line naming the marker, the dir and every move left, and
    moves nothing."""
    from stages.loop import resume

    src, _, _ = _two_runs(params, tmp_path)
    _restore_killed_after(monkeypatch, params, src, 0)
    (src / "state").mkdir(exist_ok=True)  # the archived run has all three parts
    (src / "state" / "state-c2.pt").write_bytes(b"mine")
    place = tmp_path / resume.output_dirs(params)[blocked]
    place.mkdir(parents=True, exist_ok=True)
    (place / "notes.txt").write_text("yours")
    before = _snapshot(tmp_path)
    with pytest.raises(PipelineError) as exc:
        resume.restore_interrupted(params)
    dirs = resume.output_dirs(params)
    moves = ", ".join(f"{src / n} to {dirs[n]}" for n in ("state", "policy", "rounds"))
    assert one_line(exc) == (f"{src / resume.RESTORING}: a restore of {src} was killed midway and {dirs[blocked]} is "
                             f"no longer empty; finish it by hand (move {moves} once that holds nothing you need), "
                             "then delete this file")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["{garbage", '{"from": {}, "parts": "rounds", "aside": null}',
                                    '{"from": {}, "parts": ["rounds"], "aside": 3}'])
def test_a_damaged_restore_marker_stops_the_start_and_moves_nothing(params, tmp_path, monkeypatch, damage):
    """The restore's marker unreadable or not one this version writes (it is written atomically: damaged by hand):
    whose it is cannot be known, so the start stops with one line saying what to move, and moves nothing."""
    from stages.loop import resume

    src, _, _ = _two_runs(params, tmp_path)
    _restore_killed_after(monkeypatch, params, src, 1)
    (src / resume.RESTORING).write_text(damage)
    before = _snapshot(tmp_path)
    with pytest.raises(PipelineError) as exc:
        resume.restore_interrupted(params)
    assert one_line(exc) == (
        f"{src / resume.RESTORING}: unreadable; it marks a restore of {src} that was killed midway: move each part left "
        f"in {src} to the output dir of the checkout that ran it (rounds/ to train.rounds_dir, policy/ to "
        "train.checkpoint_dir, state/ to train.state_dir), then delete this file")
    assert _snapshot(tmp_path) == before


def test_another_checkouts_killed_restore_is_left_to_it_and_its_archive_refused(params, tmp_path):
    """A restore marker that names other output dirs (another checkout sharing the archive dir): a start here leaves
    it be, and restoring that dir here is refused until a start with those dirs has finished it."""
    from stages.loop import resume
    from stages.restore import restore_archived

    src, _, _ = _two_runs(params, tmp_path)
    write_json({"from": {"rounds": "/elsewhere/rounds"}, "parts": ["rounds"], "aside": None}, src / resume.RESTORING)
    before = _snapshot(tmp_path)
    assert not resume.restore_interrupted(params)
    assert _snapshot(tmp_path) == before
    with pytest.raises(PipelineError) as exc:
        restore_archived(params, src)
    assert one_line(exc) == (f"{src}: a restore of this archive into other output dirs (the ones its "
                             f"{resume.RESTORING} names: another checkout's or another params file's) was killed "
                             "midway; the next start with those output dirs finishes it (if they are gone, delete "
                             "that file)")
    assert _snapshot(tmp_path) == before


def test_restoring_a_pending_archive_of_this_checkout_finds_it_already_back(params, tmp_path, caplog):
    """The archive's marker is this checkout's (its replacement was killed in round 1): the start-up step every
    command runs first moves it back, and the restore says so instead of refusing a dir that is gone."""
    from stages.loop.resume import archive_run
    from stages.restore import restore_archived

    write_round(params.train, 0, identity=params.identity())
    before = _snapshot(tmp_path)
    src = archive_run(params, {"identity": params.identity(), "rounds": 1}).dest
    with caplog.at_level(logging.WARNING, logger="stages.restore"):
        assert restore_archived(params, src) == (1, None)
    assert f"{src}: its run was already moved back into the output dirs" in caplog.text
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kill_in_undo", [False, True])
def test_a_restore_that_fails_midway_puts_both_runs_back(params, tmp_path, monkeypatch, kill_in_undo):
    """A move that fails (a permission) after the archived run's state and policy moved: they go back to the archive,
    the restore's marker goes, the run that was in place comes back, and the error goes on. Killed in the undo right
    after the archived run is whole again: the next start puts the run that was in place back (its own marker)."""
    from stages import restore
    from stages.loop import resume

    src, _, _ = _two_runs(params, tmp_path)
    before = _snapshot(tmp_path)
    real = resume.rename_part

    def fails_at_the_rounds(a, b):
        if Path(a) == src / "rounds":
            raise PermissionError(13, "Permission denied", a)
        return real(a, b)

    def killed(*a):
        raise SystemExit("killed")

    with monkeypatch.context() as m:
        m.setattr(resume, "rename_part", fails_at_the_rounds)
        if kill_in_undo:
            m.setattr(resume, "restore_run", killed)
        with pytest.raises(SystemExit if kill_in_undo else PermissionError):
            restore.restore_archived(params, src)
    assert not (src / resume.RESTORING).exists()
    if kill_in_undo:
        assert resume.restore_interrupted(params)
    assert _snapshot(tmp_path) == before


def test_moving_a_run_between_filesystems_is_refused_before_anything_moves(params, tmp_path, monkeypatch):
    """The archive dir on another filesystem than an output dir: a rename cannot cross, and a copy could be left half
    done, so moving a run aside (and restoring one) stops with one line first, nothing moved or made."""
    from stages.loop import resume
    from stages.restore import restore_archived

    tp = params.train
    src, _, _ = _two_runs(params, tmp_path)
    before = _snapshot(tmp_path)
    real = resume._filesystem
    monkeypatch.setattr(resume, "_filesystem", lambda p: -1 if "archive" in str(p) else real(p))
    with pytest.raises(PipelineError) as planned:  # at the plan, before the warm load
        plan_resume(params, params.identity())
    with pytest.raises(PipelineError) as exc:
        resume.archive_run(params, {"identity": "other", "rounds": 1})
    assert one_line(planned) == one_line(exc) == (f"train.archive_dir ({tp.archive_dir}) and train.rounds_dir ({tp.rounds_dir}) are on "
                             "different filesystems: a run moves between them by renames, which cannot cross "
                             "filesystems (a copy could be left half done by a kill or a full disk); set "
                             "train.archive_dir to a dir on the filesystem of the output dirs")
    for d in (tp.rounds_dir, tp.checkpoint_dir):
        shutil.rmtree(tmp_path / d)  # nothing in place to move aside: the restore checks its own moves
    with pytest.raises(PipelineError, match=f"^the archived run \\({src}\\) and train.rounds_dir .* are on different "
                                            "filesystems: .*; move it \\(mv\\) to that filesystem, or set the output "
                                            "dirs there, then restore$"):
        restore_archived(params, src)
    assert {k: v for k, v in _snapshot(tmp_path).items() if k.startswith(tp.archive_dir)} == {
        k: v for k, v in before.items() if k.startswith(tp.archive_dir)}


def test_restore_cli(params, tmp_path):
    """`python -m stages.restore DIR`: one line saying what moved and how to continue; bad input one line, exit 2."""
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    src, _, _ = _two_runs(params, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params_data()))
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "stages.restore", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True)
    bad = run("data/archive/nothing")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: data/archive/nothing: not an archived run (no rounds/ in it); `ls data/archive` lists the runs moved "
        "aside, named <time>-<identity>")
    (tmp_path / "params.yaml").rename(tmp_path / "mine.yaml")  # another params file: `dvc repro` would not read it
    ok = run(str(src), "--params", "mine.yaml")
    assert ok.returncode == 0, ok.stderr
    aside = next(p for p in (tmp_path / params.train.archive_dir).iterdir())
    assert ok.stdout.strip() == (f"restored {src} (2 complete rounds); the run that was there is in "
                                 f"{Path(params.train.archive_dir) / aside.name}. Continue it with "
                                 "`python -m flows.train --params mine.yaml`")


def test_the_restore_says_how_to_continue_even_past_train_rounds():
    """Fewer rounds than the params file asks: the plain command (and `dvc repro` for params.yaml, the file it reads);
    as many or more: `--rounds N` with N past them (a plain start would refuse or have nothing to train)."""
    from stages.restore import _how_to_continue

    assert _how_to_continue("params.yaml", 2, 12) == "Continue it with `python -m flows.train` or `dvc repro`"
    assert _how_to_continue("my params.yaml", 2, 12) == "Continue it with `python -m flows.train --params 'my params.yaml'`"
    assert _how_to_continue("params.yaml", 22, 12) == (
        "It has 22 rounds and train.rounds asks for 12: train more with `python -m flows.train --rounds N` (N > 22) or "
        "raise train.rounds in params.yaml and `dvc repro`")
    assert _how_to_continue("mine.yaml", 12, 12) == (
        "It has 12 rounds and train.rounds asks for 12: train more with `python -m flows.train --params mine.yaml "
        "--rounds N` (N > 12)")

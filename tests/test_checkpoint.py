"""stages.checkpoint: save and resume continue identically (full and LoRA), the saved LoRA policy is the trained
model, no code runs from a checkpoint (a real malicious pickle is refused), bad and mismatched checkpoints are one-line
errors, a full disk leaves the previous checkpoint intact, and staging dirs of a killed writer are cleaned."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil

import pytest
import torch
from test_update import CPU, lora_params, make_batch, make_params, weights

from conftest import make_tiny_model
from stages import checkpoint
from stages.errors import PipelineError
from stages.io import write_json
from stages.update import load_trainer


def save(trainer, tmp_path, **meta):
    return checkpoint.save(trainer, tmp_path / "policy", tmp_path / "state", {"identity": "run-a", **meta})


@pytest.mark.parametrize("use_lora", [False, True])
def test_save_and_resume_continue_identically(tiny_model_dir, tmp_path, use_lora):
    params = lora_params(tiny_model_dir) if use_lora else make_params(tiny_model_dir)
    a, meta0 = load_trainer(params, CPU)
    assert meta0 is None
    batch = make_batch(a, [1.0, -0.5, 0.3, 2.0])
    a.step(batch)
    meta = save(a, tmp_path, note="after step 1")
    assert (tmp_path / "policy" / "config.json").is_file()
    assert checkpoint.read_meta(tmp_path / "policy") == meta and meta["round"] == 1 and meta["note"] == "after step 1"
    a.step(batch)

    b, got = load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    assert got["checkpoint_id"] == meta["checkpoint_id"] and b.round == 1
    b.step(batch)
    assert b.round == a.round == 2
    wa, wb = weights(a.model), weights(b.model)
    assert set(wa) == set(wb)
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=0, atol=1e-6, msg=n)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert [int(s["step"]) for s in sa.values()] == [int(s["step"]) for s in sb.values()]
    assert {int(s["step"]) for s in sb.values()} == {2}
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    again = save(b, tmp_path)  # the next checkpoint replaces this one: its state file goes, no staging mark stays
    assert again["replaces"] == meta["checkpoint_id"] and "replaces" not in meta
    assert [p.name for p in (tmp_path / "state").iterdir()] == [f"state-{again['checkpoint_id']}.pt"]
    assert not (tmp_path / "policy" / checkpoint.STATE_MARK).exists()


def test_state_file_is_written_without_crc_and_the_option_is_restored(tiny_model_dir, tmp_path):
    """The state's zip records carry no CRC-32 (torch.load never checks it; computing it was most of the write's CPU):
    the file still loads to the same optimizer state, and torch's process-wide option is as it was, error or not."""
    import zipfile

    import torch.serialization as ts

    if not hasattr(ts, "set_crc32_options"):
        pytest.skip("torch < 2.6 has no CRC-32 option (the CPU install pins 2.13)")
    trainer, _ = load_trainer(make_params(tiny_model_dir), CPU)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    before = ts.get_crc32_options()
    try:
        ts.set_crc32_options(True)
        meta = save(trainer, tmp_path)
        assert ts.get_crc32_options() is True
        path = checkpoint.state_file(tmp_path / "state", meta["checkpoint_id"])
        records = zipfile.ZipFile(path).infolist()
        assert records and all(r.CRC == 0 for r in records)
        got = torch.load(path, weights_only=True)["optimizer"]["state"]
        for k, v in trainer.optimizer.state_dict()["state"].items():
            assert torch.equal(got[k]["exp_avg"], v["exp_avg"]) and torch.equal(got[k]["exp_avg_sq"], v["exp_avg_sq"])
        with pytest.raises(RuntimeError, match="boom"), checkpoint._no_crc32():
            assert ts.get_crc32_options() is False
            raise RuntimeError("boom")
        assert ts.get_crc32_options() is True
    finally:
        ts.set_crc32_options(before)


def test_saved_lora_policy_loads_as_the_trained_model(tiny_model_dir, tmp_path):
    """What vLLM and evaluate load (a plain model dir) gives the trainer's logits; the base weights did not move."""
    from transformers import AutoModelForCausalLM

    trainer, _ = load_trainer(lora_params(tiny_model_dir), CPU)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    trainer.step(make_batch(trainer, [-1.0, 0.5, 2.0, -0.3]))
    save(trainer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([trainer.tokenizer("<user> the movie was great <eos> <assistant> i loved it")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-4  # the adapter is in the saved weights
    assert (tmp_path / "policy" / "adapter" / "adapter_config.json").is_file()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_state_whose_pickle_runs_code_is_refused(tiny_model_dir, tmp_path):
    params = make_params(tiny_model_dir)
    trainer, _ = load_trainer(params, CPU)
    meta = save(trainer, tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = checkpoint.state_file(tmp_path / "state", meta["checkpoint_id"])
    state = trainer.resume_state()
    state["optimizer"] = evil
    with open(path, "wb") as fh:  # what torch.save would write, with a payload that calls os.system on load
        torch.save(state, fh, pickle_module=pickle)
    # the file as its checkpoint recorded it (its size), so it is torch.load that meets the payload
    write_json(meta | {"state_bytes": path.stat().st_size}, tmp_path / "policy" / checkpoint.META)
    with pytest.raises(PipelineError) as exc:
        load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    msg = str(exc.value)
    assert "\n" not in msg and "refused or unreadable trainer state" in msg and "--restart" in msg
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_corrupt_or_missing_state_and_bad_metadata_are_one_line_errors(tiny_model_dir, tmp_path):
    params = make_params(tiny_model_dir)
    trainer, _ = load_trainer(params, CPU)
    meta = save(trainer, tmp_path)
    path = checkpoint.state_file(tmp_path / "state", meta["checkpoint_id"])
    size = path.stat().st_size
    assert meta["state_bytes"] == size
    path.write_bytes(b"not a torch file")
    with pytest.raises(PipelineError) as exc:
        load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    assert str(exc.value) == (f"{path}: has 16 bytes, the checkpoint at round 0 recorded {size}: damaged or replaced; "
                              "remove it and run again (the training run rebuilds it by replaying its rounds from "
                              "the base model), or start over with: python -m flows.train --restart")
    path.write_bytes(b"x" * size)
    with pytest.raises(PipelineError, match="refused or unreadable trainer state"):
        load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    path.unlink()
    with pytest.raises(PipelineError, match=r"train.state_dir: .* is missing: .* not there") as exc:
        load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    assert "start over with: python -m flows.train --restart" in str(exc.value)
    # the checkpoint came back (a `dvc checkout`) after its run was moved to the archive: the state is there
    archived = tmp_path / "archive" / "20261205-003800-674409c332225635" / "state" / path.name
    archived.parent.mkdir(parents=True)
    archived.write_bytes(b"state")
    meta = checkpoint.read_meta(tmp_path / "policy")
    with pytest.raises(PipelineError, match="a run moved to the archive holds it") as exc:
        checkpoint.load_state(tmp_path / "state", meta, archive_dir=tmp_path / "archive")
    assert f"`mkdir -p {path.parent} && cp {archived} {path}` and run again" in str(exc.value)
    (tmp_path / "policy" / checkpoint.META).write_text("{garbage")
    with pytest.raises(PipelineError, match=r"checkpoint.json: unreadable checkpoint metadata") as exc:
        checkpoint.read_meta(tmp_path / "policy")
    # the granular restore of that file (a damaged copy is in the way: --force), not of the whole dir
    assert f"`dvc checkout --force {tmp_path / 'policy' / checkpoint.META}`" in str(exc.value)
    (tmp_path / "policy" / checkpoint.META).unlink()
    with pytest.raises(PipelineError, match="not empty but holds no checkpoint.json") as exc:
        checkpoint.read_meta(tmp_path / "policy")
    # its own checkpoint whose checkpoint.json went: the way back is named too (moving the dir away led to "round N
    # wrote a checkpoint, but the checkpoint is missing")
    assert str(exc.value).endswith(f"if it is, restore it with `dvc checkout {tmp_path / 'policy' / checkpoint.META}` "
                                   "(DVC's copy, when DVC cached this checkpoint) or start over: python -m flows.train "
                                   "--restart")
    assert checkpoint.read_meta(tmp_path / "absent") is None


def test_model_files_changed_since_the_checkpoint_are_refused(tiny_model_dir, tmp_path):
    """checkpoint.json records each model file's size and CRC-32 as the save wrote it: one changed in place since
    (here one weight, as a save_pretrained of other weights into the dir would) stops the resume with the file and
    the fix, instead of resuming from weights the optimizer state and the rounds never saw."""
    import zlib

    params = make_params(tiny_model_dir)
    trainer, _ = load_trainer(params, CPU)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    meta = save(trainer, tmp_path)
    model = tmp_path / "policy" / "model.safetensors"
    data = bytearray(model.read_bytes())
    assert meta["files"] == {"model.safetensors": {"bytes": len(data), "crc32": zlib.crc32(data)}}
    assert load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")[1] == meta  # as written: loads
    data[-4000] ^= 0x40  # one bit of one weight
    model.write_bytes(bytes(data))
    fix = (f"restore it with `dvc checkout --force {model}` (DVC's copy, when DVC cached this checkpoint) or start "
           "over: python -m flows.train --restart")
    with pytest.raises(PipelineError) as exc:
        load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    assert str(exc.value) == (f"train.checkpoint_dir: {model} does not match the CRC-32 its checkpoint.json recorded: "
                              f"changed since the checkpoint at round 1 was written; {fix}")
    model.write_bytes(bytes(data[:-8]))
    with pytest.raises(PipelineError, match=rf"{model} has {len(data) - 8} bytes, its checkpoint.json recorded "
                                            rf"{len(data)}: changed since"):
        load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    # a checkpoint from before the record: not checked
    write_json({k: v for k, v in meta.items() if k != "files"}, tmp_path / "policy" / "checkpoint.json")
    checkpoint.verify_model(tmp_path / "policy", checkpoint.read_meta(tmp_path / "policy"))


def test_checkpoint_of_a_different_base_is_rejected(tiny_model_dir, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=32)
    trainer, _ = load_trainer(make_params(other), CPU)
    save(trainer, tmp_path)
    with pytest.raises(PipelineError, match="checkpoint of a different base model"):
        load_trainer(make_params(tiny_model_dir), CPU, tmp_path / "policy", tmp_path / "state")


def test_a_new_checkpoint_replaces_the_old_pair(tiny_model_dir, tmp_path):
    trainer, _ = load_trainer(make_params(tiny_model_dir), CPU)
    first = save(trainer, tmp_path)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    second = save(trainer, tmp_path)
    assert [p.name for p in (tmp_path / "state").iterdir()] == [f"state-{second['checkpoint_id']}.pt"]
    assert first["checkpoint_id"] != second["checkpoint_id"] and second["round"] == 1


def test_a_checkpoint_write_keeps_a_file_the_pipeline_did_not_write(tiny_model_dir, tmp_path, caplog):
    """A user's file in train.checkpoint_dir was deleted by the next write (the old dir is replaced whole): it is
    carried into each new checkpoint, said once."""
    trainer, _ = load_trainer(make_params(tiny_model_dir), CPU)
    save(trainer, tmp_path)
    (tmp_path / "policy" / "NOTES.md").write_text("mine")
    (tmp_path / "policy" / "evals").mkdir()
    (tmp_path / "policy" / "evals" / "a.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="stages.checkpoint"):
        for _ in range(2):
            trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
            meta = save(trainer, tmp_path)
    assert (tmp_path / "policy" / "NOTES.md").read_text() == "mine"
    assert (tmp_path / "policy" / "evals" / "a.json").read_text() == "{}"
    assert checkpoint.read_meta(tmp_path / "policy")["checkpoint_id"] == meta["checkpoint_id"] and meta["round"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'policy'}: kept NOTES.md, evals in the new checkpoint: not the pipeline's files (each checkpoint "
        "write carries them over; move them out of train.checkpoint_dir to keep them apart)"]


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    trainer, _ = load_trainer(make_params(tiny_model_dir), CPU)
    first = save(trainer, tmp_path)
    before = (tmp_path / "policy" / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(trainer), "save_model", full)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    with pytest.raises(PipelineError) as exc:
        save(trainer, tmp_path)
    assert "disk full while writing the checkpoint" in str(exc.value) and "\n" not in str(exc.value)
    assert checkpoint.read_meta(tmp_path / "policy")["checkpoint_id"] == first["checkpoint_id"]
    assert (tmp_path / "policy" / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "state").iterdir()] == [f"state-{first['checkpoint_id']}.pt"]
    assert not list(tmp_path.glob(".policy.tmp-*"))  # no partial checkpoint left behind


def test_clean_staging_removes_only_what_a_writer_leaves(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / ".policy.tmp-abc").mkdir()
    (tmp_path / ".policy.old-def").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / ".state-x.pt.tmp").write_bytes(b"x")
    keep = [tmp_path / "policy", tmp_path / ".other.tmp-1", tmp_path / "notes.txt"]
    keep[1].mkdir()
    keep[2].write_text("mine")
    removed = checkpoint.clean_staging(tmp_path / "policy", tmp_path / "state")
    assert len(removed) == 3
    assert all(p.exists() for p in keep)


def test_a_staging_dir_that_cannot_be_removed_is_said_not_claimed_removed(tmp_path, monkeypatch, caplog):
    stuck = tmp_path / ".policy.old-abc"
    (stuck / "d").mkdir(parents=True)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda p, ignore_errors=False: None)  # an immutable file inside
    with caplog.at_level(logging.INFO, logger="stages.checkpoint"):
        assert checkpoint.clean_staging(tmp_path / "policy") == []
    assert [r.getMessage() for r in caplog.records] == [
        f"could not remove 1 staging dir(s) left by an interrupted or refused write: {stuck}; remove them by hand "
        "(they hold a copy of a checkpoint)"]


def test_a_write_killed_between_its_renames_puts_the_old_checkpoint_back(tmp_path):
    """replace_dir moves the old policy aside, then the new one in: killed between the two, only the old copy is
    complete in place (its state file is still there); it goes back instead of being removed as staging."""
    aside = tmp_path / ".policy.old-abc" / "d"
    aside.mkdir(parents=True)
    (aside / "checkpoint.json").write_text("{}")
    (tmp_path / ".policy.tmp-new").mkdir()
    assert checkpoint.put_back_moved_aside(tmp_path / "policy")
    assert (tmp_path / "policy" / "checkpoint.json").read_text() == "{}"
    assert not checkpoint.put_back_moved_aside(tmp_path / "policy")  # in place: nothing to do
    checkpoint.clean_staging(tmp_path / "policy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_only_the_state_files_an_interrupted_write_left_are_removed(tmp_path):
    """A write killed after its state file and before its rename names that file in its staging dir; one killed after
    the rename leaves the replaced checkpoint's, named in checkpoint.json (`replaces`). Those go at the next start;
    the state the checkpoint pairs with and every other file (another run's, python -m stages.update's) stay."""
    state = tmp_path / "state"
    state.mkdir()
    names = {n: state / f"state-{n * 12}.pt" for n in "abcd"}
    for p in names.values():
        p.write_bytes(b"x")
    (state / "notes.txt").write_text("mine")
    staging = tmp_path / ".policy.tmp-xyz"
    staging.mkdir()
    (staging / checkpoint.STATE_MARK).write_text("b" * 12)
    assert checkpoint.clean_orphan_states(tmp_path / "policy", state) == [names["b"]]  # no checkpoint in place
    (tmp_path / "policy").mkdir()
    write_json({"format": checkpoint.FORMAT, "round": 1, "checkpoint_id": "a" * 12, "replaces": "c" * 12},
               tmp_path / "policy" / "checkpoint.json")
    assert checkpoint.clean_orphan_states(tmp_path / "policy", state) == [names["c"]]
    assert sorted(p.name for p in state.iterdir()) == sorted([names["a"].name, names["d"].name, "notes.txt"])
    # a write killed after it took its mark away to move its staging dir into place (between replace_dir's two
    # renames): its checkpoint.json there names its state
    shutil.rmtree(staging)
    staging = tmp_path / ".policy.tmp-uvw"
    staging.mkdir()
    write_json({"format": checkpoint.FORMAT, "round": 2, "checkpoint_id": "d" * 12, "replaces": "a" * 12},
               staging / "checkpoint.json")
    assert checkpoint.clean_orphan_states(tmp_path / "policy", state) == [names["d"]]
    assert sorted(p.name for p in state.iterdir()) == sorted([names["a"].name, "notes.txt"])


# ---------------------------------------------------------------- the direct writer (O_DIRECT, fsync)


def tensors_of_every_kind() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(257, 33, generator=g), "bf16": torch.randn(5, 7, generator=g).bfloat16(),
            "half": torch.randn(3, generator=g).half(), "ids": torch.arange(11), "mask": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "t": torch.randn(6, 4, generator=g).t()}


@pytest.mark.parametrize("direct", [True, False])
def test_direct_file_writes_exactly_what_torch_save_wrote(tmp_path, monkeypatch, direct):
    if not direct:  # a filesystem that refuses O_DIRECT: the same bytes, written buffered
        real_open = os.open

        def no_direct(path, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)

        monkeypatch.setattr(os, "open", no_direct)
    obj = {"round": 3, "x": tensors_of_every_kind(), "big": torch.randn(3 * checkpoint.DirectFile.CHUNK // 4 + 1001)}
    with checkpoint.DirectFile(tmp_path / "a.pt") as f:
        torch.save(obj, f)
    assert f.direct is direct and f.size == (tmp_path / "a.pt").stat().st_size  # cut to size after the padded tail
    got = torch.load(tmp_path / "a.pt", weights_only=True)
    assert got["round"] == 3 and torch.equal(got["big"], obj["big"])
    assert all(torch.equal(got["x"][k], v) for k, v in obj["x"].items())


def test_save_safetensors_is_read_by_safetensors_with_its_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = tensors_of_every_kind()
    checkpoint.save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in tensors)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    data = sum(t.numel() * t.element_size() for t in tensors.values())  # the bytes after the 8-aligned header
    size = (tmp_path / "ours.safetensors").stat().st_size
    assert (size - data) % 8 == 0 and size - data - 8 == int.from_bytes((tmp_path / "ours.safetensors").read_bytes()[:8], "little")


def test_the_checkpoints_model_dir_is_the_one_transformers_writes(tiny_model_dir, tmp_path):
    """save() writes the weights through save_safetensors inside transformers' save_pretrained: the same files and
    tensors as a plain save_pretrained, and transformers' own writer is back afterwards."""
    import transformers.modeling_utils as mu
    from safetensors.torch import load_file

    trainer, _ = load_trainer(make_params(tiny_model_dir), CPU)
    trainer.step(make_batch(trainer, [1.0, -0.5, 0.3, 2.0]))
    save(trainer, tmp_path)
    trainer.save_model(tmp_path / "plain")
    assert mu.safe_save_file is not checkpoint.save_safetensors
    ours, plain = tmp_path / "policy", tmp_path / "plain"
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in ours.iterdir() if p.name != checkpoint.META)
    a, b = load_file(ours / "model.safetensors"), load_file(plain / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_state_write_leaves_no_state_file(tiny_model_dir, tmp_path, monkeypatch):
    """A state write interrupted midway (Ctrl-C during torch.save) leaves no partial state-*.pt: it wrote to a
    temporary file."""
    trainer, _ = load_trainer(make_params(tiny_model_dir), CPU)

    def interrupted(obj, f, *a, **k):
        f.write(b"x" * 4096)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(trainer, tmp_path / "policy", tmp_path / "state", {"identity": "run-a"})
    assert not list((tmp_path / "state").glob("state-*.pt"))


def test_resume_with_lora_dropout_continues_identically(tiny_model_dir, tmp_path):
    """With LoRA dropout (random draws in every step), a resumed trainer restores the torch RNG: its next step is
    the uninterrupted one's."""
    params = lora_params(tiny_model_dir, lora_dropout=0.3)
    a, _ = load_trainer(params, CPU)
    batch = make_batch(a, [1.0, -0.5, 0.3, 2.0])
    a.step(batch)
    checkpoint.save(a, tmp_path / "policy", tmp_path / "state", {"identity": "run-a"})
    a.step(batch)
    b, _ = load_trainer(params, CPU, tmp_path / "policy", tmp_path / "state")
    b.step(batch)
    wa, wb = weights(a.model), weights(b.model)
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=0, atol=1e-6, msg=n)

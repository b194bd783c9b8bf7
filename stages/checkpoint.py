"""The policy checkpoint: the one owner of its format (docs/design.md §6). Save, load, and read its round and
run identity without loading any weights.

A checkpoint is a pair of directories:

- `train.checkpoint_dir` (versioned by DVC, shared with `dvc push`): the policy as a normal transformers model
  directory (config, safetensors, tokenizer, chat template) that vLLM, transformers and the evaluate stage load,
  plus `checkpoint.json`: format, round (updates done), run identity, base-model fingerprint, LoRA flag, a random
  checkpoint id, and the manifest of the round it closes. With LoRA the weights are merged (what vLLM loads) and
  the adapter is kept in `adapter/` (peft's layout).
- `train.state_dir` (outside the DVC cache: it is twice the weights' size and only a resume needs it):
  `state-<checkpoint id>.pt`, the optimizer, scheduler and RNG state (and the LoRA adapter's tensors) that make a
  resume exact. It is read with `torch.load(weights_only=True)`: a file whose pickle would run code is refused.

Both big files (the state, and the model's safetensors inside transformers' `save_pretrained`) are written
through `DirectFile`: `O_DIRECT` from one aligned buffer, then fsync, so a checkpoint is on disk when `save`
returns and costs little CPU (docs/design.md §6).

Order of writes: the state file (a new name) -> the model dir (staged beside it, then renamed into place) -> the
state file of the checkpoint it replaced is removed (only that one: another run's states are never touched). A crash at any point leaves a matching pair: the old one or the new
one. Staging dirs left by a killed writer (`.<name>.tmp-*`) are removed by `clean_staging` when a run starts
(under the run lock, so never while another writer works). A full disk is one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import shutil
import threading
import zlib
import time
import uuid
from pathlib import Path
from typing import Any

from stages.errors import FREE_SPACE, PipelineError, checkout_fix, disk_full, free_gib, restart_command

log = logging.getLogger(__name__)

FORMAT = 1
META = "checkpoint.json"
STATE_MARK = ".state-id"  # in a checkpoint's staging dir while it is written: the id of the state file it writes


def state_file(state_dir: str | Path, checkpoint_id: str) -> Path:
    return Path(state_dir) / f"state-{checkpoint_id}.pt"


def _disk_error(exc: BaseException, path: Path) -> PipelineError | None:
    """A one-line error for a full disk (or quota), else None. torch.save reports it as a RuntimeError."""
    full = disk_full(exc) is not None or (isinstance(exc, RuntimeError) and "file write failed" in str(exc))
    if not full:
        return None
    return PipelineError(f"{path}: disk full while writing the checkpoint ({free_gib(path) or '?'} GiB free); the "
                         f"previous checkpoint is intact: {FREE_SPACE} to resume")


def save(trainer, policy_dir: str | Path, state_dir: str | Path, meta: dict[str, Any], rng: dict | None = None,
         gathered: dict | None = None) -> dict:
    """Write `trainer`'s policy to `policy_dir` and its resume state to `state_dir`; returns the checkpoint.json
    written. `meta` carries the run identity, round and manifest; `rng`: the RNG state to record (default: now;
    the flow passes the one taken when the round ended, as it writes from a background thread); `gathered`: the
    whole state of a sharded (FSDP) trainer, taken by every rank beforehand (`Trainer.gathered_state`)."""
    import torch

    from stages.runtime import replace_dir, staging_dir

    policy_dir, state_dir = Path(policy_dir), Path(state_dir)
    ckpt_id = uuid.uuid4().hex[:12]
    full_meta = {"format": FORMAT, "checkpoint_id": ckpt_id, "round": trainer.round, "base_id": trainer.base_id,
                 "lora": trainer.up.use_lora, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
    state_dir.mkdir(parents=True, exist_ok=True)
    new_state = state_file(state_dir, ckpt_id)
    old_meta = read_meta(policy_dir) if policy_dir.is_dir() else None
    if old_meta is not None:  # whose state file this write makes stale (removed below, or at the next start)
        full_meta["replaces"] = old_meta["checkpoint_id"]
    tmp = staging_dir(policy_dir)
    try:
        try:
            (tmp / STATE_MARK).write_text(ckpt_id)  # first: a kill from here on leaves the id of its state file
            with _atomic(new_state) as t, DirectFile(t) as f, _no_crc32():
                torch.save(trainer.resume_state(rng, gathered), f)
            _SUMS.files = {}
            try:
                with _direct_model_writes():
                    trainer.save_model(tmp, gathered)
                # what `verify_model` checks at a resume: a model file changed in place since (a save_pretrained into
                # the dir, a damaged disk) keeps its size; CRC-32 as the bytes went out, ~0.2 s for 540 MB
                full_meta["files"] = {str(Path(f).relative_to(tmp)): rec for f, rec in sorted(_SUMS.files.items())}
            finally:
                _SUMS.files = None
            full_meta["state_bytes"] = new_state.stat().st_size
            (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True, default=str) + "\n")
            (tmp / STATE_MARK).unlink()
            for f in tmp.rglob("*"):
                f.chmod(0o755 if f.is_dir() else 0o644)
            _keep_what_is_not_ours(policy_dir, tmp)
            replace_dir(tmp, policy_dir)
        except (OSError, RuntimeError) as exc:
            new_state.unlink(missing_ok=True)
            err = _disk_error(exc, policy_dir)
            if err is not None:
                raise err from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old_meta is not None:  # the new pair is complete: the replaced checkpoint's state belongs to nothing now
        state_file(state_dir, old_meta["checkpoint_id"]).unlink(missing_ok=True)
    return full_meta


_CRC_LOCK = threading.Lock()
_SUMS = threading.local()  # while `save` writes the model: path -> {"bytes", "crc32"} of each file DirectFile wrote


@contextlib.contextmanager
def _no_crc32():
    """`torch.save` without the CRC-32 of each record: `torch.load` never checks it (a flipped byte in a tensor loads
    as is), and computing it cost 0.65 s of CPU per 1.08 GB state file on the AMX Xeon, on the cores the training
    uses (docs/design.md §6). The option is process-wide (torch reads it when a save opens its file): it is restored
    after the save, and saves under it take turns, so overlapping ones cannot restore it in the wrong order. Another
    thread's `torch.save` meanwhile also goes without the CRC, which nothing reading it would miss."""
    import torch.serialization as ts

    if not hasattr(ts, "set_crc32_options"):  # torch < 2.6 always computes it
        yield
        return
    with _CRC_LOCK:
        before = ts.get_crc32_options()
        ts.set_crc32_options(False)
        try:
            yield
        finally:
            ts.set_crc32_options(before)


class DirectFile:
    """A write-only file for `torch.save` that bypasses the page cache (`O_DIRECT`) and is on disk when closed.

    On this machine's ext4 a buffered write costs ~1-2.5 s of kernel CPU per GB (page-cache copies and
    allocation; `sys` time ~ wall), on the same two cores as the training; written through one 32 MB aligned
    buffer with `O_DIRECT` the same 1.08 GB took 0.45 s with ~0.25 s of CPU, fsync included (docs/design.md §6).
    Filesystems without `O_DIRECT` (tmpfs, macOS) get a plain buffered write, fsynced too."""

    CHUNK = 32 << 20  # bytes per write: a multiple of any block size
    BLOCK = 4096

    def __init__(self, path: str | Path):
        import mmap

        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct, self.fd = False, os.open(path, flags, 0o644)
        self.buf = mmap.mmap(-1, self.CHUNK)  # page-aligned, as O_DIRECT needs
        self.view = memoryview(self.buf)
        self.fill = 0
        self.size = 0
        self.path = str(path)
        self.sums = getattr(_SUMS, "files", None)  # a checkpoint's model files record their CRC-32 (`verify_model`)
        self.crc = 0

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n, off = len(src), 0
        while off < n:
            k = min(self.CHUNK - self.fill, n - off)
            self.view[self.fill:self.fill + k] = src[off:off + k]
            self.fill += k
            off += k
            if self.fill == self.CHUNK:
                if self.sums is not None:
                    self.crc = zlib.crc32(self.view[:self.CHUNK], self.crc)
                self._flush(self.CHUNK)
        self.size += n
        return n

    def flush(self) -> None:  # torch.save may call it; the data goes out in whole chunks and at close
        pass

    def _flush(self, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            try:
                done += os.write(self.fd, self.view[done:nbytes])
            except OSError as exc:  # e.g. a partial write left an unaligned rest: go on buffered
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
        self.fill = 0

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.fill and self.sums is not None:
                self.crc = zlib.crc32(self.view[:self.fill], self.crc)
            if self.fill:  # the tail, padded to a whole block, then the file cut to its real size
                padded = -(-self.fill // self.BLOCK) * self.BLOCK if self.direct else self.fill
                self.view[self.fill:padded] = bytes(padded - self.fill)
                self._flush(padded)
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
            if self.sums is not None:
                self.sums[self.path] = {"bytes": self.size, "crc32": self.crc}
        finally:
            os.close(self.fd)
            self.fd = -1
            self.view.release()
            self.buf.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_safetensors(tensors: dict, filename: str | Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` written through `DirectFile`: the same format (8-byte header length, JSON
    header, the tensors' bytes), without safetensors' in-memory copy of the whole file or the page cache."""
    import torch

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    flat, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        flat.append(t.reshape(-1).view(torch.uint8))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # the data starts 8-aligned, as safetensors writes it
    with DirectFile(filename) as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for b in flat:
            f.write(b.numpy())


@contextlib.contextmanager
def _direct_model_writes():
    """transformers' `save_pretrained` writes its shards with `save_safetensors` while this is open (it calls
    `safe_save_file(tensors, filename, metadata=...)`; left alone where a version names it otherwise)."""
    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_save_file", None)
    if original is not None:
        mu.safe_save_file = save_safetensors
    try:
        yield
    finally:
        if original is not None:
            mu.safe_save_file = original


class _atomic:
    """A temporary file beside `dest`, renamed over it on success (as stages.io.atomic_path, for torch.save)."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, typ, exc, tb) -> None:
        if typ is None:
            self.tmp.replace(self.dest)
        else:
            self.tmp.unlink(missing_ok=True)


def read_meta(policy_dir: str | Path, field: str = "train.checkpoint_dir") -> dict | None:
    """checkpoint.json of `policy_dir` without loading weights; None when the dir holds no checkpoint."""
    path = Path(policy_dir) / META
    if not Path(policy_dir).exists():
        return None
    if not path.is_file():
        if any(Path(policy_dir).iterdir()):
            raise PipelineError(f"{field}: {policy_dir} is not empty but holds no {META}: not a checkpoint this "
                                f"pipeline wrote, or one whose {META} was deleted. If it is not the pipeline's, point "
                                f"the field elsewhere or move the directory away; if it is, "
                                f"{checkout_fix(path, 'this checkpoint')} or start over: {restart_command()}")
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}); "
                            f"{checkout_fix(path, 'this checkpoint')} or start over: {restart_command()}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("round"), int):
        raise PipelineError(f"{path}: not a format-{FORMAT} checkpoint; {checkout_fix(path, 'this checkpoint')} or "
                            f"start over: {restart_command()}")
    return meta


def verify_model(policy_dir: str | Path, meta: dict, field: str = "train.checkpoint_dir") -> None:
    """The model files of a checkpoint are as `save` wrote them: the size and CRC-32 its checkpoint.json records
    (`files`; a checkpoint from before 2026-12-07 has none and is not checked). ~0.3 s for the default model. A
    file changed since (a `save_pretrained` into the dir, a damaged disk) would otherwise resume silently from
    weights its optimizer state and rounds never saw."""
    for name, rec in (meta.get("files") or {}).items():
        path = Path(policy_dir) / name
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != rec.get("bytes"):
            problem = f"has {path.stat().st_size} bytes, its checkpoint.json recorded {rec.get('bytes')}"
        else:
            crc = 0
            with path.open("rb") as f:
                while chunk := f.read(DirectFile.CHUNK):
                    crc = zlib.crc32(chunk, crc)
            problem = None if crc == rec.get("crc32") else "does not match the CRC-32 its checkpoint.json recorded"
        if problem:
            fix = ("run the stage again without --policy (from the base model)" if meta.get("source") == "stages.update"
                   else f"{checkout_fix(path, 'this checkpoint')} or start over: {restart_command()}")
            raise PipelineError(f"{field}: {path} {problem}: changed since the checkpoint at round {meta['round']} was "
                                f"written; {fix}")


def load_state(state_dir: str | Path, meta: dict, device: Any = "cpu", archive_dir: str | Path | None = None,
               field: str = "train.state_dir") -> dict:
    """The resume state paired with `meta`, loaded without running code (weights_only). When it is missing but a run
    moved to `archive_dir` holds it (a `dvc checkout` brought back a checkpoint whose run was archived since), the
    error says where and how to copy it back. `field`: what set `state_dir` (`--state-dir` for the update stage run
    alone, whose checkpoints are not a training run's: the error then says to give the dir it wrote them with)."""
    import torch

    path = state_file(state_dir, meta["checkpoint_id"])
    if not path.is_file() and (field == "--state-dir" or meta.get("source") == "stages.update"):
        raise PipelineError(f"{field}: {path} is missing: the optimizer/RNG state of that checkpoint is not in "
                            f"{state_dir}; give --state-dir the dir the checkpoint was written with (the stage's "
                            "earlier --state-dir), or leave --policy out to start from the base model")
    if not path.is_file():
        copies = sorted(Path(archive_dir).glob(f"*/*/{path.name}"), reverse=True) if archive_dir else []
        fix = (f"a run moved to the archive holds it: copy it back with `mkdir -p {shlex.quote(str(path.parent))} && "
               f"cp {shlex.quote(str(copies[0]))} {shlex.quote(str(path))}` and run again, or start over: "
               f"{restart_command()}" if copies else
               f"start over with: {restart_command()}")
        raise PipelineError(
            f"train.state_dir: {path} is missing: the optimizer/RNG state of the checkpoint at round {meta['round']} is "
            f"not there (it is kept out of the DVC cache, so a `dvc pull` or `dvc checkout` does not bring it); {fix}")
    fix = (f"start over with: {restart_command()}" if field != "train.state_dir" or meta.get("source") == "stages.update"
           else f"remove it and run again (the training run rebuilds it by replaying its rounds from the base model), "
                f"or start over with: {restart_command()}")
    if meta.get("state_bytes") not in (None, path.stat().st_size):
        raise PipelineError(f"{path}: has {path.stat().st_size} bytes, the checkpoint at round {meta['round']} recorded "
                            f"{meta['state_bytes']}: damaged or replaced; {fix}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        first = next(iter(str(exc).strip().splitlines()), "")[:160]
        raise PipelineError(f"{path}: refused or unreadable trainer state ({type(exc).__name__}: {first}); it is loaded "
                            f"without running code; {fix}") from None


def put_back_moved_aside(policy_dir: str | Path) -> bool:
    """A write killed between `replace_dir`'s two renames left no checkpoint in place: the one it had moved aside
    (`.<name>.old-*/d`, whose state file is still on disk) goes back, before the run decides where it stands (else
    `clean_staging` would remove the only copy). Returns whether it did."""
    d = Path(policy_dir)
    olds = [p for p in d.parent.glob(f".{d.name}.old-*") if (p / "d").is_dir()] if d.parent.is_dir() else []
    if d.exists() or len(olds) != 1:
        return False
    os.replace(olds[0] / "d", d)
    log.warning("put %s back from %s (a checkpoint write was killed between its two renames)", d, olds[0])
    return True


def _staged_state_id(staging: Path) -> str:
    """The id of the state file a staging dir's write wrote: its `.state-id` mark, or, once the write took the mark
    away to move the dir into place, its checkpoint.json's (a kill between that and the rename left it there);
    "" where it has neither."""
    with contextlib.suppress(OSError):
        return (staging / STATE_MARK).read_text().strip()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads((staging / META).read_text()).get("checkpoint_id", ""))
    return ""


def clean_orphan_states(policy_dir: str | Path, state_dir: str | Path) -> list[Path]:
    """Remove the resume-state files this module's interrupted writes left (~1 GB each for the default model): the one
    a write killed before its rename named in its staging dir (`.<name>.tmp-*/.state-id`, or that dir's
    checkpoint.json once the mark is gone), and the one the checkpoint
    in place replaced (`replaces` in its checkpoint.json; a kill after the rename left it). Never the state the
    checkpoint in place pairs with, nor any other file (another run's, `python -m stages.update`'s). Call it under
    the run lock, after `put_back_moved_aside` and before `clean_staging`."""
    policy_dir, state_dir = Path(policy_dir), Path(state_dir)
    try:
        meta = read_meta(policy_dir) if policy_dir.is_dir() else None
    except PipelineError:
        return []  # an unreadable checkpoint: the run's own check says what to do; nothing is removed
    ids = [_staged_state_id(m) for m in policy_dir.parent.glob(f".{policy_dir.name}.tmp-*")
           ] if policy_dir.parent.is_dir() else []
    if meta is not None and meta.get("replaces"):
        ids.append(str(meta["replaces"]))
    keep = meta.get("checkpoint_id") if meta else None
    removed = []
    for i in ids:
        p = state_file(state_dir, i)
        if re.fullmatch(r"[0-9a-f]{12}", i) and i != keep and p.is_file():
            p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d resume-state file(s) an interrupted checkpoint write left: %s", len(removed),
                 ", ".join(map(str, removed)))
    return removed


_KEPT_SAID: set[str] = set()


def _keep_what_is_not_ours(policy_dir: Path, new: Path) -> None:
    """Copy into the new checkpoint `new` what the old one in `policy_dir` holds and this write does not make (a
    user's notes beside the weights): replacing the dir must not delete what the pipeline did not create. A copy,
    not a move: a kill before the new dir is in place leaves the old dir, with the file, as it was."""
    if not policy_dir.is_dir():
        return
    theirs = sorted(p for p in policy_dir.iterdir() if not (new / p.name).exists())
    for p in theirs:
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, new / p.name, symlinks=True)
        else:
            shutil.copy2(p, new / p.name, follow_symlinks=False)
    said = [p.name for p in theirs if str(p) not in _KEPT_SAID]
    if said:
        _KEPT_SAID.update(str(policy_dir / n) for n in said)
        log.warning("%s: kept %s in the new checkpoint: not the pipeline's files (each checkpoint write carries them "
                    "over; move them out of train.checkpoint_dir to keep them apart)", policy_dir, ", ".join(said))


def clean_staging(*dirs: str | Path) -> list[Path]:
    """Remove the staging dirs a killed writer left beside `dirs` (`.<name>.tmp-*`, `.<name>.old-*`) and stray
    temporary state files; only names this module creates. Call it under the run lock."""
    removed, left = [], []
    for d in map(Path, dirs):
        if not d.parent.is_dir():
            continue
        for pattern in (f".{d.name}.tmp-*", f".{d.name}.old-*"):
            for p in d.parent.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
                (left if p.exists() else removed).append(p)
        if d.is_dir():
            for p in d.glob(".state-*.pt.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d staging file(s) left by an interrupted write: %s", len(removed), ", ".join(map(str, removed)))
    if left:  # an immutable or foreign-owned file inside: said, not claimed removed
        log.warning("could not remove %d staging dir(s) left by an interrupted or refused write: %s; remove them by "
                    "hand (they hold a copy of a checkpoint)", len(left), ", ".join(map(str, left)))
    return removed

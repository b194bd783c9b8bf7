"""Where a training run stands and where it resumes (docs/design.md §6). `plan_resume` only reads and decides;
`apply_plan` does what the plan says (under the run lock).

A round is complete when its `manifest.json` exists; the manifest records the run identity
(`Params.identity()`), each artifact's size and SHA-256, and the baseline state carried to the next round. The
checkpoint (stages/checkpoint.py) records the round it closes. The rules:

- no rounds and no checkpoint: start at round 0;
- every complete round and the checkpoint belong to this run: resume from the checkpoint after its round; the
  complete rounds after it (`update.save_every > 1`) are *replayed*: their updates are applied again to the
  checkpoint's trainer from their own Parquet artifacts (no sampling or scoring), so no completed round is lost;
  a partial round (no manifest) is removed and re-done, unless its dir holds a file no round writes; a checkpoint one
  round ahead of the manifests (a crash between the two writes) repairs the missing manifest from the copy inside
  the checkpoint;
- everything belongs to another run (the configuration changed): that run is moved to `train.archive_dir`,
  never deleted, and this one starts at round 0 (if this one fails before completing a round, `restore_run` moves
  the old one back; if it is killed outright, the move's marker in the archive makes the next start do it:
  `restore_interrupted`);
- anything else is inconsistent (an unreadable manifest, rounds of two runs, a checkpoint that is missing or
  ahead of the rounds, a damaged artifact, in any complete round): stop with one line saying what and how to get
  out (restore it, re-do the rounds after the checkpoint by removing them, or start over), deleting nothing.

Only `round=NNNN` dirs inside `train.rounds_dir` and the checkpoint's own staging dirs are ever removed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from stages.errors import RESTART  # noqa: F401  (re-exported)
from stages.errors import MANIFEST, PipelineError, checkout_fix, params_file, restart_command, with_params

log = logging.getLogger(__name__)

ROUND_DIR = re.compile(r"^round=(\d{4,})$")
SWAP_ORDER = ("state", "policy", "rounds")  # a restore moves the parts in this order, the rounds (what counts) last
ARTIFACTS = ("samples", "scores", "advantages")
ROUND_FILES = (*(f"{a}.parquet" for a in ARTIFACTS), MANIFEST)  # all a round writes in its dir
# the `source` an update-stage checkpoint records (stages/update.py), and the run it counts as
STAGE_RUN = "stages.update"
_REQUIRED = {"round": int, "identity": str, "artifacts": dict, "metrics": dict}
SEAL = "manifest_sha256"  # a manifest's checksum of its own content (`seal_manifest`)


def round_dir(rounds_dir: str | Path, r: int) -> Path:
    return Path(rounds_dir) / f"round={r:04d}"


def complete_rounds(rounds_dir: str | Path) -> list[Path]:
    """The manifests of the complete rounds in `rounds_dir`, in round order (none where it is missing)."""
    return sorted(Path(rounds_dir).glob(f"round=*/{MANIFEST}"))


def round_prompts(train: pl.DataFrame, r: int, per_round: int, seed: int,
                  history: list[list[str]] | None = None, added: frozenset[str] = frozenset()) -> pl.DataFrame:
    """Prompts of round r: the least recently trained ones first (never trained first of all), ties in a seeded order
    that changes every round (docs/design.md §6).

    `history`: the prompt ids of rounds 0..r-1 (from their manifests). Without it, the schedule of the current split
    is replayed from round 0. The rule goes through the whole split before any prompt repeats, never puts a prompt
    twice in one round, and puts prompts added to a running job's data (a scheduled run; `added`: those not in the
    split of the last complete round) first in line, before the never-trained prompts of the old split."""
    ids = train["prompt_id"].to_list()
    take = min(per_round, len(ids))
    if history is None:
        history = []
        for q in range(r):
            history.append(_pick(ids, take, seed, q, history))
    pos = {pid: i for i, pid in enumerate(ids)}
    return train[[pos[pid] for pid in _pick(ids, take, seed, r, history, added)]]


def _pick(ids: list[str], take: int, seed: int, r: int, history: list[list[str]],
          added: frozenset[str] = frozenset()) -> list[str]:
    last = {pid: q for q, seen in enumerate(history[:r]) for pid in seen}

    def key(pid: str) -> tuple[int, str]:
        q = last.get(pid, -2 if pid in added else -1)
        return q, hashlib.sha1(f"{seed}:{q}:{pid}".encode()).hexdigest()

    return sorted(ids, key=key)[:take]


def split_record(train: pl.DataFrame) -> dict:
    """The train split a round ran under, as its manifest records it (a scheduled run compares them)."""
    ids = sorted(train["prompt_id"].to_list())
    return {"size": len(ids), "hash": hashlib.sha1(",".join(ids).encode()).hexdigest()[:16], "ids": ids}


def new_prompts(last_manifest: dict, split: dict) -> list[str]:
    """Prompts of the current train split that were not in it when the last complete round ran."""
    before = set((last_manifest.get("train_split") or {}).get("ids", []))
    return [pid for pid in split["ids"] if pid not in before] if before else []


def report_untrained(logger, last_manifest: dict, split: dict, total: int) -> None:
    added = new_prompts(last_manifest, split)
    if added:
        logger.info("%d prompt(s) were added to the train split since round %d; raise train.rounds past %d to train on "
                    "them (they come first), or let a scheduled pipeline run do it", len(added),
                    last_manifest["round"] + 1, total)


AUTO_RESOLVED = {"sample_dtype": "sample.dtype", "score_dtype": "score.dtype",
                 "micro_batch_size": "update.micro_batch_size", "policy_logprobs": "score.policy_logprobs"}


def report_resolution_change(logger, last_manifest: dict, topology: dict) -> list[str]:
    """Warn when a resumed run's `auto` settings resolve otherwise than when its last complete round ran (another kind
    of machine, or a release that changed a default: the identity hashes `auto`, not what it gave); the fields that
    changed."""
    changed = [k for k in AUTO_RESOLVED if k in last_manifest and k in topology
               and str(last_manifest[k]) != str(topology[k])]
    for k in changed:
        if k == "policy_logprobs":  # decided by the engine's dtype and the update's batching, not by this field alone
            logger.warning("resuming after round %d: the KL's policy logprobs come from the %s here, from the %s for "
                           "the rounds so far (score.policy_logprobs: %s follows the engine's dtype and the update's "
                           "micro-batches, docs/design.md §7)", last_manifest["round"] + 1, topology[k],
                           last_manifest[k], "auto")
            continue
        logger.warning("resuming after round %d: %s resolves to %s here, it was %s for the rounds so far (`auto` "
                       "follows the machine's kind, docs/design.md §7); set %s to %s to keep it",
                       last_manifest["round"] + 1, AUTO_RESOLVED[k], topology[k], last_manifest[k], AUTO_RESOLVED[k],
                       last_manifest[k])
    return changed


# ---------------------------------------------------------------- artifacts and manifests


def file_record(path: Path, rows: int | None = None) -> dict:
    """Size and SHA-256 of an artifact (and its row count), as the manifest records it."""
    from stages.io import hash_file

    rec = {"bytes": path.stat().st_size, "sha256": hash_file(path).hexdigest()}
    return rec | ({"rows": rows} if rows is not None else {})


def _unsealed(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != SEAL}


def _content_sha256(body: dict) -> str:
    """SHA-256 of a manifest's content as JSON reads it back (without its seal): keys sorted, compact."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with `manifest_sha256`, the checksum of the rest of it: the artifacts' checksums are in the
    manifest, and this covers the manifest itself (its metrics, carried baseline state and prompt schedule feed the
    rounds after it), so a resume notices a manifest edited or damaged since its round wrote it (`read_manifest`).
    Taken over the manifest as JSON writes and reads it back, so the values JSON changes (a tuple, a Path) count
    as they will be read."""
    body = json.loads(json.dumps(_unsealed(manifest), default=str))
    return body | {SEAL: _content_sha256(body)}


def write_manifest(manifest: dict, path: Path) -> None:
    """Write a round's manifest, sealed (`seal_manifest`), atomically: the mark of a complete round."""
    from stages.io import write_json

    write_json(seal_manifest(manifest), path)


def read_manifest(path: Path) -> dict:
    """A manifest, checked for the keys a resume relies on and against its seal where it has one (a manifest from
    before seals has none); one-line PipelineError otherwise."""
    def fix() -> str:  # only for an error: it reads DVC's records
        return f"{checkout_fix(path)} or start over: {restart_command()}"

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable manifest ({type(exc).__name__}); {fix()}") from None
    bad = [k for k, t in _REQUIRED.items() if not isinstance(data, dict) or not isinstance(data.get(k), t)]
    if bad:
        raise PipelineError(f"{path}: manifest lacks {', '.join(bad)}; {fix()}")
    if SEAL in data and data[SEAL] != _content_sha256(_unsealed(data)):
        raise PipelineError(f"{path}: the manifest was changed since its round wrote it (its content does not match "
                            f"its {SEAL}); {fix()}")
    expected = ROUND_DIR.match(path.parent.name)
    if expected and int(expected.group(1)) != data["round"]:
        raise PipelineError(f"{path}: manifest says round {data['round']} in the dir of round "
                            f"{int(expected.group(1))}; {fix()}")
    return data


def round_damage(d: Path, manifest: dict) -> tuple[Path, str] | None:
    """The first artifact of a complete round that is not there with the size and checksum its manifest recorded,
    as (its path, what is wrong); None when the round is intact."""
    for name, rec in manifest["artifacts"].items():
        path = d / name
        if not path.is_file():
            return path, "is missing"
        if path.stat().st_size != rec.get("bytes"):
            return path, f"has {path.stat().st_size} bytes, its manifest recorded {rec.get('bytes')}"
        if file_record(path)["sha256"] != rec.get("sha256"):
            return path, "does not match the checksum its manifest recorded"
    return None


def verify_round(d: Path, manifest: dict, checkpoint_round: int | None = None) -> None:
    """Every artifact of a complete round is there with the size and checksum its manifest recorded. A damaged round
    after the checkpoint (`checkpoint_round`; None: there is none, the run starts from the base model) could be
    re-done: the error says how, and the run never decides that alone (it would discard that round and the ones after
    it)."""
    damage = round_damage(d, manifest)
    if damage:
        path, problem = damage
        r, c = manifest["round"], checkpoint_round
        start = f"the checkpoint at round {c}" if c is not None else "the base model (no checkpoint yet)"
        redo = (f", re-do it from {start} by removing {d.name} and the round dirs after it,"
                if c is None or r >= c else "")
        raise PipelineError(f"{path} {problem}: round {r + 1} is damaged; {checkout_fix(path if d.is_dir() else d)}"
                            f"{redo} or start over: {restart_command()}")


# ---------------------------------------------------------------- the plan


@dataclass
class ResumePlan:
    identity: str
    start: int  # first round to run
    done: list[dict] = field(default_factory=list)  # manifests of rounds 0..start-1
    checkpoint: dict | None = None  # the checkpoint to resume from (None: the base model)
    replay: list[dict] = field(default_factory=list)  # manifests of the complete rounds after the checkpoint: their
    # updates are applied again from their artifacts before round `start` (the last len(replay) of `done`)
    repair: dict | None = None  # a manifest to rewrite from the checkpoint's copy
    stale: list[Path] = field(default_factory=list)  # partial round dirs (no manifest) to remove: re-done
    superseded: dict | None = None  # the other run to move aside: {"identity", "rounds"}
    rebuilt: dict | None = None  # a checkpoint whose optimizer state is missing: the replay from the base replaces it

    @property
    def adv_state(self) -> dict | None:
        """The advantage estimator's state carried into round `start` (the last done round's; None from scratch)."""
        return self.done[-1]["advantage_state"] if self.done else None


def scan_rounds(rounds_dir: Path) -> dict[int, tuple[Path, dict | None]]:
    """round index -> (dir, manifest or None) for every `round=NNNN` dir. A manifest without a seal after a sealed
    one is refused: seals came in on 2026-12-07, so a run's unsealed rounds come before its sealed ones, and a seal
    missing later was deleted (the way past `read_manifest`'s check of an edited manifest)."""
    out = {}
    if rounds_dir.is_dir():
        for d in rounds_dir.iterdir():
            m = ROUND_DIR.match(d.name)
            if m and d.is_dir():
                mf = d / MANIFEST
                out[int(m.group(1))] = (d, read_manifest(mf) if mf.is_file() else None)
    sealed = None
    for r in sorted(out):
        d, manifest = out[r]
        if manifest is None:
            continue
        if SEAL in manifest:
            sealed = r if sealed is None else sealed
        elif sealed is not None:
            raise PipelineError(f"{d / MANIFEST}: the manifest has no {SEAL} though round {sealed + 1}'s before it has "
                                f"one: it was edited since its round wrote it; {checkout_fix(d / MANIFEST)} or start "
                                f"over: {restart_command()}")
    return out


def plan_resume(params, identity: str, restart: bool = False) -> ResumePlan:
    """Decide where this invocation starts (see the module docstring). Reads only."""
    from stages import checkpoint

    tp = params.train
    try:
        rounds = scan_rounds(Path(tp.rounds_dir))
        meta = checkpoint.read_meta(tp.checkpoint_dir)
    except PipelineError:
        if not restart:
            raise
        # --restart is the way out these errors name: the run moves aside as it is, unreadable parts included
        n = sum(1 for d in Path(tp.rounds_dir).glob("round=*") if d.is_dir() and ROUND_DIR.match(d.name))
        return _moving_aside(params, identity, {"identity": "unreadable", "rounds": n, "restart": True})
    manifests = {r: m for r, (_, m) in rounds.items() if m is not None}
    aliases = params.identity_aliases() if identity == params.identity() else set()

    def same_run(i: str) -> str:  # an identity an earlier version gave this run (Params.identity_aliases) is this run's
        return identity if i in aliases else i

    # a checkpoint of `python -m stages.update` run on its own is another run's (no run identity, or its source)
    ckpt_run = None
    if meta:
        ckpt_run = STAGE_RUN if meta.get("source") == STAGE_RUN else same_run(meta.get("identity") or STAGE_RUN)
    round_ids = {same_run(m["identity"]) for m in manifests.values()}
    ids = round_ids | ({ckpt_run} if meta else set())
    if restart or (ids and identity not in ids):
        other = sorted(ids - {identity}) or [identity]
        # the superseded run moves aside whole (apply_plan -> archive_run): no round dir is stale
        return _moving_aside(params, identity, {"identity": ",".join(other), "rounds": len(manifests),
                                                "restart": restart})
    if len(ids) > 1:
        if len(round_ids) > 1:
            where = f"{tp.rounds_dir}: holds rounds of more than one run"
        elif ckpt_run != identity:
            where = f"{tp.checkpoint_dir}: the checkpoint is of another run than the rounds in {tp.rounds_dir}"
        else:
            where = f"{tp.rounds_dir}: the rounds are of another run than the checkpoint in {tp.checkpoint_dir}"
        raise PipelineError(f"{where} (identities {sorted(ids)}); the state is inconsistent; start over (the old "
                            f"rounds are moved to {tp.archive_dir}): {restart_command()}")
    n = 0
    while n in manifests:
        n += 1
    if any(r > n for r in manifests):
        missing = round_dir(tp.rounds_dir, n) / MANIFEST
        missing = missing if missing.parent.is_dir() else missing.parent
        gap = "has no manifest" if missing.name == MANIFEST else "is missing"
        raise PipelineError(f"{round_dir(tp.rounds_dir, n)}: round {n + 1} {gap} but later rounds are complete; the "
                            f"state is inconsistent; {checkout_fix(missing)} or start over: {restart_command()}")
    c = meta["round"] if meta else 0
    repair = None
    if c == n + 1 and rounds and (meta.get("manifest") or {}).get("round") == n:
        repair = meta["manifest"]  # killed between the checkpoint and the manifest of round n (= c - 1)
        manifests[n] = meta["manifest"]
        n = c
    elif c > n and not rounds:  # no round dir at all: the rounds are elsewhere (a changed train.rounds_dir) or gone
        raise PipelineError(f"{tp.checkpoint_dir}: the checkpoint is at round {c}, but {tp.rounds_dir} holds no round "
                            "of its run: if train.rounds_dir changed, put it back to the dir that holds them (or move "
                            f"them to {tp.rounds_dir}); if they were deleted, start over: {restart_command()}")
    elif c > n:
        raise PipelineError(f"{tp.checkpoint_dir}: the checkpoint is at round {c} but only {n} rounds are complete in "
                            f"{tp.rounds_dir}; the state is inconsistent; start over: {restart_command()}")
    # the checkpoint's optimizer state is not there (it never enters DVC's cache: a clone that pulled the run, a
    # cleaned state dir): with every round since the base on disk, their updates replayed from the base model rebuild
    # it (docs/design.md §6), instead of the run having to start over
    # (not where a run moved to the archive holds that very state file: loading it says how to copy it back, exactly)
    state = checkpoint.state_file(tp.state_dir, meta["checkpoint_id"]) if meta is not None else None
    rebuild = state is not None and not state.is_file() and not any(Path(tp.archive_dir).glob(f"*/*/{state.name}"))
    lost = [] if rebuild else [r for r in range(c, n) if manifests[r].get("checkpoint")]
    if lost:
        where = "is missing" if meta is None else f"is at round {c}"
        raise PipelineError(f"{tp.checkpoint_dir}: round {lost[-1] + 1} wrote a checkpoint, but the checkpoint "
                            f"{where}; {checkout_fix(tp.checkpoint_dir, 'that checkpoint')} or start over: "
                            f"{restart_command()}")
    for r in range(n):  # every complete round is intact, or the run stops and says how to get it back (the round
        # whose manifest is repaired too: a kill between the two writes leaves its artifacts, a deleted dir does not)
        verify_round(round_dir(tp.rounds_dir, r), manifests[r], checkpoint_round=c if meta else None)
    done = [manifests[r] for r in range(n)]
    # replay: the complete rounds after the checkpoint, applied again; stale: the partial rounds (no manifest), re-done
    plan = ResumePlan(identity, n, done, None if rebuild else meta, replay=done[0 if rebuild else c:], repair=repair,
                      stale=sorted(d for r, (d, _) in rounds.items() if r >= n), rebuilt=meta if rebuild else None)
    for d in plan.stale:
        foreign = sorted(p.name for p in d.iterdir() if not _written_by_a_round(p.name))
        if foreign:
            raise PipelineError(f"{d / foreign[0]}: this round is re-done and its dir removed, but the pipeline did "
                                f"not write this file; move it out of {tp.rounds_dir} and run again")
    return plan


def _moving_aside(params, identity: str, superseded: dict) -> ResumePlan:
    """A plan that starts over and moves the run in place aside (`superseded`), once the move is known to be
    possible: refused here, before the warm load, rather than in `archive_run` after it."""
    one_filesystem(_in_place(params), Path(params.train.archive_dir), "train.archive_dir", ARCHIVE_FIX)
    return ResumePlan(identity, 0, superseded=superseded)


def check_total(plan: ResumePlan, total: int, field: str = "train.rounds") -> None:
    """A run asked for fewer rounds than it has already completed: nothing to train, and nothing true to report."""
    if plan.superseded is None and plan.start > total:
        where = (f" (train.rounds in {params_file()}, `--rounds N` on the command line, or `-S train.rounds=N` in a "
                 "dvc exp run)" if field.startswith("train.rounds") else "")
        raise PipelineError(f"{field}: {total} rounds asked, but {plan.start} rounds of this run are already complete; "
                            f"ask for {plan.start} or more{where} (more continue the run), or start over: "
                            f"{restart_command()}")


def _written_by_a_round(name: str) -> bool:
    """A file a round writes in its dir: an artifact, the manifest, or one's temporary file (stages.io.atomic_path)."""
    return name in ROUND_FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in ROUND_FILES)


def apply_plan(plan: ResumePlan, params) -> Archived | None:
    """Move a superseded run aside, repair a manifest, remove stale round dirs and staging dirs. Under the lock.
    Returns where a superseded run went (for `restore_run`), else None."""
    from stages import checkpoint

    tp = params.train
    checkpoint.clean_orphan_states(tp.checkpoint_dir, tp.state_dir)  # reads the staging dirs' marks: first
    checkpoint.clean_staging(tp.checkpoint_dir, tp.state_dir)
    if plan.superseded is not None:
        return archive_run(params, plan.superseded)
    if plan.repair is not None:
        write_manifest(plan.repair, round_dir(tp.rounds_dir, plan.repair["round"]) / MANIFEST)
        log.info("repaired the manifest of round %d from its checkpoint", plan.repair["round"] + 1)
    for d in plan.stale:
        try:
            shutil.rmtree(d)
        except OSError as exc:  # (a read-only mount, say: one line, stages.errors.not_writable_message)
            if exc.filename and os.sep not in str(exc.filename):
                exc.filename = str(d / exc.filename)  # rmtree names a file in the dir alone; a round dir is flat
            raise
        log.info("removed %s, the partial round %d an interrupted run left (only files a round writes): it is re-done",
                 d, int(ROUND_DIR.match(d.name).group(1)) + 1)
    return None


PENDING = ".pending-restore.json"  # in an archive dir until the run that moved it there completes (or fails)
RESTORING = ".restoring.json"  # in an archived run's dir while stages/restore.py moves it back into the output dirs


@dataclass(frozen=True)
class Archived:
    """Where `archive_run` moved a run (`dest`), the parts it moved (`parts`: rounds, policy, state, the ones that
    held something), and the missing parents of `dest` that the move created (`made`, the ones `restore_run` removes
    again when they are empty)."""

    dest: Path
    made: tuple[Path, ...] = ()
    parts: tuple[str, ...] = ("rounds", "policy", "state")


PART_FIELDS = {"rounds": "train.rounds_dir", "policy": "train.checkpoint_dir", "state": "train.state_dir"}


def output_dirs(params) -> dict[str, Path]:
    """A run's parts by name (rounds, policy, state) and the output dirs that hold them."""
    tp = params.train
    return {"rounds": Path(tp.rounds_dir), "policy": Path(tp.checkpoint_dir), "state": Path(tp.state_dir)}


def _in_place(params) -> dict[str, Path]:
    """The output dirs that hold something (a file where a dir goes counts): the parts a move aside takes."""
    return {k: p for k, p in output_dirs(params).items() if p.exists() and (not p.is_dir() or any(p.iterdir()))}


def dirs_origin(params) -> dict[str, str]:
    """The output dirs, resolved: what a marker records, and what a start compares it with."""
    return {k: str(p.resolve()) for k, p in output_dirs(params).items()}


def rename_part(src: Path, dest: Path) -> None:
    """Move a run's part (a dir, or a file where one was) by a rename: atomic, so a kill leaves it in one place or
    the other, never half in each, and a full disk cannot stop it halfway (`one_filesystem` checks first)."""
    os.rename(src, dest)


def _filesystem(path: Path) -> int | None:
    """The filesystem (st_dev) that `path` is on, or would be made on: its nearest existing dir's (a symbolic link's
    own: a rename moves the link, in the dir it lies in)."""
    p = Path(path).absolute()
    if p.is_symlink():
        p = p.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return p.stat().st_dev
    except OSError:
        return None


ARCHIVE_FIX = "set train.archive_dir to a dir on the filesystem of the output dirs"


def one_filesystem(parts: dict[str, Path], other: Path, what: str, fix: str) -> None:
    """Stop, before anything moves, where a part's output dir (`parts`: name -> dir) and `other` (`what`: how the
    error names it) are on different filesystems: a rename cannot cross them, and a copy instead would leave half a
    run in each place when killed or out of space (docs/design.md §6)."""
    for name, place in parts.items():
        if _filesystem(place) != _filesystem(other):
            raise PipelineError(f"{what} ({other}) and {PART_FIELDS[name]} ({place}) are on different filesystems: a "
                                "run moves between them by renames, which cannot cross filesystems (a copy could be "
                                f"left half done by a kill or a full disk); {fix}")


def archive_run(params, superseded: dict) -> Archived | None:
    """Move the rounds, checkpoint and trainer state of another run into `train.archive_dir/<time>-<identity>/`, with
    a marker (`PENDING`: what moves from where) that `restore_run` or `keep_archived` removes. `superseded`: the run's
    "identity" and complete "rounds", whether it moves for "restart", and the "why" the log gives (default: the
    configuration changed, or --restart)."""
    from stages.io import write_json

    tp = params.train
    parts = _in_place(params)
    if not parts:
        return None
    one_filesystem(parts, Path(tp.archive_dir), "train.archive_dir", ARCHIVE_FIX)
    made = tuple(p for p in (Path(tp.archive_dir), *Path(tp.archive_dir).parents) if not p.exists())
    stem = Path(tp.archive_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{superseded['identity'][:16]}"
    for n in itertools.count():  # runs moved aside in the same second get their own dirs (mkdir: the atomic claim)
        dest = stem if n == 0 else stem.with_name(f"{stem.name}-{n}")
        try:
            dest.mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:
            pass
    # the marker first: a run killed from here until it completes a round is undone at the next start
    # (restore_interrupted). It records where the parts came from, resolved, so that a start in another checkout
    # sharing the archive dir leaves it be
    write_json({"made": [str(p) for p in made], "parts": list(parts),
                "from": dirs_origin(params)}, dest / PENDING)
    for name, p in parts.items():
        rename_part(p, dest / name)
    why = superseded.get("why") or ("--restart" if superseded.get("restart") else "the configuration changed")
    log.warning("%s: the previous run (%d complete rounds%s) was moved to %s; delete it when you no longer need it",
                why, superseded["rounds"], _checkpoint_alone(dest) if not superseded["rounds"] else "", dest)
    if not superseded.get("restart"):
        _say_archived_twin(params)
    return Archived(dest, made, tuple(parts))


def _checkpoint_alone(dest: Path) -> str:
    """", a checkpoint at round N" where a run moved aside without complete rounds had one (its rounds were elsewhere,
    or gone), else ""."""
    from stages import checkpoint
    from stages.io import UNREADABLE

    try:
        meta = checkpoint.read_meta(dest / "policy")
        return f", a checkpoint at round {int(meta['round'])}" if meta else ""
    except UNREADABLE:
        return ""


def _say_archived_twin(params) -> None:
    """Going back to a configuration whose run was archived earlier starts a new run of it (the warm load, done before
    the move, loaded the base model): say where the earlier one is (the newest with rounds) and how to continue it
    instead. An archive with a marker is not final (its run may move back; the run just moved aside has one)."""
    identity = params.identity()
    for d in sorted(Path(params.train.archive_dir).glob(f"*-{identity}*"), reverse=True):  # 16 characters, whole
        if (d / PENDING).exists() or (d / RESTORING).exists() or not (d / "rounds").is_dir():
            continue
        rounds = len(complete_rounds(d / "rounds"))
        log.warning("an earlier run of this configuration (%d complete rounds) is in %s; this one starts over. To "
                    "continue that one instead: stop this run, then `%s` (it moves this one aside) and run again",
                    rounds, d, with_params(f"python -m stages.restore {shlex.quote(str(d))}"))
        return



def restore_run(params, archived: Archived, killed: bool = False) -> bool:
    """Put back the run that `archive_run` moved to `archived.dest`, because the run that moved it failed (or was
    stopped) before completing a round: the failed command leaves the checkout as it found it, and a failed `dvc exp
    run` leaves no duplicate archive (docs/design.md §6). `killed`: called at a later start for a run that was killed
    outright (`restore_interrupted`), which only changes the log line.

    Removed first: this run's leftovers only (round dirs without a manifest that hold only files a round writes,
    then the output dirs this run made, when empty). Anything else in the way (a completed round, a checkpoint, a
    file of yours) and nothing moves: a warning says where the old run is; after a completed round this run is the
    run (resumable as any other) and nothing moves either. A part the move never reached (a kill in the middle of
    it) is the old run's own, still in place: it is neither checked nor moved. The marker goes once this has
    decided. Returns whether it moved back."""
    dest = archived.dest
    # the places this run may have written: each part that moved, and each place the old run had nothing in
    places = {k: p for k, p in output_dirs(params).items() if k not in archived.parts or (dest / k).exists()}
    back = [name for name in places if (dest / name).exists()]
    if "rounds" in places and any((d / MANIFEST).exists() for d in places["rounds"].glob("round=*")):
        (dest / PENDING).unlink(missing_ok=True)
        return False  # this run completed a round: it is the run now, resumable as any other
    partial, blocked = [], []
    for name, p in places.items():
        if not p.is_dir():
            blocked += [p] if p.exists() else []
            continue
        for c in p.iterdir():
            if (name == "rounds" and c.is_dir() and ROUND_DIR.match(c.name)
                    and all(_written_by_a_round(f.name) and f.name != MANIFEST for f in c.iterdir())):
                partial.append(c)
            else:
                blocked.append(c)
    if blocked:
        log.warning("%s: this run left more than a partial round, so the previous run stays in %s; move its rounds/, "
                    "policy/ and state/ back by hand if you want it", blocked[0], dest)
        (dest / PENDING).unlink(missing_ok=True)  # said once: the next start does not try again
        return False
    for d in partial:
        shutil.rmtree(d)
    for name in sorted(back, key=SWAP_ORDER.index):  # the rounds last, as a restore moves them
        move_in(dest, name, places[name])  # an output dir there is empty: made by this run after the move
    (dest / PENDING).unlink(missing_ok=True)
    try:
        dest.rmdir()
        for d in archived.made:  # the archive dirs this move made, when nothing else is in them
            d.rmdir()
    except OSError:
        pass  # a file of yours in it: the dir stays
    if killed:
        log.warning("a run killed before it completed a round had moved the previous run aside: the previous run is "
                    "back in place (moved back from %s)", dest)
    else:
        log.warning("this run stopped before completing a round: the previous run is back in place (moved back from "
                    "%s)", dest)
    return True


def keep_archived(archived: Archived) -> None:
    """The run that moved `archived` aside completed its first round (called once that round's manifest is on disk):
    drop the move's marker, so that nothing later (a start after you removed this run's rounds by hand, say) takes
    the archived run for one to put back."""
    (archived.dest / PENDING).unlink(missing_ok=True)


def restore_interrupted(params) -> bool:
    """Finish what `restore_run` would have done for a run killed outright (kill -9, power loss, a torchrun rank
    stopped by its launcher) after it moved another run aside and before it completed: `archive_run`'s marker is
    still in that archive dir. A `python -m stages.restore` killed while it moved an archived run into place is
    finished first (`finish_killed_restores`). Called under the run lock before `plan_resume` by every start; a
    marker whose run completed a round is dropped, one written for other output dirs (another checkout sharing the
    archive dir) is left alone. A move that fails is a warning naming the marker (at each start, until you have moved
    the run back and deleted the marker). Returns whether a run moved back (or a restore was finished)."""
    from stages import checkpoint
    from stages.io import UNREADABLE, read_json

    checkpoint.put_back_moved_aside(params.train.checkpoint_dir)  # a checkpoint write killed mid-rename
    moved = bool(finish_killed_restores(params))  # first: it makes the archive of the run it moved aside final
    root = Path(params.train.archive_dir)
    here = dirs_origin(params)
    for marker in sorted(root.glob(f"*/{PENDING}"), reverse=True):  # newest first (none where root is missing)
        try:
            info = read_json(marker)
            archived = Archived(marker.parent, tuple(Path(p) for p in info["made"]), tuple(info["parts"]))
            origin = info["from"]
        except UNREADABLE:
            archived, origin = Archived(marker.parent), here  # damaged: it still moves back (every part), here
        if origin != here:
            continue  # another checkout's (or another params file's) run: its own next start puts it back
        try:
            moved = restore_run(params, archived, killed=True) or moved
        except OSError as e:
            log.warning("%s: could not move the previous run back (%s); move its rounds/, policy/ and state/ back by "
                        "hand, then delete this file", marker, e)
    return moved


def move_in(src: Path, name: str, dest: Path) -> None:
    """Move the archived run's part `name` from `src` to its output dir `dest` (missing, or an empty dir)."""
    if dest.exists():
        dest.rmdir()  # empty (a part that held something moved aside first)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("moving %s to %s", src / name, dest)
    rename_part(src / name, dest)


def finish_restore(src: Path, moved: Archived | None) -> None:
    """The swap is whole: the run moved aside is a final archive, the restore's marker goes (and a temporary file of
    it that a kill mid-write left), and `src` with them."""
    if moved is not None:
        keep_archived(moved)
    (src / RESTORING).unlink(missing_ok=True)
    for tmp in src.glob(f".{RESTORING}.*.tmp"):  # stages.io.atomic_path's name for it
        tmp.unlink()
    try:
        src.rmdir()
    except OSError:
        log.warning("%s: left in place, it holds files that are not the run's", src)


def _restore_record(marker: Path) -> dict | None:
    """A restore's marker, checked: {"from": {part: dir}, "parts": [part names], "aside": dir or None}; None when it
    cannot be read or is not one this version writes."""
    from stages.io import UNREADABLE, read_json

    try:
        info = read_json(marker)
        ok = (isinstance(info["from"], dict) and isinstance(info["parts"], list)
              and set(info["parts"]) <= set(PART_FIELDS) and isinstance(info["aside"], (str, type(None))))
    except UNREADABLE:
        return None
    return info if ok else None


def finish_killed_restores(params) -> list[Path]:
    """Finish each restore of these output dirs that was killed outright (kill -9, power loss) while it moved an
    archived run into them: its marker (`RESTORING`, written once the run in place was archived, so the output dirs
    were empty then) is still in the archived run's dir. The parts still there move into their output dirs and the
    run moved aside becomes a final archive, as the restore would have left them. An output dir that is no longer
    empty, or a marker that cannot be read, stops the start with one line saying what to move by hand, before
    anything moves. Called first by every start (`restore_interrupted`); returns the archived runs' dirs it finished."""
    here, places, finished = dirs_origin(params), output_dirs(params), []
    by_hand = ", ".join(f"{k}/ to {v}" for k, v in PART_FIELDS.items())
    for marker in sorted(Path(params.train.archive_dir).glob(f"*/{RESTORING}")):
        src, info = marker.parent, _restore_record(marker)
        if info is None:
            raise PipelineError(f"{marker}: unreadable; it marks a restore of {src} that was killed midway: move each "
                                f"part left in {src} to the output dir of the checkout that ran it ({by_hand}), then "
                                "delete this file")
        if info["from"] != here:
            continue  # another checkout's (or another params file's): its own next start finishes it
        left = [n for n in SWAP_ORDER if n in info["parts"] and (src / n).exists()]
        blocked = [str(places[n]) for n in left if places[n].exists()
                   and (not places[n].is_dir() or any(places[n].iterdir()))]
        if blocked:
            moves = ", ".join(f"{src / n} to {places[n]}" for n in left)
            raise PipelineError(f"{marker}: a restore of {src} was killed midway and {', '.join(blocked)} "
                                f"{'is' if len(blocked) == 1 else 'are'} no longer empty; finish it by hand (move "
                                f"{moves} once {'that holds' if len(blocked) == 1 else 'those hold'} nothing you "
                                "need), then delete this file")
        for name in left:
            move_in(src, name, places[name])
        finish_restore(src, Archived(Path(info["aside"])) if info["aside"] else None)
        log.warning("a restore of %s was killed midway: finished, the archived run is in the output dirs%s", src,
                    f" and the run that was there in {info['aside']}" if info["aside"] else "")
        finished.append(src)
    return finished

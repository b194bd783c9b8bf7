"""Bring an archived run back, to continue it: `python -m stages.restore data/archive/<time>-<identity>`.

A configuration change (or `--restart`) moves the run in the output dirs to `train.archive_dir` and starts over
(stages/loop/resume.py). Going back to that configuration later starts over again: the archived run is only named in
the log. This command swaps it back in: the run now in the output dirs is archived as a configuration change would
archive it, the archived one's rounds, checkpoint and trainer state move back into `train.rounds_dir`,
`train.checkpoint_dir` and `train.state_dir`, and the next `python -m flows.train` (or `dvc repro`) resumes it after
its last complete round. It refuses, changing nothing, a dir that is or holds an output dir, a dir that holds no
run or no complete round, an archive that is not final, a damaged run, and a run of another configuration than the
params file's; a move that fails midway is undone (docs/design.md §6).
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from stages.errors import PipelineError, run_cli

log = logging.getLogger(__name__)


def _at(params, src: Path):
    """`params` whose output dirs are the parts of the archived run in `src` (to plan it where it lies)."""
    train = params.train.model_copy(update={"rounds_dir": str(src / "rounds"), "checkpoint_dir": str(src / "policy"),
                                            "state_dir": str(src / "state")})
    return params.model_copy(update={"train": train})


FIELDS = {"rounds": "train.rounds_dir", "policy": "train.checkpoint_dir", "state": "train.state_dir"}


def restore_archived(params, src: str | Path, params_path: str = "params.yaml") -> tuple[int, Path | None]:
    """Swap the archived run in `src` into the output dirs of `params` (under the checkout's run lock). Returns the
    archived run's complete rounds and where the run that was in place went (None: the output dirs were empty)."""
    from stages.loop.lock import run_lock
    from stages.loop.resume import PENDING, _places, archive_run, plan_resume, restore_interrupted

    src, places = Path(src), _places(params)
    with run_lock("restore of an archived run"):
        # as every start does: a run killed in round 1 puts the one it moved aside back first (src itself, maybe)
        if restore_interrupted(params) and not src.exists():
            rounds = sum(1 for _ in places["rounds"].glob("round=*/manifest.json"))
            log.warning("%s: its run was already moved back into the output dirs by the step above", src)
            return rounds, None
        root = src.resolve()
        for name, place in places.items():
            p = place.resolve()
            if p == root or root in p.parents or p in root.parents:
                raise PipelineError(f"{src}: overlaps {FIELDS[name]} ({place}), an output dir; name the dir of an "
                                    f"archived run, in {params.train.archive_dir}")
        parts = [k for k in places if (src / k).exists()] if src.is_dir() else []
        if "rounds" not in parts:
            raise PipelineError(f"{src}: not an archived run (no rounds/ in it); `ls {params.train.archive_dir}` lists "
                                "the runs moved aside, named <time>-<identity>")
        if (src / PENDING).exists():
            raise PipelineError(f"{src}: this archive is not final: the run that moved it aside has not completed a "
                                f"round, and its next start in the checkout it names in {PENDING} moves it back; run "
                                "that checkout once (or delete the file if that checkout is gone), then restore")
        identity = params.identity()
        try:
            plan = plan_resume(_at(params, src), identity)  # reads only: what a start would refuse, refused here
        except PipelineError as e:  # its advice is for a run in place (dvc checkout, --restart): not for an archive
            raise PipelineError(f"{src}: this archived run cannot be continued: {str(e).split('; ')[0]}; put that "
                                "back from a copy of the archive, or leave the archive be") from None
        if plan.superseded is not None:
            raise PipelineError(f"{src}: a run of another configuration (identity {plan.superseded['identity']}) than "
                                f"{params_path} (identity {identity}); put {params_path} back to the settings that "
                                "run trained with (its MLflow run records them), then restore")
        if not plan.done:
            raise PipelineError(f"{src}: this archived run has no complete round: there is nothing to continue; "
                                "start the run afresh")
        current = sum(1 for _ in places["rounds"].glob("round=*/manifest.json"))
        moved = archive_run(params, {"identity": _identity_in_place(params), "rounds": current, "restart": True,
                                     "why": f"restoring {src}"})
        _swap_in(params, src, parts, moved)
        try:
            src.rmdir()
        except OSError:
            log.warning("%s: left in place, it holds files that are not the run's", src)
    return len(plan.done), moved.dest if moved is not None else None


def _swap_in(params, src: Path, parts: list[str], moved) -> None:
    """Move the archived run's `parts` from `src` into the output dirs, the rounds last. The marker of the run
    `moved` aside stays until then: a kill before the rounds moved puts that run back at the next start, a kill after
    leaves the swap done (restore_run sees a completed round). Anything that fails here moves what moved back to
    `src`, and that run back in place, before the error goes on."""
    import shutil

    from stages.loop.resume import _places, keep_archived, restore_run

    places, done = _places(params), []
    try:
        for name in ("state", "policy", "rounds"):
            if name in parts:
                dest = places[name]
                if dest.exists():
                    dest.rmdir()  # empty (a part that held something moved aside above)
                dest.parent.mkdir(parents=True, exist_ok=True)
                log.info("moving %s to %s", src / name, dest)
                shutil.move(str(src / name), str(dest))
                done.append(name)
    except BaseException:
        try:
            for name in reversed(done):
                shutil.move(str(places[name]), str(src / name))
            if moved is not None:
                restore_run(params, moved)
        except Exception as e:  # the first failure is the one to report
            log.warning("could not undo the restore (%s): the parts moved so far are %s, from %s", e, done, src)
        raise
    if moved is not None:
        keep_archived(moved)


def _identity_in_place(params) -> str:
    """The identity the run in the output dirs recorded (its first manifest, else its checkpoint), for its archive's
    name; "unknown" when neither is readable."""
    from stages import checkpoint
    from stages.io import read_json

    tp = params.train
    for path in (*sorted(Path(tp.rounds_dir).glob("round=*/manifest.json")), Path(tp.checkpoint_dir) / checkpoint.META):
        try:
            return str(read_json(path)["identity"] or "unknown")
        except (PipelineError, OSError, ValueError, KeyError, TypeError):
            continue
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    from stages.params import load_params

    parser = argparse.ArgumentParser(prog="python -m stages.restore",
                                     description="Bring an archived run back into the output dirs, to continue it.")
    parser.add_argument("archived", help="the archived run's dir: train.archive_dir/<time>-<identity>")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    rounds, aside = restore_archived(params, args.archived, args.params)
    where = f"; the run that was there is in {aside}" if aside is not None else ""
    how = ("`python -m flows.train` or `dvc repro`" if args.params == "params.yaml" else  # dvc repro: params.yaml's
           f"`python -m flows.train --params {shlex.quote(args.params)}`")
    print(f"restored {args.archived} ({rounds} complete rounds){where}. Continue it with {how}")


if __name__ == "__main__":
    run_cli(main)

"""Bring an archived run back, to continue it: `python -m stages.restore data/archive/<time>-<identity>`.

A configuration change (or `--restart`) moves the run in the output dirs to `train.archive_dir` and starts over
(stages/loop/resume.py). Going back to that configuration later starts over again: the archived run is only named in
the log. This command swaps it back in: the run now in the output dirs is archived as a configuration change would
archive it, the archived one's rounds, checkpoint and trainer state move back into `train.rounds_dir`,
`train.checkpoint_dir` and `train.state_dir`, and the next `python -m flows.train` (or `dvc repro`) resumes it after
its last complete round. It refuses, changing nothing, a dir that is or holds an output dir, a dir that holds no
run or no complete round, an archive that is not final, a damaged run, and a run of another configuration than the
params file's; a move that fails midway is undone, and a restore killed midway is finished by the next start
(docs/design.md §6).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.errors import PipelineError, run_cli, with_params

log = logging.getLogger(__name__)


def _at(params, src: Path):
    """`params` whose output dirs are the parts of the archived run in `src` (to plan it where it lies)."""
    train = params.train.model_copy(update={"rounds_dir": str(src / "rounds"), "checkpoint_dir": str(src / "policy"),
                                            "state_dir": str(src / "state")})
    return params.model_copy(update={"train": train})


def restore_archived(params, src: str | Path, params_path: str = "params.yaml") -> tuple[int, Path | None]:
    """Swap the archived run in `src` into the output dirs of `params` (under the checkout's run lock). Returns the
    archived run's complete rounds and where the run that was in place went (None: the output dirs were empty)."""
    from stages.io import write_json
    from stages.loop.lock import locked_outputs, run_lock
    from stages.loop.resume import (PART_FIELDS, PENDING, RESTORING, archive_run, complete_rounds, dirs_origin,
                                    finish_killed_restores, finish_restore, one_filesystem, output_dirs, plan_resume,
                                    restore_interrupted)

    src, places = Path(src), output_dirs(params)
    with run_lock("restore of an archived run", outputs=locked_outputs(params)):
        # as every start does: a restore killed midway is finished (src's, maybe), and a run killed in round 1 puts
        # the one it moved aside back (src's, maybe: then its rounds are gone from it)
        finished = [d.resolve() for d in finish_killed_restores(params)]
        pending = (src / PENDING).exists()
        restore_interrupted(params)
        if src.resolve() in finished or (pending and not (src / PENDING).exists() and not (src / "rounds").exists()):
            log.warning("%s: its run was already moved back into the output dirs by the step above", src)
            return len(complete_rounds(places["rounds"])), None
        root = src.resolve()
        for name, place in places.items():
            p = place.resolve()
            if p == root or root in p.parents or p in root.parents:
                raise PipelineError(f"{src}: overlaps {PART_FIELDS[name]} ({place}), an output dir; name the dir of an "
                                    f"archived run, in {params.train.archive_dir}")
        parts = [k for k in places if (src / k).exists()] if src.is_dir() else []
        if "rounds" not in parts:
            raise PipelineError(f"{src}: not an archived run (no rounds/ in it); `ls {params.train.archive_dir}` lists "
                                "the runs moved aside, named <time>-<identity>")
        if (src / PENDING).exists():
            raise PipelineError(f"{src}: this archive is not final: the run that moved it aside has not completed a "
                                f"round, and its next start in the checkout it names in {PENDING} moves it back; run "
                                "that checkout once (or delete the file if that checkout is gone), then restore")
        if (src / RESTORING).exists():  # one of these output dirs was finished above: other output dirs'
            raise PipelineError(f"{src}: a restore of this archive into other output dirs (the ones its {RESTORING} "
                                "names: another checkout's or another params file's) was killed midway; the next "
                                "start with those output dirs finishes it (if they are gone, delete that file)")
        one_filesystem({k: places[k] for k in parts}, src, "the archived run",
                       "move it (mv) to that filesystem, or set the output dirs there, then restore")
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
        moved = archive_run(params, {"identity": _identity_in_place(params), "restart": True, "why": f"restoring {src}",
                                     "rounds": len(complete_rounds(places["rounds"]))})
        # from here a kill (no handler runs) is finished by the next start: finish_killed_restores
        write_json({"from": dirs_origin(params), "parts": parts, "aside": str(moved.dest) if moved else None},
                   src / RESTORING)
        _swap_in(places, src, parts, params, moved)
        finish_restore(src, moved)
    return len(plan.done), moved.dest if moved is not None else None


def _swap_in(places: dict[str, Path], src: Path, parts: list[str], params, moved) -> None:
    """Move the archived run's `parts` from `src` into the output dirs `places`, the rounds last. Anything that fails
    here moves what moved back to `src`, drops the restore's marker and puts the run `moved` aside back in place,
    before the error goes on (an undo that fails before the marker went leaves it: the next start finishes the
    restore)."""
    from stages.loop.resume import RESTORING, SWAP_ORDER, move_in, rename_part, restore_run

    done = []
    try:
        for name in SWAP_ORDER:
            if name in parts:
                move_in(src, name, places[name])
                done.append(name)
    except BaseException:
        try:
            for name in reversed(done):
                rename_part(places[name], src / name)
            # the archived run whole again: from here the move-aside's own marker undoes a kill (restore_interrupted)
            (src / RESTORING).unlink()
            if moved is not None:
                restore_run(params, moved)
        except Exception as e:  # the first failure is the one to report
            log.warning("could not undo the restore (%s): the parts moved so far are %s, from %s", e, done, src)
        raise


def _identity_in_place(params) -> str:
    """The identity the run in the output dirs recorded (its first manifest, else its checkpoint), for its archive's
    name; "unknown" when neither is readable."""
    from stages import checkpoint
    from stages.io import UNREADABLE, read_json
    from stages.loop.resume import complete_rounds

    tp = params.train
    for path in (*complete_rounds(tp.rounds_dir), Path(tp.checkpoint_dir) / checkpoint.META):
        try:
            return str(read_json(path)["identity"] or "unknown")
        except UNREADABLE:
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
    print(f"restored {args.archived} ({rounds} complete rounds){where}. "
          f"{_how_to_continue(args.params, rounds, params.train.rounds)}")


def _how_to_continue(params_path: str, rounds: int, total: int) -> str:
    """The command that continues a run of `rounds` complete rounds when the params file asks for `total` (`dvc
    repro` only with params.yaml, which is the file it reads)."""
    train = with_params("python -m flows.train", params_path)
    if rounds < total:
        return f"Continue it with `{train}`" + (" or `dvc repro`" if params_path == "params.yaml" else "")
    raise_it = " or raise train.rounds in params.yaml and `dvc repro`" if params_path == "params.yaml" else ""
    return (f"It has {rounds} rounds and train.rounds asks for {total}: train more with `{train} --rounds N` (N > "
            f"{rounds}){raise_it}")


if __name__ == "__main__":
    run_cli(main)

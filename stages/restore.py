"""Bring an archived run back, to continue it: `python -m stages.restore data/archive/<time>-<identity>`.

A configuration change (or `--restart`) moves the run in the output dirs to `train.archive_dir` and starts over
(stages/loop/resume.py). Going back to that configuration later starts over again: the archived run is only named in
the log. This command swaps it back in: the run now in the output dirs is archived as a configuration change would
archive it, the archived one's rounds, checkpoint and trainer state move back into `train.rounds_dir`,
`train.checkpoint_dir` and `train.state_dir`, and the next `python -m flows.train` (or `dvc repro`) resumes it after
its last complete round. It refuses, changing nothing, a dir that holds no run, an archive that is not final, and a
run of another configuration than the params file's (docs/design.md §6).
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


def restore_archived(params, src: str | Path, params_path: str = "params.yaml") -> tuple[int, Path | None]:
    """Swap the archived run in `src` into the output dirs of `params` (under the checkout's run lock). Returns the
    archived run's complete rounds and where the run that was in place went (None: the output dirs were empty)."""
    import shutil

    from stages.loop.lock import run_lock
    from stages.loop.resume import PENDING, _places, archive_run, keep_archived, plan_resume, restore_interrupted

    src = Path(src)
    with run_lock("restore of an archived run"):
        restore_interrupted(params)  # as every start does: a run killed in round 1 puts the one it moved back first
        parts = [k for k in _places(params) if (src / k).exists()] if src.is_dir() else []
        if "rounds" not in parts:
            raise PipelineError(f"{src}: not an archived run (no rounds/ in it); `ls {params.train.archive_dir}` lists "
                                "the runs moved aside, named <time>-<identity>")
        if (src / PENDING).exists():
            raise PipelineError(f"{src}: this archive is not final: the run that moved it aside has not completed a "
                                f"round, and its next start in the checkout it names in {PENDING} moves it back; run "
                                "that checkout once (or delete the file if that checkout is gone), then restore")
        identity = params.identity()
        plan = plan_resume(_at(params, src), identity)  # reads only: a damaged run is refused here, as at a start
        if plan.superseded is not None:
            raise PipelineError(f"{src}: a run of another configuration (identity {plan.superseded['identity']}) than "
                                f"{params_path} (identity {identity}); put {params_path} back to the settings that "
                                "run trained with (its MLflow run records them), then restore")
        rounds = len(plan.done)
        current = sum(1 for _ in Path(params.train.rounds_dir).glob("round=*/manifest.json"))
        moved = archive_run(params, {"identity": _identity_in_place(params), "rounds": current, "restart": True,
                                     "why": f"restoring {src}"})
        # the marker of the run just moved stays until the archived one is in place: a kill before that moves it back
        # at the next start; a kill after, with the archived one's rounds in place, leaves it archived (restore_run)
        for name in ("state", "policy", "rounds"):  # the rounds last: with them in place the swap counts as done
            if name in parts:
                dest = _places(params)[name]
                if dest.exists():
                    dest.rmdir()  # empty (a part that held something moved aside above)
                dest.parent.mkdir(parents=True, exist_ok=True)
                log.info("moving %s to %s", src / name, dest)
                shutil.move(str(src / name), str(dest))
        if moved is not None:
            keep_archived(moved)
        try:
            src.rmdir()
        except OSError:
            log.warning("%s: left in place, it holds files that are not the run's", src)
    return rounds, moved.dest if moved is not None else None


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
    print(f"restored {args.archived} ({rounds} complete rounds){where}. Continue it with `python -m flows.train"
          f"{'' if args.params == 'params.yaml' else ' --params ' + shlex.quote(args.params)}` or `dvc repro`")


if __name__ == "__main__":
    run_cli(main)

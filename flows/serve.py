"""Serve the training flow alone on a schedule from this process, without `prefect deploy` or a worker.

It trains `train.rounds` rounds on each run (resuming as `python -m flows.train` does), and nothing else: no
prepare, evaluate or report, no `train.rounds` raised for new prompts, and DVC's `dvc.lock` is not updated (a
`dvc repro` afterwards brings them up to date: its train stage finds the rounds done). The whole pipeline on a
schedule is the `rloo-pipeline/nightly` deployment in prefect.yaml, with a worker (README: Scheduled training with
Prefect).

    python -m flows.serve --cron "0 2 * * *"        # runs until stopped; trigger runs from the UI too

`flow.serve` needs a Prefect API: the one PREFECT_API_URL names (a local `prefect server start` with its UI, or
Prefect Cloud), else a temporary local server started for this process, which the kernel stops when the process
dies (even by kill -9; flows/api.py). Since vLLM spawns, the `if __name__ == "__main__":` guard below is needed.
"""

from __future__ import annotations

import argparse

from stages.errors import bad_input_exits, run_cli
from stages.runtime import preload_malloc

# Re-executed once with tcmalloc (RLOO_MALLOC, docs/design.md §7) before Prefect and torch load; the flow runs this
# process spawns inherit it.
if __name__ == "__main__":
    with bad_input_exits():
        preload_malloc()

from flows.train import train_flow  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--name", default="rloo-serve", help="the deployment's name in Prefect")
    parser.add_argument("--cron", default="0 2 * * *", help="schedule (UTC); '' for manual runs only")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: %(default)s)")
    args = parser.parse_args(argv)
    from flows.api import prefect_api

    with prefect_api():  # PREFECT_API_URL's, or a temporary server that dies with this process
        train_flow.serve(
            name=args.name,
            cron=args.cron or None,
            parameters={"params_path": args.params},
            global_limit=1,  # one training run at a time
        )


if __name__ == "__main__":
    run_cli(main)

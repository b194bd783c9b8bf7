"""One error type for bad input, and the CLI wrapper that turns it into a one-line message and exit code 2.

Stages raise `PipelineError` at the boundary where input enters (params, Parquet files, model paths)
with a message that names the field or file and says what to do. `run_cli` prints it as a single
`error: ...` line on stderr and exits with code 2, so a shell, DVC or Prefect sees a clean failure.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2


class PipelineError(Exception):
    """Bad input: the message names the field/file and the fix, in one line."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's `main(argv)`; a `PipelineError` becomes `error: <message>` and exit code 2."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        main(argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

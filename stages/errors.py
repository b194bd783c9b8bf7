"""One error type for bad input, and the CLI wrapper that turns it into a one-line message and exit code 2.

Stages raise `PipelineError` at the boundary where input enters (params, Parquet files, model paths)
with a message that names the field or file and says what to do. `run_cli` prints it as a single
`error: ...` line on stderr and exits with code 2, so a shell, DVC or Prefect sees a clean failure.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class PipelineError(Exception):
    """Bad input: the message names the field/file and the fix, in one line."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's `main(argv)`; a `PipelineError` becomes `error: <message>` and exit code 2, Ctrl-C one line and
    exit code 130."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("stages", "flows", "__main__"):  # Prefect's logging setup leaves the root at WARNING: ours say INFO
        logging.getLogger(name).setLevel(logging.INFO)
    with bad_input_exits():
        main(argv)


@contextlib.contextmanager
def bad_input_exits() -> Iterator[None]:
    """A `PipelineError` inside becomes `error: <message>` on stderr and exit code 2 (run_cli's handling, without
    its logging set-up: for what runs before a command imports its libraries)."""
    try:
        yield
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever the process happened to be
        print("interrupted: what was complete is kept (every artifact is written whole or not at all); run the "
              "command again (without --restart) to continue", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


class _NoTracebackForBadInput(logging.Filter):
    """Keeps a log record but drops its traceback when the exception is a PipelineError (bad input, not a bug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_bad_input_tracebacks(*loggers: str) -> None:
    """Prefect logs a failed task or flow with its traceback; for a PipelineError the one-line message says it all."""
    for name in loggers or ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):  # engine: a worker's
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForBadInput) for f in logger.filters):
            logger.addFilter(_NoTracebackForBadInput())

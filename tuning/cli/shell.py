"""The error shell every entry point runs its work in: one line on stderr and an exit status for
every failure a user can act on, the same in every command.

    0    done
    1    the command ran and failed: `CommandFailed` ("error: ..."), a dataset that does not
         validate (`DatasetValidationError`: its full report), or a command's own `failed` errors
    2    a setting or input to fix, nothing run: `ConfigError` (`RayStartError`, `SearchBusy`, ...),
         `OutputPathError`, or a command's own `usage` errors ("error: ...")
    130  Ctrl-C: `CommandInterrupted`'s line, a KeyboardInterrupt's own message
         (`cfcml.data.prepare.PrepareInterrupted`), else "interrupted: <command> stopped"

Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from cfcml.config import ConfigError
from cfcml.data.validation_report import DatasetValidationError  # light: no torch before the work
from cfcml.outputs import OutputPathError
from tuning.workflows.errors import CommandFailed

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, OutputPathError)


def run_command(body: Callable[[], object], *, name: str, usage: tuple[type[Exception], ...] = (),
                failed: tuple[type[Exception], ...] = ()) -> int:
    """Run an entry point's work and return its exit status (see the module doc).

    Args:
        body: the work: the command's one workflow call and its printing. What it returns is ignored.
        name: the command, for the Ctrl-C line ("interrupted: <name> stopped").
        usage: the command's own exceptions that mean "fix the input" (exit 2), besides `USAGE_ERRORS`.
        failed: the command's own exceptions that mean "ran and failed" (exit 1); they take
            precedence over `usage` and `USAGE_ERRORS` (`prepare` reports a ConfigError with 1).

    Returns:
        `EXIT_OK`, `EXIT_FAILED`, `EXIT_USAGE` or `EXIT_INTERRUPTED`.

    Raises:
        Any other exception of `body`, unchanged.
    """
    try:
        body()
    except KeyboardInterrupt as exc:  # CommandInterrupted, PrepareInterrupted, a plain Ctrl-C
        _say(str(exc) or f"interrupted: {name} stopped", getattr(exc, "apart", False))
        return EXIT_INTERRUPTED
    except CommandFailed as exc:
        _say(f"error: {exc}", exc.apart)
        return EXIT_FAILED
    except DatasetValidationError as exc:  # the full report, every problem named
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    except failed as exc:
        _say(f"error: {exc}")
        return EXIT_FAILED
    except (*USAGE_ERRORS, *usage) as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    return EXIT_OK


def _say(line: str, apart: bool = False) -> None:
    print(f"\n{line}" if apart else line, file=sys.stderr)

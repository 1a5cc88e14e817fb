"""How a workflow says that its command failed, for `tuning.cli.shell` to print in one line.

A setting or input the user can fix is a `cfcml.config.ConfigError` (exit status 2), as everywhere
else; these two are the failures of a command that ran.
"""
from __future__ import annotations


class CommandFailed(Exception):
    """The command ran and did not produce its result (every trial failed, the final model diverged,
    the disk filled up): `error: <message>` on stderr, exit status 1.

    Args:
        message: the one line, without "error: ".
        apart: print a blank line before it, apart from the progress tables printed above it.
    """

    def __init__(self, message: str, *, apart: bool = False) -> None:
        super().__init__(message)
        self.apart = apart


class CommandInterrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says what was kept and how to continue (e.g. "--resume"):
    printed as it is on stderr, exit status 130.

    Args:
        message: the line.
        apart: print a blank line before it.
    """

    def __init__(self, message: str, *, apart: bool = False) -> None:
        super().__init__(message)
        self.apart = apart


def raise_child_failures(failures: list, what: str, again: str) -> None:
    """Raise for the searches that `tuning.runtime.concurrent.run_concurrently` reports unfinished
    (a list of its `ChildFailure`); nothing when the list is empty.

    Args:
        failures: the unfinished searches.
        what: what each label names, e.g. "variant" or "outer fold".
        again: how to continue after Ctrl-C, e.g. "the same compare command continues them".

    Raises:
        CommandInterrupted: one was interrupted (Ctrl-C), naming which.
        ConfigError: one refused a setting (its message, after its label).
        CommandFailed: one failed (its one line, after its label).
    """
    from cfcml.config import ConfigError
    from tuning.runtime.concurrent import CONFIG, INTERRUPTED

    if not failures:
        return
    stopped = [f.label for f in failures if f.kind == INTERRUPTED]
    if stopped:
        raise CommandInterrupted(f"the searches of {what} {', '.join(stopped)} were interrupted (their state is "
                                 f"saved); {again}", apart=True)
    first = failures[0]
    if first.kind == CONFIG:
        raise ConfigError(f"{what} {first.label}: {first.message}")
    others = f" (and {len(failures) - 1} more: {', '.join(f.label for f in failures[1:])})" if len(failures) > 1 else ""
    raise CommandFailed(f"the search of {what} {first.label} failed: {first.message}{others}", apart=True)

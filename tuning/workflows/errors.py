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

"""The error shell every entry point runs in (`tuning.cli.shell`): one line on stderr and the same
exit status for the same kind of failure, in every command."""
from __future__ import annotations

from pathlib import Path

import pytest

from cfcml.config import ConfigError
from cfcml.data.prepare import PrepareInterrupted
from cfcml.data.validation import DatasetValidationError, Problem, ValidationReport
from cfcml.outputs import OutputPathError
from tuning.cli.shell import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_command
from tuning.runtime.ray_cluster import RayStartError
from tuning.workflows.errors import CommandFailed, CommandInterrupted


def _raising(exc: BaseException):
    def body() -> None:
        print("progress")  # what the command printed before it failed stays on stdout
        raise exc
    return body


def _run(capsys: pytest.CaptureFixture, exc: BaseException, **kw) -> tuple[int, str]:
    code = run_command(_raising(exc), name="search", **kw)
    captured = capsys.readouterr()
    assert captured.out == "progress\n"
    return code, captured.err


def test_a_command_that_finishes_exits_0_and_prints_nothing_on_stderr(capsys: pytest.CaptureFixture) -> None:
    assert run_command(lambda: print("done"), name="search") == EXIT_OK == 0
    assert capsys.readouterr() == ("done\n", "")


@pytest.mark.parametrize("exc", [ConfigError("--folds: must be at least 2"), RayStartError("Ray did not start"),
                                 OutputPathError("--out x: is a file")])
def test_a_setting_to_fix_is_one_error_line_exit_2(capsys: pytest.CaptureFixture, exc: Exception) -> None:
    assert _run(capsys, exc) == (EXIT_USAGE, f"error: {exc}\n")
    assert EXIT_USAGE == 2


def test_a_commands_own_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    class PredictError(Exception):
        pass

    assert _run(capsys, PredictError("rows file x does not exist"), usage=(PredictError,)) == \
        (EXIT_USAGE, "error: rows file x does not exist\n")


def test_a_failed_run_is_one_error_line_exit_1_apart_from_the_progress_when_asked(
        capsys: pytest.CaptureFixture) -> None:
    assert _run(capsys, CommandFailed("final model: training diverged")) == \
        (EXIT_FAILED, "error: final model: training diverged\n")
    assert _run(capsys, CommandFailed("the disk holding /runs is full", apart=True)) == \
        (EXIT_FAILED, "\nerror: the disk holding /runs is full\n")
    assert EXIT_FAILED == 1


def test_a_dataset_that_does_not_validate_prints_its_whole_report_exit_1(capsys: pytest.CaptureFixture) -> None:
    report = ValidationReport(dataset="men", root=Path("/data/men"))
    report.problems += [Problem("missing-file", "t1_bbox.nii.gz missing", patient="p1"),
                        Problem("bad-label", "label 'x' unknown", patient="p2")]
    exc = DatasetValidationError(report)
    code, err = _run(capsys, exc)
    assert code == EXIT_FAILED and err == f"{exc}\n" and "p1" in err and "p2" in err


def test_a_commands_own_failures_take_precedence_over_usage(capsys: pytest.CaptureFixture) -> None:
    # prepare reports a bad spec (a ConfigError) with status 1, as it always has
    assert _run(capsys, ConfigError("spec: bad"), failed=(ConfigError, ValueError)) == \
        (EXIT_FAILED, "error: spec: bad\n")


@pytest.mark.parametrize("exc,line", [
    (KeyboardInterrupt(), "interrupted: search stopped\n"),
    (PrepareInterrupted("interrupted: prepare stopped before writing anything"),
     "interrupted: prepare stopped before writing anything\n"),
    (CommandInterrupted("search 's' interrupted with 1 of 2 trials finished; --resume continues it", apart=True),
     "\nsearch 's' interrupted with 1 of 2 trials finished; --resume continues it\n"),
])
def test_ctrl_c_is_one_line_exit_130(capsys: pytest.CaptureFixture, exc: KeyboardInterrupt, line: str) -> None:
    assert _run(capsys, exc) == (EXIT_INTERRUPTED, line)
    assert EXIT_INTERRUPTED == 130


def test_anything_else_is_a_bug_and_keeps_its_traceback(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ZeroDivisionError):
        run_command(_raising(ZeroDivisionError("division by zero")), name="search")
    with pytest.raises(ValueError):  # a ValueError is not a usage error unless the command says so
        run_command(_raising(ValueError("x")), name="search")

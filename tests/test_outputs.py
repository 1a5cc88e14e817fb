"""cfcml/outputs.py: output paths refused before any work, and files written atomically."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cfcml.outputs import OutputPathError, atomic_write, check_output_dir, check_output_file


@pytest.mark.parametrize("make, words", [
    (lambda t: t, "is a folder"),
    (lambda t: t / "a.csv" / "out.csv", "a.csv is a file, not a folder"),
    (lambda t: t / "a.csv" / "deeper" / "out.csv", "a.csv is a file, not a folder"),
    (lambda t: t / "a.csv", "is an input of this command"),
    (lambda t: t / "link.csv", "is an input of this command"),
    (lambda t: t / "hard.csv", "is an input of this command"),
    (lambda t: t / "sub" / ".." / "a.csv", "is an input of this command"),
])
def test_an_output_file_that_cannot_or_must_not_be_written_is_refused(tmp_path: Path, make, words) -> None:
    src = tmp_path / "a.csv"
    src.write_text("x\n1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.csv").symlink_to(src)
    os.link(src, tmp_path / "hard.csv")
    with pytest.raises(OutputPathError) as info:
        check_output_file(make(tmp_path), inputs=[src], what="--out")
    assert words in str(info.value) and str(info.value).startswith("--out ") and "\n" not in str(info.value)
    assert src.read_text() == "x\n1\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_in_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_file(ro / "out.csv")
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_dir(ro / "new")
    finally:
        ro.chmod(0o700)


def test_a_new_file_in_folders_still_to_create_is_accepted(tmp_path: Path) -> None:
    assert check_output_file(tmp_path / "new" / "deeper" / "out.csv") == tmp_path / "new" / "deeper" / "out.csv"
    assert check_output_dir(tmp_path / "new" / "folder") == tmp_path / "new" / "folder"


@pytest.mark.parametrize("make, words", [(lambda t: t / "a.csv", "is a file, not a folder"),
                                         (lambda t: t / "a.csv" / "sub", "a.csv is a file, not a folder")])
def test_an_output_folder_that_is_a_file_or_under_one_is_refused(tmp_path: Path, make, words) -> None:
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(OutputPathError, match=words):
        check_output_dir(make(tmp_path))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    out.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(out, half_then_fail)
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]
    atomic_write(out, lambda tmp: tmp.write_text("new\n"))
    assert out.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]

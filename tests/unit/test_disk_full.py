"""A full disk (ENOSPC, EDQUOT) is a one-line error naming what was being written, exit code 2, for
any command, and a training run's checkpoint write names the checkpoint."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

from tumorseg import cli
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError, is_disk_full


@pytest.mark.parametrize(
    ("code", "full"), [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EACCES, False), (errno.EIO, False)]
)
def test_disk_full_is_told_from_other_os_errors(code: int, full: bool) -> None:
    assert is_disk_full(OSError(code, "x")) is full
    assert not is_disk_full(ValueError("No space left on device"))


def test_an_atomic_write_on_a_full_disk_names_the_file_and_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    def full(self: Path, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DataError, match=r"report\.json: no space left on the device while writing it"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def _replace_handler(monkeypatch: pytest.MonkeyPatch, name: str, handler: object) -> None:
    """Command ``name`` runs ``handler`` (the parser is built from :data:`cli.COMMANDS` on each call)."""
    commands = [dataclasses.replace(c, handler=handler) if c.name == name else c for c in cli.COMMANDS]
    monkeypatch.setattr(cli, "COMMANDS", commands)


@pytest.mark.parametrize("filename", ["/data/out/case.nii.gz", None])
def test_any_command_on_a_full_disk_is_one_line_with_exit_code_2(
    filename: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def writes_on_a_full_disk(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    _replace_handler(monkeypatch, "split", writes_on_a_full_disk)
    assert cli.main(["split"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tumorseg split: error: ")
    assert f"{filename or 'the output folder'}: no space left on the device" in err


def test_other_os_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    _replace_handler(monkeypatch, "split", fails)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["split"])

"""Atomic output: complete or absent, never half-written."""

from __future__ import annotations

import pytest

from sbmoe.core.io import atomic_directory, atomic_open, read_json, write_json


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write('{"version": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert read_json(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_directory_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "index"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second, incomplete")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_directory_left_between_renames_is_restored_on_next_write(tmp_path):
    target = tmp_path / "index"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    target.rename(tmp_path / ".index.old")  # what a crash between the two renames leaves
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("this write fails too")
    assert (target / "a.txt").read_text() == "first"


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    write_json(tmp_path / "a.json", {})
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask

"""Atomic writes (fusion_cache/io.py): a write that dies half-way leaves the old file whole under its name and no
temporary file beside it; a disk error is a one-line error naming the file."""

from __future__ import annotations

import errno

import pytest

from fusion_cache.errors import FusionCacheError
from fusion_cache.io import atomic_write, atomic_write_text


def test_a_write_that_dies_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("the old result\n")

    def dies(f):
        f.write(b"half of the new re")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_text() == "the old result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_a_disk_error_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("the old result\n")

    def full(f):
        f.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FusionCacheError, match=r"^disk full while writing .*result\.json") as e:
        atomic_write(path, full)
    assert "\n" not in str(e.value)
    assert path.read_text() == "the old result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_whole_write_replaces_the_file_with_a_plain_files_mode(tmp_path):
    import os

    path = tmp_path / "result.json"
    path.write_text("old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

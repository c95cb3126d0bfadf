"""Shared checks for the hostile-input corpus: one `Error:` line, exit 1 or 2, no traceback, files untouched."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusion_cache.cli import main


def run(*args, input=None):
    """Invoke the CLI in-process; stderr is mixed into output (Click 8.2+ keeps both)."""
    return CliRunner().invoke(main, [a if isinstance(a, bytes) else str(a) for a in args], input=input)


# ---------------------------------------------------------------------------------------------- permissions

_DENIED: set[str] = set()  # absolute paths `deny` could not close to this process by chmod (root)


def deny(path: Path) -> Path:
    """chmod 0 `path`. Where that does not stop this process (root, or CAP_DAC_OVERRIDE), the `denials` fixture
    then fails the calls that would read it (os.open, os.scandir, os.listdir) with the PermissionError (EACCES)
    a user meets, so that the same code path runs and the same message is checked, as root too."""
    path = Path(path)
    path.chmod(0)
    if os.access(path, os.R_OK):
        if not getattr(os.open, "denials", False):
            raise RuntimeError("deny() as root needs the test to use the `denials` fixture")
        _DENIED.add(os.path.abspath(path))
    return path


def _denied(path) -> bool:
    if not _DENIED or not isinstance(path, (str, bytes, os.PathLike)):
        return False  # (an open file descriptor, os.scandir(fd), is not a path)
    return os.path.abspath(os.fsdecode(path)) in _DENIED


@pytest.fixture
def denials(monkeypatch):
    """Makes `deny` work as root: os.open, os.scandir and os.listdir raise PermissionError for a denied path
    (os.walk, which calls os.scandir, then skips it as it skips an unreadable folder)."""
    def guard(real):
        def call(path=".", *args, **kwargs):
            if _denied(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path, *args, **kwargs)
        call.denials = True
        return call

    for name in ("open", "scandir", "listdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    yield
    _DENIED.clear()


# ---------------------------------------------------------------------------------------------- fixtures


def extract_args(cifar_root, weights_file, out, *more) -> list:
    """`extract` of the tiny CIFAR-10: 40 + 20 images at 32 px, offline, no bar."""
    return ["extract", "--out", out, "--data-root", cifar_root, "--weights", weights_file, "--train-size", 40,
            "--test-size", 20, "--image-size", 32, "--no-download", "--skip-integrity-check", "--no-progress", *more]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, cifar_root, weights_file) -> Path:
    """A real cache of the tiny CIFAR-10 with two taps (fast to copy and tamper with); one per test module."""
    out = tmp_path_factory.mktemp("hostile") / "small.h5"
    r = run(*extract_args(cifar_root, weights_file, out, "--taps", "fused"))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def small_head(small_cache, tmp_path_factory) -> Path:
    """A standardized linear head on `small_cache`'s fused view, saved."""
    out = tmp_path_factory.mktemp("hostile-head") / "head"
    r = run("fit", small_cache, "--features", "fused", "--standardize", "--out", out)
    assert r.exit_code == 0, r.output
    return out


# ---------------------------------------------------------------------------------------------- checks


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file (and the target of every symlink name) under the roots; FIFOs by name."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in filenames + dirnames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[p] = "link:" + os.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    try:
                        with open(p, "rb") as f:
                            out[p] = hashlib.sha256(f.read()).hexdigest()
                    except PermissionError:  # a file a test made unreadable (`deny`)
                        out[p] = f"unreadable:{st.st_size}:{st.st_mtime_ns}"
                elif not stat.S_ISDIR(st.st_mode):
                    out[p] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


def clean_failure(result, fragment: str | None = None) -> str | None:
    """None when `result` is a clean one-line failure (containing `fragment`), else what is wrong."""
    text = result.output
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    if result.exit_code not in (1, 2):
        return f"exit code {result.exit_code}: {text!r} {result.exception!r}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {result.exception!r}: {text!r}"
    if "Traceback" in text:
        return f"traceback: {text!r}"
    if len(errors) != 1:
        return f"{len(errors)} Error lines: {text!r}"
    if fragment is not None and fragment not in text:
        return f"{fragment!r} not in {text!r}"
    return None

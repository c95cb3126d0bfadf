"""Shared checks for the hostile-input corpus: one `Error:` line, exit 1 or 2, no traceback, files untouched."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from fusion_cache.cli import main


def run(*args, input=None):
    """Invoke the CLI in-process; stderr is mixed into output (Click 8.2+ keeps both)."""
    return CliRunner().invoke(main, [a if isinstance(a, bytes) else str(a) for a in args], input=input)


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
                    with open(p, "rb") as f:
                        out[p] = hashlib.sha256(f.read()).hexdigest()
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

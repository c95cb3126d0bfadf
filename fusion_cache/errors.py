"""The one exception type a user sees: a message that names the problem and the fix."""


class FusionCacheError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    Messages follow the pattern "<what is wrong>; <what to do>", e.g.
    "unknown view 'mid'; choose one of early, late, fused, all, or a comma-separated tap list".
    """

    resumable = False  # True when running the same command again picks up the work where it stopped


def quote(text, limit: int = 80, marks: bool = True) -> str:
    """User input as an error message quotes it: printable, on one line, and at most about `limit` characters.

    `quote("mid")` is `'mid'`, as `repr` writes it (control characters, line breaks and lone surrogates
    escaped); text longer than `limit` is cut and ends with "…" (`'xxxx…'`), so a 100,000-character label
    or --backbone gives a short error line. `marks=False` leaves out the quote marks and escapes only what
    is not printable (for a path, whose backslashes stay as they are).
    """
    s = str(text, "utf-8", "backslashreplace") if isinstance(text, bytes) else str(text)
    cut = len(s) > limit
    s = s[:limit]
    if marks:
        shown = repr(s)
        if len(shown) > limit + 2:  # escapes made it longer
            shown, cut = shown[: limit + 1] + shown[-1], True
        return shown[:-1] + "…" + shown[-1] if cut else shown
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    if len(shown) > limit:
        shown, cut = shown[:limit], True
    return shown + "…" if cut else shown

"""The one exception type a user sees: a message that names the problem and the fix."""


class FusionCacheError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    Messages follow the pattern "<what is wrong>; <what to do>", e.g.
    "unknown view 'mid'; choose one of early, late, fused, all, or a comma-separated tap list".
    """

    resumable = False  # True when running the same command again picks up the work where it stopped

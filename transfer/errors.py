"""Problems a user can fix: :class:`UserError`, which every stage reports as one line."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix; the message is shown as-is, on one line."""


class ParamError(UserError):
    """A bad value of one param found after the params file loaded (an architecture that does
    not exist, a device this machine lacks), or of a key of ``source`` (a sidecar)."""

    def __init__(self, key: str, problem: str, source: str) -> None:
        super().__init__(f"{source}: {key} {problem}")


def say(line: str) -> None:
    """``line`` on stderr in one write, so that lines of processes sharing it never interleave."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` (an exception, say) on one line, each run of whitespace one space, cut to ``limit``
    characters: the messages of exceptions may span lines, and every stage reports one line."""
    return " ".join(str(text).split())[:limit]

"""The one shape of an error an operator or a build reads: what went wrong; what to do.

`str(e)` is "<why>; <what to do>" on one line. Subclasses set `todo` for their kind of
failure; a raise site may give a more precise one.
"""

from __future__ import annotations


class ActionableError(Exception):
    """A failure the caller reports as one line. `why` and `todo` are plain text."""

    todo = "retry; if it keeps failing, report it"

    def __init__(self, why: str, todo: str | None = None):
        why = " ".join(why.split())  # one line, whatever a tool printed
        super().__init__(why)
        self.why = why
        if todo is not None:
            self.todo = todo

    def __str__(self) -> str:
        return f"{self.why}; {self.todo}"

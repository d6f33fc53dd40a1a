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


class UserError(Exception):
    """Bad input the user can fix (arguments, a config file, a daemon not running):
    printed as one line, no traceback."""


# The one exit-code table of every `hived` command. A build's own exit code passes through
# `hived run` unchanged; these are what the command itself says.
EXIT_OK = 0
EXIT_FAILED = 1        # the command ran and its work failed (a cache operation, a failed check)
EXIT_USAGE = 2         # bad input: arguments, a config file, no daemon where one was expected
EXIT_INFRA = 125       # the build could not run (as `docker run` says it): not the build's own code
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def guard(fn, prog: str = "hived", what: str = "") -> int:
    """Run a command's body; turn every expected failure into one line on stderr and an exit
    code from the table above. `what` names the operation in the message ("pull REF")."""
    import errno
    import os
    import sys

    failed = f"{what} failed: " if what else ""
    try:
        return fn()
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ActionableError as exc:
        # An error that names its own operation (`what`) is not prefixed twice.
        print(f"{prog}: {'' if getattr(exc, 'what', None) else failed}{exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if what:
            print(f"{prog}: {what} interrupted; run it again (nothing partial is kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PermissionError as exc:
        print(f"{prog}: {failed}no permission for {exc.filename}; run as root or choose another directory",
              file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"{prog}: {failed}disk full ({exc.filename or ''}); free space or use a bigger disk",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"{prog}: {failed}{exc.strerror or exc} ({exc.filename or ''}); check that path", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if os.environ.get("HIVED_DEBUG"):
            raise
        print(f"{prog}: {failed}{type(exc).__name__}: {exc}; rerun with HIVED_DEBUG=1 for a traceback "
              "and report it", file=sys.stderr)
        return EXIT_FAILED

"""Errors of the repository cache: each one says what went wrong and what to do.

`str(e)` is "<why>; <what to do>", one line, ready for a build's failure reason
(`repository https://host/x.git: revision nope does not exist; check ...`). Nothing in a
message ever carries a credential: URLs are shown with their user info removed.
"""

from __future__ import annotations

from hived.errors import ActionableError


class RepoError(ActionableError):
    """Base of this cache's errors (see hived.errors)."""


class InvalidUrl(RepoError):
    """Not a repository URL this cache fetches: malformed, hostile, or a protocol not allowed."""

    todo = "name the repository as https://host/path, ssh://[user@]host/path, user@host:path or git://host/path"


class InvalidRevision(RepoError):
    """The revision is not a branch, tag, ref or commit name."""

    todo = "name a branch, a tag, refs/... or a commit id (hex)"


class RepoNotFound(RepoError):
    """The server says the repository does not exist (or does not show it to us)."""

    todo = "check the repository URL (and, for a private repository, the credentials)"


class RevisionNotFound(RepoError):
    """The repository exists but has no such branch, tag or commit."""

    todo = "check the branch, tag or commit (was it pushed?)"


class AuthError(RepoError):
    """Missing or rejected credentials."""

    todo = "check the repository credentials (token or user and password)"


class RemoteUnavailable(RepoError):
    """The server could not be reached, timed out, or the connection broke mid-fetch."""

    todo = "check that the git server is up and reachable, then retry (nothing partial was kept)"


class GitError(RepoError):
    """git failed in a way the cache does not recognise."""

    todo = "retry; if it persists, check the repository with git fsck"


class RepoCacheError(RepoError):
    """The cache itself: disk full, tool missing, entry in use or not cached."""

    todo = "see the message"


class CacheFull(RepoCacheError):
    todo = "free disk space under the repository cache or lower its bound (nothing partial was kept)"


class NotCached(RepoCacheError):
    todo = "ask for it with checkout_image() or bundle() first"


class InUse(RepoCacheError):
    todo = "wait until the cells using it are gone, then retry"


class BadBundle(RepoCacheError):
    """A peer's bundle failed git's checks or is not of the commit asked for: a wrong byte or a
    lying peer (counted as such); the next peer or the origin serves the commit."""

    bad_content = True

"""Errors of the build-image cache: each one says what went wrong and what to do.

`str(e)` is "<why>; <what to do>", ready for a one-line message
(`hived image: pull REF failed: <why>; <what to do>`).
"""

from __future__ import annotations

from hived.errors import ActionableError


class OciError(ActionableError):
    """Base of this cache's errors (see hived.errors)."""


class InvalidReference(OciError):
    """The image reference cannot be parsed."""

    todo = "write it as [registry[:port]/]name[:tag][@sha256:<64 hex>]"


class NotFound(OciError):
    """The registry says the repository, tag or manifest does not exist."""

    todo = "check the image name and tag (does it exist in that registry?)"


class AuthError(OciError):
    """Missing or rejected credentials, or no access to the repository."""

    todo = "check the user name and password (hived image pull --user U --password-stdin)"


class RegistryUnavailable(OciError):
    """The registry could not be reached, or the connection broke."""

    todo = "check that the registry is up and reachable, then pull again (nothing partial was kept)"


class RegistryError(OciError):
    """The registry answered with an error or with something that is not a valid image."""

    todo = "retry later; if it persists, check the registry's logs"


class DigestMismatch(OciError):
    """Content does not match its digest or declared size."""

    todo = "the registry's copy is corrupt or was tampered with: re-push the image (nothing was cached)"


class UnsupportedImage(OciError):
    """Valid content that this cache cannot turn into a build image."""

    todo = "use a linux/amd64 container image (OCI or Docker schema 2)"


class LayerError(OciError):
    """A layer tar is malformed or unsafe (path traversal, bad links)."""

    todo = "rebuild the image with a standard tool (docker build, buildah); nothing was cached"


class CacheError(OciError):
    """The cache itself: disk full, image in use, not cached, tool missing."""

    todo = "see the message; `hived image ls` shows what is cached"


class NotCached(CacheError):
    todo = "pull it first: hived image pull REF"


class InUse(CacheError):
    todo = "wait until the cells using it are gone, then retry"

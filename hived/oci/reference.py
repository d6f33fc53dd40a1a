"""Image references: `[registry[:port]/]name[:tag][@digest]`, normalised like Docker does.

* The first path component is a registry when it contains "." or ":", is "localhost",
  or has upper-case letters; otherwise the registry is docker.io.
* On docker.io a one-component name gets "library/" (`debian` -> `docker.io/library/debian`);
  index.docker.io is docker.io, and its API lives at registry-1.docker.io.
* No tag and no digest means tag "latest". With a digest, the digest decides what is
  pulled; a tag beside it is kept for display only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hived.oci.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
MAX_NAME = 255


def valid_digest(digest: str) -> bool:
    return bool(_DIGEST.match(digest))


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str  # path inside the registry, e.g. library/debian
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """host[:port] to send HTTP requests to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse(text: str) -> Reference:
    """Parse and normalise a reference; raises InvalidReference with the reason."""
    raw = text
    text = text.strip()
    if not text:
        raise InvalidReference("empty image reference")
    if any(c.isspace() for c in text):
        raise InvalidReference(f"image reference {raw!r} contains white space")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReference(f"{raw!r}: bad digest {digest!r} (want sha256:<64 lower-case hex>)")
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReference(f"{raw!r}: bad tag {tag!r}")
    if not text:
        raise InvalidReference(f"{raw!r}: no repository name")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        registry, path = first, rest
        if not _DOMAIN.match(registry):
            raise InvalidReference(f"{raw!r}: bad registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, text
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    for comp in path.split("/"):
        if not _PATH_COMPONENT.match(comp):
            raise InvalidReference(
                f"{raw!r}: bad name component {comp!r} (lower-case letters, digits and . _ - only)")
    if len(path) > MAX_NAME:
        raise InvalidReference(f"{raw!r}: repository name longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)

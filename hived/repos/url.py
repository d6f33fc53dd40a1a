"""Repository URLs, revisions and credentials: parsed, normalised and checked before git sees them.

A URL decides which mirror serves it (`Remote.key`, a hash of the normalised URL) and what git
fetches (`Remote.fetch_url`). Everything that could make git run a command or read an option
is refused here, before any process starts: transport helpers (`ext::`, `fd::`, any `x::`),
leading dashes anywhere git or ssh would read them, control characters, protocols the box does
not allow. The protocol allowlist is enforced a second time by git itself (see `git.py`).

A password in the URL (`https://user:token@host/x.git`) is moved out of it into `Credentials`:
it then travels to git in its environment only, never in a command line or on disk.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from hived.repos.errors import InvalidRevision, InvalidUrl

ALL_PROTOCOLS = ("https", "http", "ssh", "git", "file")
DEFAULT_PROTOCOLS = ("https", "ssh", "git")  # file: opt in (it reads the box's own disk)
MAX_URL = 2048
MAX_REF = 1024

_HELPER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+.-]*::")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCP = re.compile(r"^(?:(?P<user>[^@/:\s]+)@)?(?P<host>[^@/:\s\[\]]+|\[[0-9A-Fa-f:.]+\]):(?P<path>.*)$")
_HOST = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*)|\[[0-9A-Fa-f:.]+\])$")
_USER = re.compile(r"^[A-Za-z0-9_.+~%-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME_ALIASES = {"git+ssh": "ssh", "ssh+git": "ssh"}
_DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
ABBREV_SHA = re.compile(r"^[0-9a-f]{7,63}$")


@dataclass(frozen=True)
class Credentials:
    """For http(s) remotes: user and password (or token). `token` alone is sent as the
    password of user `x-access-token` (what GitHub, Gitea and GitLab accept). Never shown."""

    username: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def token(cls, token: str, username: str = "x-access-token") -> Credentials:
        return cls(username, token)

    def header(self) -> str:
        raw = f"{self.username or 'x-access-token'}:{self.password}".encode()
        return "Authorization: Basic " + base64.b64encode(raw).decode()

    def fingerprint(self, key: str) -> str:
        """Identifies (key, these credentials) in memory without keeping the secret around."""
        return hashlib.sha256(f"{key}\0{self.username}\0{self.password}".encode()).hexdigest()

    def secrets(self) -> list[str]:
        """What must never show: the password (or a token given as the user), the header value."""
        return [s for s in (self.password or self.username, self.header().split(" ", 2)[2]) if s]


@dataclass(frozen=True)
class Remote:
    fetch_url: str  # what git is given: no password in it
    normal: str  # the normalised URL: what the key hashes, what messages and the index show
    scheme: str  # https http ssh git file
    key: str  # the mirror's name
    netloc: str = ""  # scheme://host[:port]/ for http(s): scopes the credential header

    def __str__(self) -> str:
        return self.normal


def _bad(url: str, why: str) -> InvalidUrl:
    shown = url if len(url) <= 200 else url[:200] + "..."
    return InvalidUrl(f"repository URL {_CONTROL.sub('?', shown)!r} {why}")


def _no_dash(url: str, what: str, value: str) -> None:
    if value.startswith("-"):
        raise _bad(url, f"has a {what} that starts with '-' (it would read as an option)")


def _check_path(url: str, path: str) -> str:
    for seg in path.split("/"):
        _no_dash(url, "path segment", unquote(seg))
    return path


def _key(normal: str) -> str:
    return hashlib.sha256(normal.encode()).hexdigest()[:32]


def _canonical_path(path: str) -> str:
    """For the key only: one spelling per repository (no trailing '/', no '.git')."""
    path = re.sub(r"/+", "/", path).rstrip("/")
    if path.endswith(".git"):
        path = path[:-4]
    return path or "/"


def parse_url(url: str, protocols: tuple[str, ...] = DEFAULT_PROTOCOLS) -> tuple[Remote, Credentials | None]:
    """Check and normalise url; returns the remote and the credentials found in it (if any)."""
    if not isinstance(url, str) or not url:
        raise InvalidUrl("no repository URL given")
    if len(url) > MAX_URL:
        raise _bad(url, f"is longer than {MAX_URL} characters")
    if _CONTROL.search(url):
        raise _bad(url, "contains control characters")
    if url != url.strip():
        raise _bad(url, "has leading or trailing spaces")
    if url.startswith("-"):
        raise _bad(url, "starts with '-' (it would read as an option)")
    if _HELPER.match(url):
        raise _bad(url, "uses a git transport helper (<transport>::<address>), which can run commands")
    creds = None
    m = _SCHEME.match(url)
    if url.startswith("/"):
        remote = _local(url, os.path.normpath(url))
    elif m:
        scheme = _SCHEME_ALIASES.get(m.group(1).lower(), m.group(1).lower())
        if scheme not in ALL_PROTOCOLS:
            raise _bad(url, f"uses protocol {scheme!r}; this cache fetches {', '.join(ALL_PROTOCOLS)}")
        if scheme == "file":
            remote, creds = _file(url), None
        else:
            remote, creds = _network(url, scheme)
    elif _SCP.match(url):
        remote = _scp(url)
    else:
        raise _bad(url, "is not an absolute path, a scheme://host/path URL or user@host:path")
    if remote.scheme not in protocols:
        allowed = ", ".join(protocols) or "none"
        raise _bad(url, f"uses protocol {remote.scheme!r}, which this box does not allow (allowed: {allowed})")
    return remote, creds


def _local(url: str, path: str) -> Remote:
    _check_path(url, path)
    normal = "file://" + path
    return Remote(path, normal, "file", _key("file://" + _canonical_path(path)))


def _file(url: str) -> Remote:
    rest = url[len("file://"):]
    host, _, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise _bad(url, "names a host in a file:// URL")
    return _local(url, os.path.normpath("/" + path))


def _network(url: str, scheme: str) -> tuple[Remote, Credentials | None]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _bad(url, f"is malformed ({e})") from None
    if parts.fragment:
        raise _bad(url, "has a #fragment")
    if parts.query and scheme not in ("http", "https"):
        raise _bad(url, "has a ?query")
    host = parts.hostname or ""
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    if bracketed:
        host = f"[{host}]"
    if not host or not _HOST.match(host):
        raise _bad(url, "has no valid host name")
    _no_dash(url, "host", host)
    user = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if user:
        _no_dash(url, "user name", user)
        if not _USER.match(parts.username or ""):
            raise _bad(url, "has an unusual user name")
    creds = None
    if parts.password is not None:
        if scheme not in ("http", "https"):
            raise _bad(url, "has a password; only http(s) URLs take credentials")
        creds = Credentials(user, password)
    path = _check_path(url, parts.path or "/")
    if not path.startswith("/"):
        path = "/" + path
    hostport = host.lower() + (f":{port}" if port and port != _DEFAULT_PORTS.get(scheme) else "")
    netloc_git = host + (f":{port}" if port else "")
    userpart = ""
    if scheme == "ssh" and user:
        userpart = f"{parts.username}@"  # the ssh user selects the account: part of the identity
    elif scheme in ("http", "https") and user and creds is None:
        creds = Credentials(user, "")  # a user alone may be a token (https://<token>@host/): not in the URL
    query = f"?{parts.query}" if parts.query else ""
    fetch_url = f"{scheme}://{userpart}{netloc_git}{path}{query}"
    normal = f"{scheme}://{userpart}{hostport}{path}{query}"
    key_src = f"{scheme}://{userpart}{hostport}{_canonical_path(path)}{query}"
    netloc = f"{scheme}://{netloc_git}/" if scheme in ("http", "https") else ""
    return Remote(fetch_url, normal, scheme, _key(key_src), netloc), creds


def _scp(url: str) -> Remote:
    m = _SCP.match(url)
    assert m is not None
    user, host, path = m.group("user") or "", m.group("host"), m.group("path")
    if not _HOST.match(host):
        raise _bad(url, "has no valid host name")
    _no_dash(url, "host", host)
    if user:
        _no_dash(url, "user name", user)
        if not _USER.match(user):
            raise _bad(url, "has an unusual user name")
    if not path:
        raise _bad(url, "has no repository path")
    _check_path(url, path)
    userpart = f"{user}@" if user else ""
    shown = path if path.startswith("/") else "/~/" + path
    normal = f"ssh://{userpart}{host.lower()}{shown}"
    return Remote(url, normal, "ssh", _key(f"ssh://{userpart}{host.lower()}{_canonical_path(shown)}"))


# ------------------------------------------------------------------------------------ revisions


@dataclass(frozen=True)
class Rev:
    """kind: "commit" (a full object id), "ref" (refs/... or HEAD) or "name" (a branch or a
    tag, or an abbreviated commit id)."""

    kind: str
    name: str

    @property
    def remote_ref(self) -> str:
        return self.name

    @property
    def local_ref(self) -> str:
        """Where the mirror keeps a ref outside refs/heads and refs/tags."""
        if self.name == "HEAD":
            return "refs/hived/HEAD"
        return self.name

    @property
    def extra_refspec(self) -> str | None:
        """The refspec to fetch besides all branches and tags, if any."""
        if self.kind == "ref" and not self.name.startswith(("refs/heads/", "refs/tags/")):
            return f"+{self.remote_ref}:{self.local_ref}"
        return None

    def __str__(self) -> str:
        return self.name


_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def parse_rev(rev: str | None) -> Rev:
    """A branch, tag, full ref, HEAD or commit id; anything git would read otherwise is refused."""
    if rev is None or rev == "":
        return Rev("ref", "HEAD")
    if not isinstance(rev, str):
        raise InvalidRevision(f"revision {rev!r} is not a string")
    shown = _CONTROL.sub("?", rev[:100])
    if len(rev) > MAX_REF:
        raise InvalidRevision(f"revision {shown!r}... is longer than {MAX_REF} characters")
    if rev.startswith("-"):
        raise InvalidRevision(f"revision {shown!r} starts with '-' (it would read as an option)")
    low = rev.lower()
    if FULL_SHA.match(low):
        return Rev("commit", low)
    if rev == "HEAD":
        return Rev("ref", "HEAD")
    why = _ref_problem(rev)
    if why:
        raise InvalidRevision(f"revision {shown!r} is not a valid ref name ({why})")
    if rev.startswith("refs/"):
        if rev.count("/") < 2:
            raise InvalidRevision(f"revision {shown!r} is not a valid ref name (refs/<kind>/<name>)")
        return Rev("ref", rev)
    return Rev("name", rev)


def _ref_problem(rev: str) -> str:
    """git check-ref-format's rules (with --allow-onelevel)."""
    if _REF_BAD.search(rev):
        return "spaces, control characters and ~^:?*[\\ are not allowed"
    if ".." in rev or "@{" in rev or rev == "@":
        return "'..', '@{' and '@' are not allowed"
    if rev.endswith(("/", ".")) or rev.startswith("/") or "//" in rev:
        return "empty component or trailing '.'"
    for comp in rev.split("/"):
        if comp.startswith(".") or comp.endswith(".lock"):
            return "a component starts with '.' or ends with '.lock'"
    return ""

"""The box's repository cache: bare mirrors, checkout images and bundles per commit (see cache.py)."""

from hived.repos.cache import CheckoutBundle, CheckoutImage, RepoCache
from hived.repos.errors import (
    AuthError,
    CacheFull,
    GitError,
    InUse,
    InvalidRevision,
    InvalidUrl,
    NotCached,
    RemoteUnavailable,
    RepoCacheError,
    RepoError,
    RepoNotFound,
    RevisionNotFound,
)
from hived.repos.url import Credentials, parse_rev, parse_url

__all__ = ["AuthError", "CacheFull", "CheckoutBundle", "CheckoutImage", "Credentials", "GitError", "InUse",
           "InvalidRevision", "InvalidUrl", "NotCached", "RemoteUnavailable", "RepoCache", "RepoCacheError",
           "RepoError", "RepoNotFound", "RevisionNotFound", "parse_rev", "parse_url"]

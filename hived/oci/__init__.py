"""Build images: OCI images pulled from a registry once per box, cached by digest, and
turned into read-only filesystem images (erofs) that cells get as a disk.

    registry.py   Registry HTTP API v2 client: manifests, blobs (verified), token/basic auth
    reference.py  image references, normalised like Docker
    layers.py     applying layer tars (whiteouts, links, ownership; no escapes)
    cache.py      the content-addressed cache: pull, acquire/release, LRU bound, gc
    cli.py        `hived image pull|ls|rm`
"""

from hived.oci.cache import DEFAULT_ROOT, CachedImage, ImageCache, ImageConfig
from hived.oci.errors import OciError
from hived.oci.registry import Credentials

__all__ = ["DEFAULT_ROOT", "CachedImage", "Credentials", "ImageCache", "ImageConfig", "OciError"]

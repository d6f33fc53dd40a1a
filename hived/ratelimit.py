"""Token bucket: the compiled one, or its pure-Python twin (see hived.native)."""

from hived.native import load

_impl = load("hived._tokenbucket")
TokenBucket = _impl.TokenBucket
IMPLEMENTATION = "cython" if _impl.__name__ == "hived._tokenbucket" else "python"

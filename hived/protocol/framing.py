"""Frame splitter and packer: the compiled one, or its pure-Python twin (see hived.native)."""

from hived.native import load

_impl = load("hived._framing")
FrameDecoder = _impl.FrameDecoder
pack_frame = _impl.pack_frame
IMPLEMENTATION = "cython" if _impl.__name__ == "hived._framing" else "python"
HEADER_SIZE = 4

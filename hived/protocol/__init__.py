"""The hived wire protocol: codec (no I/O) -> session state machine -> asyncio channel.

Layers depend one way only: `framing` and `codec` know bytes; `session` knows the
hello/version rules and who may send what; `channel` (host side, asyncio) and the
cell daemon's own loop glue them to sockets.
"""

from hived.protocol.codec import Message, ProtocolError, decode, encode, encode_frame

__all__ = ["Message", "ProtocolError", "decode", "encode", "encode_frame"]

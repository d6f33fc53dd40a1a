"""The hived wire protocol: codec (no I/O) -> session state machine -> asyncio channel.

Layers depend one way only: `framing` and `codec` know bytes; `session` knows the
hello/version rules and who may send what; `channel` (host side, asyncio) and the
cell daemon's own loop glue them to sockets.

Import the layer you need (hived.protocol.codec, .session, .channel): this package
imports nothing itself, so the compiled framing module can import .errors freely.
"""

r"""Per-connection protocol rules, no I/O: hello first, version negotiation, who may send what.

    AWAIT_HELLO --peer hello, common version--> OPEN --close()/fatal error--> CLOSED
         \----------------fatal error / no common version---------------------^

The one gatekeeper is `_set_state`; any other transition is a bug and raises.
"""

import enum

from hived.protocol.codec import MAIN, MAX_FRAME, Message, Schema
from hived.protocol.errors import ProtocolError
from hived.protocol.framing import pack_frame


class LinkState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


_ALLOWED = {
    LinkState.AWAIT_HELLO: {LinkState.OPEN, LinkState.CLOSED},
    LinkState.OPEN: {LinkState.CLOSED},
    LinkState.CLOSED: set(),
}


class Session:
    """One side of one connection. `role` is ours; `peer_roles` are the roles we accept."""

    def __init__(
        self,
        role: str,
        name: str,
        peer_roles: frozenset[str] | set[str],
        *,
        max_frame: int = MAX_FRAME,
        min_version: int | None = None,
        max_version: int | None = None,
        schema: Schema = MAIN,
    ) -> None:
        self.schema = schema  # the message table this link speaks (main, or the peer link's)
        min_version = schema.min_version if min_version is None else min_version
        max_version = schema.version if max_version is None else max_version
        self.role = role
        self.name = name
        self.peer_roles = frozenset(peer_roles)
        self.max_frame = max_frame  # what we accept
        self.min_version = min_version
        self.max_version = max_version
        self.state = LinkState.AWAIT_HELLO
        self.version = max_version
        self.peer_role: str | None = None
        self.peer_name: str | None = None
        self.peer_max_frame = 4096  # until the peer says more, send only small frames

    def _set_state(self, new: LinkState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"link state {self.state.value} -> {new.value} is not allowed")
        self.state = new

    def hello_frame(self) -> bytes:
        body = self.schema.encode(
            "hello",
            1,
            min_version=self.min_version,
            max_version=self.max_version,
            role=self.role,
            peer=self.name,
            max_frame=self.max_frame,
        )
        return pack_frame(body, 4096)

    def receive(self, body: bytes) -> Message:
        """Turn one frame body into a Message, enforcing the link's rules."""
        if self.state is LinkState.CLOSED:
            raise ProtocolError("bad_frame", "link is closed")
        if self.state is LinkState.AWAIT_HELLO:
            msg = self._fail_closed(self.schema.decode, body, 1)
            if msg.name != "hello":
                self._set_state(LinkState.CLOSED)
                raise ProtocolError("no_hello", f"first message must be hello, got {msg.name}")
            self._accept_hello(msg)
            return msg
        msg = self._fail_closed(self.schema.decode, body, self.version)
        if msg.name == "hello":
            self._set_state(LinkState.CLOSED)
            raise ProtocolError("bad_message", "hello sent twice")
        if self.peer_role not in self.schema.by_name[msg.name].senders:
            raise ProtocolError(
                "not_allowed", f"a {self.peer_role} may not send {msg.name}", fatal=False
            )
        return msg

    def _fail_closed(self, fn, *args):
        try:
            return fn(*args)
        except ProtocolError as exc:
            if exc.fatal:
                self._set_state(LinkState.CLOSED)
            raise

    def _accept_hello(self, msg: Message) -> None:
        role = msg["role"]
        if role not in self.peer_roles:
            self._set_state(LinkState.CLOSED)
            raise ProtocolError(
                "not_allowed", f"this {self.role} does not talk to a {role} (peer {msg['peer']!r})"
            )
        lo = max(self.min_version, msg["min_version"])
        hi = min(self.max_version, msg["max_version"])
        if lo > hi:
            self._set_state(LinkState.CLOSED)
            raise ProtocolError(
                "version",
                f"no common protocol version: we speak {self.min_version}..{self.max_version}, "
                f"peer {msg['peer']!r} speaks {msg['min_version']}..{msg['max_version']}",
            )
        self.version = hi
        self.peer_role = role
        self.peer_name = msg["peer"]
        self.peer_max_frame = msg["max_frame"]
        self._set_state(LinkState.OPEN)

    def frame(self, name: str, **fields) -> bytes:
        """Encode an outgoing message for this link's version and the peer's frame limit."""
        if self.state is not LinkState.OPEN and name != "error":
            raise ProtocolError("no_hello", f"cannot send {name} before the hello exchange")
        version = self.version if self.state is LinkState.OPEN else 1
        return pack_frame(self.schema.encode(name, version, **fields), self.peer_max_frame)

    def error_frame(self, exc: ProtocolError, ref: str = "") -> bytes:
        message = exc.message if len(exc.message) <= 4096 else exc.message[:4093] + "..."
        body = self.schema.encode("error", 1, code=exc.code, message=message, fatal=exc.fatal, ref=ref)
        return pack_frame(body, max(self.peer_max_frame, 4096))

    def close(self) -> None:
        if self.state is not LinkState.CLOSED:
            self._set_state(LinkState.CLOSED)


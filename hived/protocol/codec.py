"""Encode and decode message bodies (no I/O), built from the generated message table.

A body is a msgpack array: [message id, field 1, field 2, ...] in schema order. Fields
a peer's version does not know are left off the end; missing trailing optional fields
take their default; trailing fields this side does not know (a newer peer) are ignored.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from hived.protocol import messages as table
from hived.protocol.errors import ProtocolError
from hived.protocol.framing import pack_frame

VERSION = table.VERSION
MIN_VERSION = table.MIN_VERSION
MAX_FRAME = table.MAX_FRAME

Check = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str
    since: int
    optional: bool
    default: Any
    check: Check  # returns the (normalised) value or raises ValueError


@dataclass(frozen=True, slots=True)
class MessageSpec:
    name: str
    id: int
    since: int
    senders: frozenset[str]
    fields: tuple[FieldSpec, ...]


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _check_for(ftype: str, spec: dict) -> Check:
    lo, hi = spec.get("min"), spec.get("max")
    item_max = spec.get("item_max")
    choices = spec.get("choices")

    if ftype == "bool":
        def check(v):
            if not isinstance(v, bool):
                raise ValueError(f"expected bool, got {type(v).__name__}")
            return v
    elif ftype == "int":
        def check(v):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"expected int, got {type(v).__name__}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError(f"{v} is outside {lo}..{hi}")
            return v
    elif ftype == "float":
        def check(v):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"expected float, got {type(v).__name__}")
            v = float(v)
            if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError(f"{v} is outside {lo}..{hi}")
            return v
    elif ftype == "str":
        def check(v):
            if not isinstance(v, str):
                raise ValueError(f"expected str, got {type(v).__name__}")
            if hi is not None and len(v) > hi:
                raise ValueError(f"string of {len(v)} characters is over {hi}")
            if choices is not None and v not in choices:
                raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
            return v
    elif ftype == "bytes":
        def check(v):
            if not isinstance(v, (bytes, bytearray, memoryview)):
                raise ValueError(f"expected bytes, got {type(v).__name__}")
            if hi is not None and len(v) > hi:
                raise ValueError(f"{len(v)} bytes is over {hi}")
            if lo is not None and len(v) < lo:
                raise ValueError(f"{len(v)} bytes is under {lo}")
            return bytes(v)
    elif ftype == "any":
        def check(v):
            _check_plain(v, 0)
            return v
    elif ftype.startswith("list<") and ftype.endswith(">"):
        item = _check_for(ftype[5:-1], {"max": item_max})

        def check(v):
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"expected list, got {type(v).__name__}")
            if hi is not None and len(v) > hi:
                raise ValueError(f"list of {len(v)} items is over {hi}")
            return [item(x) for x in v]
    elif ftype.startswith("map<str,") and ftype.endswith(">"):
        key = _check_for("str", {"max": 256})
        value = _check_for(ftype[8:-1], {"max": item_max})

        def check(v):
            if not isinstance(v, dict):
                raise ValueError(f"expected map, got {type(v).__name__}")
            if hi is not None and len(v) > hi:
                raise ValueError(f"map of {len(v)} entries is over {hi}")
            return {key(k): value(x) for k, x in v.items()}
    else:
        raise ValueError(f"unknown field type {ftype!r} in protocol/messages.toml")
    return check


def _check_plain(v: Any, depth: int) -> None:
    """An `any` value must decode the way it was sent: plain types, str map keys, bounded depth."""
    if depth > 32:
        raise ValueError("value nests deeper than 32 levels")
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return
    if isinstance(v, (list, tuple)):
        for x in v:
            _check_plain(x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"map key {k!r} is a {type(k).__name__}; keys must be str")
            _check_plain(x, depth + 1)
    else:
        raise ValueError(f"{type(v).__name__} cannot be sent")


def _build(messages=table.MESSAGES) -> tuple[dict[int, MessageSpec], dict[str, MessageSpec]]:
    by_id, by_name = {}, {}
    for m in messages:
        fields = tuple(
            FieldSpec(
                name=f["name"],
                type=f["type"],
                since=f["since"],
                optional=f.get("optional", False),
                default=f.get("default"),
                check=_check_for(f["type"], f),
            )
            for f in m["fields"]
        )
        spec = MessageSpec(m["name"], m["id"], m["since"], frozenset(m["from"]), fields)
        by_id[spec.id] = spec
        by_name[spec.name] = spec
    return by_id, by_name


BY_ID, BY_NAME = _build()

# Bounds handed to msgpack so a hostile body cannot make it allocate past the frame.
_UNPACK_LIMITS = dict(
    max_str_len=MAX_FRAME,
    max_bin_len=MAX_FRAME,
    max_array_len=65536,
    max_map_len=65536,
    max_ext_len=0,
)


class Schema:
    """One message table with its own versions: the main one (messages.toml) or the peer
    link's (peer.toml). A Session speaks one schema."""

    def __init__(self, module) -> None:
        self.version = module.VERSION
        self.min_version = module.MIN_VERSION
        self.max_frame = module.MAX_FRAME
        self.by_id, self.by_name = (BY_ID, BY_NAME) if module is table else _build(module.MESSAGES)

    def spec(self, name: str) -> MessageSpec:
        try:
            return self.by_name[name]
        except KeyError:
            raise ProtocolError("unknown_type", f"no message named {name!r}") from None

    def encode(self, name: str, version: int, /, **fields: Any) -> bytes:
        return _encode(self.spec(name), version, fields)

    def decode(self, body: bytes, version: int) -> Message:
        return _decode(self.by_id, body, version)


def spec(name: str) -> MessageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ProtocolError("unknown_type", f"no message named {name!r}") from None


def encode(name: str, version: int = VERSION, /, **fields: Any) -> bytes:
    """Validate `fields` against message `name` and return the msgpack body."""
    return _encode(spec(name), version, fields)


def _encode(ms: MessageSpec, version: int, fields: dict) -> bytes:
    name = ms.name
    if ms.since > version:
        raise ProtocolError("version", f"{name} needs protocol v{ms.since}, link speaks v{version}")
    unknown = fields.keys() - {f.name for f in ms.fields}
    if unknown:
        raise ProtocolError("bad_message", f"{name} has no field {sorted(unknown)[0]!r}")
    out: list[Any] = [ms.id]
    for f in ms.fields:
        if f.since > version:
            break
        if f.name in fields:
            value = fields[f.name]
        elif f.optional:
            value = f.default
        else:
            raise ProtocolError("bad_message", f"{name}.{f.name} is required")
        try:
            out.append(f.check(value))
        except ValueError as exc:
            raise ProtocolError("bad_message", f"{name}.{f.name}: {exc}") from None
    return msgpack.packb(out, use_bin_type=True)


def encode_frame(name: str, version: int = VERSION, max_frame: int = MAX_FRAME, /, **fields) -> bytes:
    return pack_frame(encode(name, version, **fields), max_frame)


def decode(body: bytes, version: int = VERSION) -> Message:
    """Parse and validate one body. Every failure is a ProtocolError naming what was wrong."""
    return _decode(BY_ID, body, version)


def _decode(by_id: dict[int, MessageSpec], body: bytes, version: int) -> Message:
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("bad_message", f"body is not valid msgpack: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("bad_message", "body must be a non-empty msgpack array [id, fields...]")
    mid = raw[0]
    if not isinstance(mid, int) or isinstance(mid, bool):
        raise ProtocolError("bad_message", f"message id must be an int, got {type(mid).__name__}")
    ms = by_id.get(mid)
    if ms is None or ms.since > version:
        raise ProtocolError("unknown_type", f"unknown message id {mid} for protocol v{version}",
                            fatal=False)
    values = raw[1:]
    out: dict[str, Any] = {}
    for i, f in enumerate(ms.fields):
        if i < len(values) and f.since <= version:
            try:
                out[f.name] = f.check(values[i])
            except ValueError as exc:
                raise ProtocolError("bad_message", f"{ms.name}.{f.name}: {exc}") from None
        elif f.optional or f.since > version:  # a field newer than the link is not on it, whatever was sent
            out[f.name] = f.default
        else:
            raise ProtocolError("bad_message", f"{ms.name}.{f.name} is missing")
    return Message(ms.name, out)


MAIN = Schema(table)

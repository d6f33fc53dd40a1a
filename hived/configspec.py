"""Config tables declared as data: each key once, with its default and its check.

    BOX = {"boot_timeout_s": Key(120.0, number(0.1)), "name": Key(REQUIRED, string()), ...}
    values = read_table(raw, BOX, "box.toml: box", ConfigError)

`read_table` refuses unknown keys (naming the known ones), fills defaults, and runs each
key's check, which turns the raw TOML value into the parsed one or raises the caller's error
with the key's full name and what was expected. Rules that tie keys together stay in code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

REQUIRED = object()
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

Check = Callable[[str, Any, type[Exception]], Any]


@dataclasses.dataclass(frozen=True)
class Key:
    default: Any
    check: Check
    doc: str = ""


def read_table(raw: Any, keys: dict[str, Key], where: str, error: type[Exception]) -> dict[str, Any]:
    """{key: parsed value} for every key of `keys`; `where` names the table in messages."""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a table")
    for key in raw:
        if key not in keys:
            raise error(f"{where}.{key}: unknown key (known: {', '.join(sorted(keys))})")
    out = {}
    for key, spec in keys.items():
        if key in raw:
            out[key] = spec.check(f"{where}.{key}", raw[key], error)
        elif spec.default is REQUIRED:
            raise error(f"{where}.{key}: missing" + (f" ({spec.doc})" if spec.doc else ""))
        else:
            out[key] = spec.default
    return out


# -- checks: each returns check(where, value, error) -> parsed value ----------------------------
def integer(minimum: int = 0, maximum: int | None = None) -> Check:
    def check(where, value, error):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum or \
                (maximum is not None and value > maximum):
            span = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise error(f"{where}: expected an integer {span}, got {value!r}")
        return value
    return check


def number(minimum: float = 0.0) -> Check:
    def check(where, value, error):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise error(f"{where}: expected a number >= {minimum:g}, got {value!r}")
        return float(value)
    return check


def boolean() -> Check:
    def check(where, value, error):
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {value!r}")
        return value
    return check


def string(pattern: re.Pattern | None = None, expected: str = "") -> Check:
    def check(where, value, error):
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise error(f"{where}: expected {expected or 'a string'}, got {value!r}")
        return value
    return check


def choice(*options: str) -> Check:
    """One of `options`; "" among them means the key may be left out."""
    named = [f'"{o}"' for o in options if o]
    expected = (", ".join(named[:-1]) + " or " + named[-1]) if len(named) > 1 else named[0]
    if "" in options:
        expected = ", ".join(named) + " or absent"

    def check(where, value, error):
        if value not in options:
            raise error(f"{where}: expected {expected}, got {value!r}")
        return value
    return check


def strings() -> Check:
    def check(where, value, error):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise error(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    return check


def sha256s() -> Check:
    """A list of SHA-256 digests in lower-case hex (token hashes)."""
    as_strings = strings()

    def check(where, value, error):
        out = as_strings(where, value, error)
        for h in out:
            if not HEX64_RE.match(h):
                raise error(f"{where}: {h[:12]!r}... is not a SHA-256 in lower-case hex "
                            "(64 characters; `hived control token` prints one)")
        return out
    return check


def address() -> Check:
    """"HOST:PORT" -> (host, port)."""
    def check(where, value, error):
        if not isinstance(value, str) or ":" not in value:
            raise error(f"{where}: expected \"HOST:PORT\", got {value!r}")
        host, _, port = value.rpartition(":")
        if not port.isdigit() or int(port) > 65535:
            raise error(f"{where}: port {port!r} is not a number 0..65535")
        return host.strip("[]"), int(port)
    return check

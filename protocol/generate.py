"""Generate the protocol's derived files from protocol/messages.toml.

    python protocol/generate.py           # write hived/protocol/messages.py and protocol/MESSAGES.md
                                          # (and, from peer.toml, peer_messages.py and PEER.md)
    python protocol/generate.py --check   # exit 1 if either is out of date (run by the tests)

The golden vectors (protocol/vectors.json) are not generated here: they were built
once from plain msgpack, independently of hived's codec, and are frozen (append only).
Regenerating them from the code under test would make them agree with any bug.
"""

import argparse
import pprint
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA = HERE / "messages.toml"
PY_OUT = ROOT / "hived" / "protocol" / "messages.py"
MD_OUT = HERE / "MESSAGES.md"
# The peer link (box <-> box) is its own table with its own version: hived/box/peers.
PEER_SCHEMA = HERE / "peer.toml"
PEER_PY_OUT = ROOT / "hived" / "protocol" / "peer_messages.py"
PEER_MD_OUT = HERE / "PEER.md"

HEADER = "# Generated from protocol/messages.toml by protocol/generate.py. Do not edit.\n"
FIELD_KEYS = ("name", "type", "min", "max", "item_max", "choices", "optional", "default", "since")


def load(path: Path = SCHEMA) -> dict:
    with path.open("rb") as f:
        schema = tomllib.load(f)
    seen_ids, seen_names = set(), set()
    for msg in schema["message"]:
        if msg["id"] in seen_ids or msg["name"] in seen_names:
            raise SystemExit(f"{path}: duplicate message {msg['name']!r} / id {msg['id']}")
        seen_ids.add(msg["id"])
        seen_names.add(msg["name"])
        optional_seen = False
        for field in msg["fields"]:
            field.setdefault("since", msg["since"])
            if field.get("optional"):
                optional_seen = True
            elif optional_seen:
                raise SystemExit(f"{path}: {msg['name']}.{field['name']}: required after optional")
    return schema


def render_py(schema: dict, source: str = "messages.toml") -> str:
    messages = []
    for msg in schema["message"]:
        fields = tuple(
            {k: tuple(field[k]) if k == "choices" else field[k] for k in FIELD_KEYS if k in field}
            for field in msg["fields"]
        )
        messages.append(
            {
                "name": msg["name"],
                "id": msg["id"],
                "since": msg["since"],
                "from": tuple(msg["from"]),
                "fields": fields,
            }
        )
    body = pprint.pformat(tuple(messages), width=100, sort_dicts=False)
    return (
        HEADER.replace("messages.toml", source)
        + '"""The message table the codec is built from (see protocol/SPEC.md)."""\n\n'
        + f"VERSION = {schema['version']}\n"
        + f"MIN_VERSION = {schema['min_version']}\n"
        + f"MAX_FRAME = {schema['max_frame']}\n\n"
        + f"MESSAGES = {body}\n"
    )


def _bounds(field: dict) -> str:
    parts = []
    if "min" in field or "max" in field:
        if field["type"] in ("int", "float"):
            parts.append(f"{field.get('min', '')}..{field.get('max', '')}")
        elif "min" in field:
            parts.append(f"{field['min']}..{field['max']}")
        else:
            parts.append(f"max {field['max']}")
    if "item_max" in field:
        parts.append(f"items max {field['item_max']}")
    if "choices" in field:
        parts.append("one of " + ", ".join(f"`{c}`" for c in field["choices"]))
    if field.get("optional"):
        parts.append(f"optional, default `{field.get('default')!r}`")
    return "; ".join(parts)


def render_md(schema: dict, source: str = "messages.toml", title: str = "Messages") -> str:
    out = [
        f"<!-- Generated from protocol/{source} by protocol/generate.py. Do not edit. -->",
        f"# {title}",
        "",
        f"Protocol version {schema['version']} (peers may speak down to {schema['min_version']}); "
        f"frame body at most {schema['max_frame']} bytes. Framing and rules: SPEC.md.",
        "",
    ]
    for msg in schema["message"]:
        out += [
            f"## `{msg['name']}` (id {msg['id']}, since v{msg['since']})",
            "",
            msg.get("doc", "").strip(),
            "",
            "Sent by: " + ", ".join(msg["from"]),
            "",
        ]
        if msg["fields"]:
            out += ["| # | field | type | bounds | since | meaning |", "|---|---|---|---|---|---|"]
            for i, field in enumerate(msg["fields"], start=1):
                out.append(
                    f"| {i} | `{field['name']}` | `{field['type']}` | {_bounds(field)} "
                    f"| {field['since']} | {field.get('doc', '')} |"
                )
        else:
            out.append("No fields.")
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    args = parser.parse_args()
    schema = load()
    peer = load(PEER_SCHEMA)
    wanted = {PY_OUT: render_py(schema), MD_OUT: render_md(schema),
              PEER_PY_OUT: render_py(peer, "peer.toml"),
              PEER_MD_OUT: render_md(peer, "peer.toml", "Peer link messages (box <-> box)")}
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `python protocol/generate.py`")
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

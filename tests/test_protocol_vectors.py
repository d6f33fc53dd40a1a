"""Golden vectors (protocol/vectors.json) against both frame implementations and the codec."""

import json
import os
import subprocess
import sys

import pytest

from hived.protocol import codec
from hived.protocol.errors import ProtocolError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "protocol", "vectors.json")) as f:
    VECTORS = json.load(f)


def _expected_fields(fields):
    out = {}
    for k, v in fields.items():
        out[k] = bytes.fromhex(v["$bytes"]) if isinstance(v, dict) and "$bytes" in v else v
    return out


def _decoded_fields(message, fields):
    """What decoding a vector gives: its fields, plus the defaults of optional fields added to
    the message after the vector was written (they are absent from its bytes)."""
    out = _expected_fields(fields)
    for f in codec.spec(message).fields:
        if f.name not in out and f.optional:
            out[f.name] = f.default
    return out


def _vector_version(message, fields) -> int:
    """The protocol version a vector was written at: the newest thing it uses."""
    ms = codec.spec(message)
    return max([ms.since] + [f.since for f in ms.fields if f.name in fields])


def _decode_all(framing, data: bytes, chunk: int):
    decoder = framing.FrameDecoder(VECTORS["max_frame"])
    msgs = []
    for i in range(0, len(data), chunk):
        for body in decoder.feed(data[i : i + chunk]):
            msgs.append(codec.decode(body))
    return msgs, decoder


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_vector(framing, vector, chunk):
    data = bytes.fromhex(vector["frames_hex"])
    expect = vector["expect"]
    if "error" in expect:
        with pytest.raises(ProtocolError) as info:
            msgs, _ = _decode_all(framing, data, chunk)
        assert info.value.code == expect["error"], str(info.value)
        assert str(info.value)  # a readable reason, not an empty error
    else:
        msgs, decoder = _decode_all(framing, data, chunk)
        assert len(msgs) == 1 and decoder.buffered == 0
        assert msgs[0].name == expect["message"]
        assert msgs[0].fields == _decoded_fields(expect["message"], expect["fields"])


@pytest.mark.parametrize("vector", [v for v in VECTORS["vectors"] if "fields" in v["expect"]],
                         ids=lambda v: v["name"])
def test_encode_matches_vector(framing, vector):
    """Encoding the expected value gives the vector's bytes (trailing unknowns aside)."""
    expect = vector["expect"]
    version = _vector_version(expect["message"], expect["fields"])
    body = codec.encode(expect["message"], version, **_expected_fields(expect["fields"]))
    frame = framing.pack_frame(body, VECTORS["max_frame"])
    assert codec.decode(body).fields == _decoded_fields(expect["message"], expect["fields"])
    if vector.get("canonical", True):
        assert frame.hex() == vector["frames_hex"]


def test_generated_files_are_current():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "protocol", "generate.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_purepython_switch_selects_twins():
    code = ("from hived.protocol import framing; from hived import ratelimit;"
            "print(framing.IMPLEMENTATION, ratelimit.IMPLEMENTATION)")
    pure = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HIVED_PUREPYTHON": "1"}, check=True)
    assert pure.stdout.split() == ["python", "python"]
    native = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "HIVED_PUREPYTHON"},
                            check=True)
    assert native.stdout.split() == ["cython", "cython"]


def test_a_field_newer_than_the_link_is_not_taken_from_the_frame():
    """Found by benchmarks/fuzz_wire.py: a v1 link decoded `permanent` (v3) from a trailing value,
    which its encoder would then drop: the field is not on a v1 link, whatever the peer sent."""
    import msgpack

    body = msgpack.packb([54, "b1", 2, -1, 0, "spawn_failed", "x", {}, False, True])
    assert codec.decode(body, 1)["permanent"] is False
    assert codec.decode(body, 3)["permanent"] is True

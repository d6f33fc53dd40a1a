"""What every input on the wire must satisfy, whatever its bytes: the checks the fuzzer
(benchmarks/fuzz_wire.py, atheris) runs per input, and tests/test_fuzz_corpus.py replays.

An input is split by its first bytes into a frame limit, a protocol version and the chunks
the bytes arrive in (as reads from a socket would cut them). Only ProtocolError may escape;
a splitter never holds more than one frame (header + limit) nor returns a body over the
limit; the compiled and pure-Python splitters agree exactly; a body the codec accepts
encodes back to one that decodes to the same message.
"""

import json
from pathlib import Path

from hived.protocol import codec, framing_py
from hived.protocol.errors import ProtocolError

HEADER = 4
LIMITS = (4096, 65536, 1 << 20)


def _compiled():
    import hived._framing

    return hived._framing


def _shape(data: bytes) -> tuple[int, int, list[bytes]]:
    """(frame limit, protocol version, chunks) from one fuzz input."""
    if len(data) < 2:
        return LIMITS[0], codec.VERSION, [data]
    limit = LIMITS[data[0] % len(LIMITS)]
    version = 1 + data[1] % codec.VERSION
    rest, chunks, i = data[2:], [], 0
    cut = data[0] >> 2  # chunk size step, from the same byte: 0 means one chunk
    while i < len(rest):
        step = len(rest) if cut == 0 else 1 + (rest[i] * cut) % 4096
        chunks.append(rest[i:i + step])
        i += step
    return limit, version, chunks


def _split(decoder_cls, limit: int, chunks: list[bytes]) -> tuple[list[bytes], str | None]:
    dec = decoder_cls(limit)
    bodies: list[bytes] = []
    for chunk in chunks:
        try:
            got = dec.feed(chunk)
        except ProtocolError as exc:
            return bodies, exc.code
        for body in got:
            assert 0 < len(body) <= limit, f"body of {len(body)} bytes from a decoder limited to {limit}"
        bodies += got
        assert dec.buffered <= HEADER + limit, f"decoder holds {dec.buffered} bytes, limit {limit}"
    return bodies, None


def _decode_each(bodies: list[bytes], version: int) -> None:
    for body in bodies:
        try:
            msg = codec.decode(body, version)
        except ProtocolError:
            continue
        body = codec.encode(msg.name, version, **msg.fields)
        again = codec.decode(body, version)
        # compared as bytes: a NaN in an `any` field is itself, though not == itself
        assert again.name == msg.name and codec.encode(again.name, version, **again.fields) == body, (msg, again)


def check_framing(data: bytes, primary: str) -> None:
    limit, version, chunks = _shape(data)
    impls = {"cython": _compiled().FrameDecoder, "python": framing_py.FrameDecoder}
    first = _split(impls[primary], limit, chunks)
    other = _split(impls["python" if primary == "cython" else "cython"], limit, chunks)
    assert first == other, f"the two splitters disagree: {first[1]} vs {other[1]}"


def check_codec(data: bytes) -> None:
    if not data:
        return
    version = 1 + data[0] % codec.VERSION
    _decode_each([data[1:]] if len(data) > 1 else [], version)


TARGETS = {
    "framing-cython": lambda data: check_framing(data, "cython"),
    "framing-python": lambda data: check_framing(data, "python"),
    "codec": check_codec,
}


def check(data: bytes) -> None:
    """Every check on one input (what the corpus replay runs)."""
    check_framing(data, "cython")
    check_codec(data)


def seeds(vectors: Path | None = None) -> list[bytes]:
    """Fuzz seeds from the golden vectors: each frame as a framing input (limit 1 MiB, newest
    version, one chunk) and its body as a codec input (newest version)."""
    path = vectors or Path(__file__).resolve().parents[1] / "protocol" / "vectors.json"
    out = []
    for v in json.loads(path.read_text())["vectors"]:
        frame = bytes.fromhex(v["frames_hex"])
        out.append(bytes([2, codec.VERSION - 1]) + frame)  # 2: the 1 MiB limit, cut 0: one chunk
        if len(frame) > HEADER:
            out.append(bytes([codec.VERSION - 1]) + frame[HEADER:])
    return out

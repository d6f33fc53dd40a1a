"""Property tests over the codec and both frame implementations (hypothesis)."""

import importlib

from hypothesis import given, settings
from hypothesis import strategies as st

from hived.protocol import codec
from hived.protocol.errors import ProtocolError

IMPLS = [importlib.import_module("hived._framing"),
         importlib.import_module("hived.protocol.framing_py")]
MAX = 1 << 16

bodies = st.lists(st.binary(min_size=1, max_size=2000), min_size=0, max_size=20)
cuts = st.lists(st.integers(min_value=0, max_value=50000), max_size=30)


@given(bodies, cuts)
@settings(max_examples=300, deadline=None)
def test_any_split_gives_the_same_frames(frames, cut_points):
    """However the stream is cut, both decoders return exactly the bodies that were packed."""
    stream = b"".join(IMPLS[1].pack_frame(b, MAX) for b in frames)
    points = sorted({min(c, len(stream)) for c in cut_points} | {0, len(stream)})
    for impl in IMPLS:
        assert impl.pack_frame(b"x", MAX) == IMPLS[1].pack_frame(b"x", MAX)
        dec = impl.FrameDecoder(MAX)
        got = []
        for a, b in zip(points, points[1:], strict=False):
            got += dec.feed(stream[a:b])
        assert got == frames
        assert dec.buffered == 0


@given(st.binary(max_size=5000))
@settings(max_examples=500, deadline=None)
def test_garbage_never_crashes_and_both_agree(data):
    """Random bytes: a list of bodies or a ProtocolError, the same from both, never beyond limits."""
    results = []
    for impl in IMPLS:
        dec = impl.FrameDecoder(1024)
        try:
            out = dec.feed(data)
            decoded = []
            for body in out:
                try:
                    decoded.append(codec.decode(body).name)
                except ProtocolError as exc:
                    decoded.append(exc.code)
            results.append(("ok", out, decoded, dec.buffered))
            assert dec.buffered <= 1024 + 4
        except ProtocolError as exc:
            results.append(("error", exc.code))
    assert results[0] == results[1]


text = st.text(max_size=40)
run_fields = st.fixed_dictionaries({
    "build_id": st.text(max_size=64),
    "argv": st.lists(text, max_size=10),
    "env": st.dictionaries(st.text(max_size=30), text, max_size=5),
    "cwd": text,
    "timeout_s": st.floats(min_value=0, max_value=86400, allow_nan=False),
    "limits": st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1), max_size=4),
})
output_fields = st.fixed_dictionaries({
    "build_id": st.text(max_size=64),
    "stream": st.sampled_from([1, 2]),
    "seq": st.integers(0, 2**64 - 1),
    "data": st.binary(max_size=65536),
})


@given(run_fields)
@settings(max_examples=200, deadline=None)
def test_run_roundtrip(fields):
    # fields added since v2 (image, checkout) are optional: absent, they decode as their defaults
    defaults = {f.name: f.default for f in codec.spec("run").fields if f.name not in fields}
    assert codec.decode(codec.encode("run", **fields)).fields == {**fields, **defaults}


@given(output_fields)
@settings(max_examples=200, deadline=None)
def test_output_roundtrip_through_both_framings(fields):
    body = codec.encode("output", **fields)
    for impl in IMPLS:
        dec = impl.FrameDecoder(codec.MAX_FRAME)
        (got,) = dec.feed(impl.pack_frame(body, codec.MAX_FRAME))
        assert codec.decode(got).fields == fields


@given(st.integers(), st.integers())
def test_out_of_bound_stream_is_refused_by_encoder(stream, seq):
    ok = stream in (1, 2) and 0 <= seq < 2**64
    try:
        codec.encode("output", build_id="b", stream=stream, seq=seq, data=b"")
        assert ok
    except ProtocolError as exc:
        assert not ok and exc.code == "bad_message"


def test_length_over_limit_refused_before_body_arrives():
    for impl in IMPLS:
        dec = impl.FrameDecoder(100)
        try:
            dec.feed(b"\x00\x00\x00\x65")  # 101: only the header has arrived
        except ProtocolError as exc:
            assert exc.code == "too_large" and "101" in str(exc)
        else:
            raise AssertionError(f"{impl.__name__} accepted a 101-byte header with limit 100")
        assert dec.buffered <= 4


def test_pack_refuses_oversize():
    for impl in IMPLS:
        try:
            impl.pack_frame(b"x" * 101, 100)
        except ProtocolError as exc:
            assert exc.code == "too_large"
        else:
            raise AssertionError("oversize frame packed")

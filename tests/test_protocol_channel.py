"""Session rules (pure) and the asyncio channel on both event loops, over real sockets."""

import asyncio
import socket

import pytest

from hived.protocol import codec
from hived.protocol.channel import Channel, ChannelClosed
from hived.protocol.errors import ProtocolError
from hived.protocol.framing_py import FrameDecoder, pack_frame
from hived.protocol.session import LinkState, Session

from conftest import run_on


def hello_body(role="cell", lo=1, hi=1, peer="c-1", max_frame=65536):
    return codec.encode("hello", min_version=lo, max_version=hi, role=role, peer=peer,
                        max_frame=max_frame)


def box_session():
    return Session("box", "box-a", {"cell"}, max_frame=65536)


def test_first_message_must_be_hello():
    s = box_session()
    with pytest.raises(ProtocolError) as info:
        s.receive(codec.encode("ping", seq=1))
    assert info.value.code == "no_hello" and s.state is LinkState.CLOSED


def test_version_negotiation_picks_highest_common():
    s = Session("box", "b", {"cell"}, min_version=1, max_version=3)
    s.receive(hello_body(lo=2, hi=5))
    assert s.version == 3 and s.state is LinkState.OPEN


def test_no_common_version_is_fatal_and_names_both_ranges():
    s = Session("box", "b", {"cell"}, min_version=1, max_version=1)
    with pytest.raises(ProtocolError) as info:
        s.receive(hello_body(lo=2, hi=3))
    assert info.value.code == "version" and "1..1" in str(info.value) and "2..3" in str(info.value)


def test_role_not_accepted():
    s = box_session()
    with pytest.raises(ProtocolError) as info:
        s.receive(hello_body(role="client"))
    assert info.value.code == "not_allowed"


def test_cell_may_not_send_run_but_link_survives():
    s = box_session()
    s.receive(hello_body())
    run = codec.encode("run", build_id="b", argv=["x"], env={}, cwd="/", timeout_s=0, limits={})
    with pytest.raises(ProtocolError) as info:
        s.receive(run)
    assert info.value.code == "not_allowed" and not info.value.fatal
    assert s.state is LinkState.OPEN
    assert s.receive(codec.encode("ping", seq=2)).fields == {"seq": 2}


def test_second_hello_is_fatal():
    s = box_session()
    s.receive(hello_body())
    with pytest.raises(ProtocolError):
        s.receive(hello_body())
    assert s.state is LinkState.CLOSED


def test_illegal_transition_raises():
    s = box_session()
    s.close()
    with pytest.raises(RuntimeError):
        s._set_state(LinkState.OPEN)


# -- channel over a real socketpair, on asyncio and uvloop -------------------------------

async def _pair(hello_timeout=5.0):
    """A box-side Channel on one end; the raw other end for a hand-driven 'cell'."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, ch = await loop.create_unix_connection(
        lambda: Channel(box_session(), hello_timeout=hello_timeout, queue_max=8), sock=ours)
    theirs.setblocking(False)
    return ch, theirs


async def _read_frames(sock, n=1, timeout=5.0):
    loop = asyncio.get_running_loop()
    dec = FrameDecoder(1 << 20)
    out = []
    deadline = loop.time() + timeout
    while len(out) < n:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - loop.time())
        if not data:
            break
        out += [codec.decode(b) for b in dec.feed(data)]
    return out


def test_channel_exchange(event_loop_policy_name):
    async def main():
        ch, peer = await _pair()
        loop = asyncio.get_running_loop()
        (their_view_of_hello,) = await _read_frames(peer)
        assert their_view_of_hello.name == "hello" and their_view_of_hello["role"] == "box"
        await loop.sock_sendall(peer, pack_frame(hello_body(), 4096))
        await loop.sock_sendall(peer, pack_frame(codec.encode("ping", seq=9), 4096))
        assert (await ch.handshake())["peer"] == "c-1"
        assert (await ch.recv()).fields == {"seq": 9}
        await ch.send("pong", seq=9)
        (pong,) = await _read_frames(peer)
        assert pong.name == "pong" and pong["seq"] == 9
        peer.close()
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(ch.recv(), 5)
    run_on(event_loop_policy_name, main)


def test_channel_garbage_closes_only_that_link(event_loop_policy_name):
    async def main():
        bad, bad_peer = await _pair()
        good, good_peer = await _pair()
        loop = asyncio.get_running_loop()
        for p in (bad_peer, good_peer):
            await _read_frames(p)
            await loop.sock_sendall(p, pack_frame(hello_body(), 4096))
        await bad.handshake()
        await good.handshake()
        await loop.sock_sendall(bad_peer, b"\x00\x00\x00\x03\xc1\xc1\xc1")
        (err,) = await _read_frames(bad_peer)
        assert err.name == "error" and err["code"] == "bad_message" and err["fatal"]
        with pytest.raises(ChannelClosed) as info:
            await asyncio.wait_for(bad.recv(), 5)
        assert "not valid msgpack" in info.value.reason
        await loop.sock_sendall(good_peer, pack_frame(codec.encode("ping", seq=1), 4096))
        assert (await asyncio.wait_for(good.recv(), 5))["seq"] == 1
        good.close()
        bad_peer.close()
        good_peer.close()
    run_on(event_loop_policy_name, main)


def test_channel_oversize_frame_refused(event_loop_policy_name):
    async def main():
        ch, peer = await _pair()
        loop = asyncio.get_running_loop()
        await _read_frames(peer)
        await loop.sock_sendall(peer, pack_frame(hello_body(), 4096))
        await ch.handshake()
        await loop.sock_sendall(peer, (65537).to_bytes(4, "big"))  # over our 64 KiB limit
        (err,) = await _read_frames(peer)
        assert err["code"] == "too_large"
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(ch.recv(), 5)
        peer.close()
    run_on(event_loop_policy_name, main)


def test_channel_peer_without_hello_times_out(event_loop_policy_name):
    async def main():
        ch, peer = await _pair(hello_timeout=0.2)
        with pytest.raises(ChannelClosed) as info:
            await asyncio.wait_for(ch.handshake(), 5)
        assert "no hello within" in info.value.reason
        frames = await _read_frames(peer, n=2)
        assert [f.name for f in frames] == ["hello", "error"] and frames[1]["code"] == "no_hello"
        peer.close()
    run_on(event_loop_policy_name, main)


def test_channel_unknown_type_is_not_fatal(event_loop_policy_name):
    async def main():
        ch, peer = await _pair()
        loop = asyncio.get_running_loop()
        await _read_frames(peer)
        await loop.sock_sendall(peer, pack_frame(hello_body(), 4096))
        await ch.handshake()
        import msgpack
        await loop.sock_sendall(peer, pack_frame(msgpack.packb([99, 1]), 4096))
        await loop.sock_sendall(peer, pack_frame(codec.encode("ping", seq=3), 4096))
        (err,) = await _read_frames(peer)
        assert err["code"] == "unknown_type" and not err["fatal"]
        assert (await asyncio.wait_for(ch.recv(), 5))["seq"] == 3
        ch.close()
        peer.close()
    run_on(event_loop_policy_name, main)


def test_channel_backpressure_pauses_reading(event_loop_policy_name):
    async def main():
        ch, peer = await _pair()
        loop = asyncio.get_running_loop()
        await _read_frames(peer)
        await loop.sock_sendall(peer, pack_frame(hello_body(), 4096))
        await ch.handshake()
        n = 200_000  # ~1.6 MB: far more than one read, so reading must pause
        blob = b"".join(pack_frame(codec.encode("ping", seq=i), 4096) for i in range(n))
        sender = loop.create_task(loop.sock_sendall(peer, blob))
        await asyncio.sleep(0.5)
        # Reading paused with a bounded backlog: the rest waits in the kernel / the sender.
        assert ch._paused_reading and len(ch._queue) < n // 4
        assert not sender.done()
        seqs = [(await asyncio.wait_for(ch.recv(), 5))["seq"] for _ in range(n)]
        assert seqs == list(range(n))
        await sender
        ch.close()
        peer.close()
    run_on(event_loop_policy_name, main)


def test_any_field_refuses_what_would_not_decode():
    with pytest.raises(ProtocolError, match="map key 0 is a int"):
        codec.encode("status", report={"cells": {0: "x"}})
    with pytest.raises(ProtocolError, match="object cannot be sent"):
        codec.encode("status", report={"x": object()})
    assert codec.decode(codec.encode("status", report={"a": [1, {"b": None}]}))["report"] == {"a": [1, {"b": None}]}

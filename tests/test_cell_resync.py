"""The pure parts of cells outliving their daemon (issue 14): the cell channel's resync marker,
the cell daemon's output log (acknowledged offsets, bounded window), and the cell record.
Each also runs against real cells in tests/test_box_restart.py."""

import asyncio
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hived.box import cellrecord
from hived.box.cellrecord import BuildFacts, CellRecord, RecordError
from hived.cell.agent import OutputLog
from hived.protocol.resync import KEEP_MAX, MARKER, NONCE_BYTES, MarkerScanner, ResyncError, marker

NONCE = bytes(range(NONCE_BYTES))


def test_marker_after_a_cut_frame_is_found_and_what_follows_is_kept():
    s = MarkerScanner(NONCE)
    assert s.feed(b"\x00\x00\x01\x00half a frame of the last daemon") is None
    assert s.feed(marker(NONCE) + b"HELLO") == b"HELLO"
    assert s.found and s.skipped == len(b"\x00\x00\x01\x00half a frame of the last daemon")


def test_a_marker_with_another_nonce_is_not_taken_by_the_box():
    s = MarkerScanner(NONCE)
    other = marker(b"x" * NONCE_BYTES)
    assert s.feed(other + b"stale" + marker(NONCE) + b"next") == b"next"


def test_the_cell_takes_any_nonce_and_learns_it():
    s = MarkerScanner()
    assert s.feed(b"junk" + marker(NONCE)) == b""
    assert s.nonce == NONCE


@given(st.binary(max_size=300), st.binary(max_size=300), st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_marker_split_anywhere_is_found(before, after, cuts):
    stream = before.replace(MARKER[:4], b"") + marker(NONCE) + after
    s = MarkerScanner(NONCE)
    rest, i, found = b"", 0, None
    for n in cuts * 50:
        if i >= len(stream):
            break
        piece, i = stream[i:i + n], i + n
        if found is None:
            found = s.feed(piece)
            if found is not None:
                rest = found
        else:
            rest += piece
    rest += stream[i:] if found is not None else b""
    if found is None:
        rest = s.feed(stream[i:]) or b""
    assert rest == after


def test_a_peer_that_never_sends_the_marker_is_refused():
    s = MarkerScanner(NONCE)
    with pytest.raises(ResyncError, match="no resynchronisation marker"):
        for _ in range(KEEP_MAX // 4096 + 2):
            s.feed(os.urandom(4096))


def test_output_log_keeps_what_is_not_acknowledged_and_holds_the_build_back():
    async def main():
        log = OutputLog(window=10)
        assert await log.put(1, b"aaaa") == 0
        assert await log.put(2, b"bbbb") == 1
        blocked = asyncio.ensure_future(log.put(1, b"cccc"))  # 12 > 10: waits for an ack
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert [c[0] for c in log.since(0)] == [0, 1]
        log.ack(1)  # the box has chunk 0
        assert await asyncio.wait_for(blocked, 1) == 2
        assert log.first == 1 and [c[0] for c in log.since(0)] == [1, 2]
        assert [c[2] for c in log.since(2)] == [b"cccc"]
        log.ack(3)
        assert log.first == 3 and log.bytes == 0 and list(log.since(0)) == []
        log.ack(1)  # an old ack (a box that died before it saw the newer one) changes nothing
        assert log.first == 3
        big = await asyncio.wait_for(log.put(1, b"x" * 50), 1)  # larger than the window, alone: goes
        assert big == 3

    asyncio.run(main())


def _record(**kw) -> CellRecord:
    base = dict(cell_id="c0123abcd", pool="small", shape="small", origin="restore", vmm_pid=4242,
                vmm_start_ticks=123456, alloc={"cell_id": "c0123abcd", "slot": 0, "cores": [1], "memory_mib": 384,
                                               "shared": False, "disk_bytes_s": 0, "net_bits_s": 0})
    return CellRecord(**{**base, **kw})


def test_cell_record_round_trips_through_its_file(tmp_path):
    rec = _record(state="running", build=BuildFacts("b1", "control", lease=3, shape="small", cell_next=7,
                                                    control_next=9, received=100, stream_bytes=(60, 40)))
    cellrecord.write(tmp_path, rec)
    back = cellrecord.read(tmp_path)
    assert back == rec
    assert not list(tmp_path.glob("*.tmp"))  # written by rename: nothing half-written stays


@pytest.mark.parametrize("data, why", [
    ("{", "unreadable"),
    (json.dumps({"version": 99}), "not a version 1 cell record"),
    (json.dumps({**_record().to_json(), "vmm_pid": 0}), "no VMM pid"),
    (json.dumps({**_record().to_json(), "state": "running"}), "does not fit build"),
])
def test_a_bad_cell_record_is_named_with_what_is_wrong(tmp_path, data, why):
    (tmp_path / "cell.json").write_text(data)
    with pytest.raises(RecordError, match=why) as info:
        cellrecord.read(tmp_path)
    assert str(tmp_path / "cell.json") in str(info.value)
    with pytest.raises(RecordError, match="missing"):
        cellrecord.read(tmp_path / "nothing")


def test_the_agents_port_transport_can_be_aborted_again_after_it_is_gone():
    """A channel aborts a connection that sent a bad frame (a new daemon's marker where a frame
    should be); the agent then drops the port, which aborts the same transport again. On real
    pipe transports, after their connection_lost ran, that second abort must do nothing: it
    raised AttributeError, which killed the agent (PID 1), the cell and its build."""
    from hived.cell.agent import PipePairTransport

    async def main():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        lost = []

        class Proto(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.append(exc)

        rt, _ = await loop.connect_read_pipe(Proto, os.fdopen(r, "rb", 0))
        wt, _ = await loop.connect_write_pipe(Proto, os.fdopen(w, "wb", 0))
        pair = PipePairTransport(rt, wt)
        pair.write(b"half a frame")
        pair.abort()
        await asyncio.sleep(0.05)  # both transports' connection_lost run: their loop is gone
        assert len(lost) == 2 and pair.is_closing()
        pair.abort()
        pair.close()

    asyncio.run(main())

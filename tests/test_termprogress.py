"""hived/termprogress.py: live lines on a real terminal (a pty), plain lines into files and
pipes; and the OCI pull's progress built on it."""

import fcntl
import io
import os
import pty
import re
import struct
import termios
import time

import pytest

from hived.cli.image import _progress_printer
from hived.termprogress import Steps, Transfer, is_terminal


def test_steps_plain_lines():
    out = io.StringIO()
    steps = Steps(2, out)
    assert not steps.live
    with steps.step("one", "first thing") as note:
        note["note"] = "12 files"
    with pytest.raises(RuntimeError), steps.step("two", "second thing"):
        raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\[1/2\] first thing \.\.\. \d+\.\d s \(12 files\)", lines[0]), lines
    assert lines[1] == "[2/2] second thing ... failed"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert set(steps.times) == {"one"}


class _Pty:
    """A real terminal: what the process writes to `term`, read back from the master."""

    def __init__(self, columns: int = 100) -> None:
        self.columns = columns

    def __enter__(self):
        self.master, slave = pty.openpty()
        # 24 rows x 100 columns, as a terminal window has (a fresh pty is 0 x 0).
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, self.columns, 0, 0))
        self.term = os.fdopen(slave, "w", buffering=1)
        return self

    def read(self) -> str:
        self.term.flush()
        chunks = []
        os.set_blocking(self.master, False)
        while True:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def __exit__(self, *exc):
        self.term.close()
        os.close(self.master)


def test_steps_live_on_a_terminal():
    with _Pty() as t:
        assert is_terminal(t.term)
        steps = Steps(1, t.term)
        assert steps.live
        with steps.step("slow", "slow step"):
            time.sleep(1.3)
        text = t.read()
    # The running clock was redrawn in place, then the final line written.
    assert text.count("\r") >= 2, repr(text)
    assert "00:01" in text, repr(text)
    assert re.search(r"\[1/1\] slow step \.\.\. 1\.\d s\r?\n", text), repr(text)


def test_transfer_plain_and_live():
    out = io.StringIO()
    bar = Transfer(3 << 20, "layers", out)
    for _ in range(3):
        bar.update(1 << 20)
    bar.close()
    assert re.fullmatch(r"layers: 3\.0 MiB of 3\.0 MiB in \d+\.\d s\n", out.getvalue())
    with _Pty() as t:
        bar = Transfer(4 << 20, "layers", t.term)
        bar.update(2 << 20)
        bar.bar.refresh()
        mid = t.read()
        bar.update(2 << 20)
        bar.close()
        end = t.read()
    assert "50%" in mid and "2.00M/4.00M" in mid, repr(mid)   # a bar with the share and the sizes
    assert "layers: 4.0 MiB of 4.0 MiB" in end


def test_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    with _Pty() as t:
        assert not is_terminal(t.term)


def test_unsized_terminal_gets_plain_lines():
    """A pty of 0 columns (`script` run without a terminal): the step's line is written at
    its start, as into a file, not an empty live line."""
    with _Pty(columns=0) as t:
        steps = Steps(1, t.term)
        assert not steps.live
        with steps.step("k", "kernel"):
            assert t.read() == "[1/1] kernel ... "


def test_oci_pull_progress_plain():
    out = io.StringIO()
    progress = _progress_printer(out)
    progress("manifest", {"digest": "sha256:abc", "layers": 2, "bytes": 3 << 20})
    progress("blob", {"digest": "sha256:l1", "done": 1 << 20, "total": 2 << 20})
    progress("blob", {"digest": "sha256:l1", "done": 2 << 20, "total": 2 << 20})
    progress("blob-done", {"digest": "sha256:l2", "total": 1 << 20, "cached": True})
    progress("convert", {"digest": "sha256:abc"})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sha256:abc: 2 layers")
    assert re.fullmatch(r"layers: 3\.0 MiB of 3\.0 MiB in \d+\.\d s", lines[1]), lines
    assert lines[2] == "converting to a read-only filesystem image"
    assert "\r" not in out.getvalue()

"""Progress of long work: a live line on a terminal (tqdm), plain lines otherwise.

    steps = Steps(total=6)                  # numbered steps (image build, template making)
    with steps.step("kernel", "kernel linux-image-cloud-amd64") as note:
        ...                                  # note["note"] = "..." is appended to the line
    bar = Transfer(total_bytes, "downloading")   # bytes (OCI pulls)
    bar.update(n); bar.close()

On a terminal a step shows its running time while it runs and a transfer a bar with rate
and ETA; into a file or a pipe (CI logs, journald) each step is one line when it ends and
a transfer one line, with no carriage returns or escape codes. Either way the finished
line of a step reads "[i/n] label ... 12.3 s (note)".
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

TICK_S = 0.5   # a running step's clock refresh on a terminal


def is_terminal(stream: TextIO | None) -> bool:
    if stream is None or os.environ.get("TERM") == "dumb":
        return False
    try:
        # A terminal of 0 columns (a pty nobody sized: `script` without a terminal, some CI
        # runners) would get an empty live line from tqdm: plain lines there too.
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):   # closed or not a real file
        return False


class Steps:
    """Numbered steps of one piece of long work; `times` holds each step's seconds."""

    def __init__(self, total: int, out: TextIO | None = sys.stderr, *, live: bool | None = None) -> None:
        self.total, self.n, self.out = total, 0, out
        self.live = is_terminal(out) if live is None else live
        self.times: dict[str, float] = {}

    def _w(self, text: str) -> None:
        if self.out is not None:
            self.out.write(text)
            self.out.flush()

    @contextlib.contextmanager
    def step(self, key: str, label: str) -> Iterator[dict]:
        self.n += 1
        head = f"[{self.n}/{self.total}] {label} ... "
        note: dict = {}
        t0 = time.monotonic()
        ticker = _Ticker(head, self.out) if self.live and self.out is not None else None
        if ticker is None:
            self._w(head)   # the line ends when the step does
        try:
            yield note
        except BaseException:
            if ticker is not None:
                ticker.stop()
                self._w(head)
            self._w("failed\n")
            raise
        dt = time.monotonic() - t0
        if ticker is not None:
            ticker.stop()
            self._w(head)
        self.times[key] = round(dt, 2)
        extra = f" ({note['note']})" if note.get("note") else ""
        self._w(f"{dt:.1f} s{extra}\n")


class _Ticker:
    """A tqdm line "head 12.3s" redrawn every TICK_S by a thread, erased by stop()."""

    def __init__(self, head: str, out: TextIO) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=None, desc=head.rstrip(), bar_format="{desc} {elapsed}", file=out, leave=False,
                        dynamic_ncols=True)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(TICK_S):
            self.bar.refresh()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.bar.close()   # leave=False: the live line is erased; the caller writes the final one


class Transfer:
    """Bytes of a known total: a bar on a terminal; one line at close() otherwise."""

    def __init__(self, total: int, label: str, out: TextIO | None = sys.stderr, *, live: bool | None = None) -> None:
        self.total, self.label, self.out = total, label, out
        self.done = 0
        self.t0 = time.monotonic()
        self.bar = None
        if out is not None and (is_terminal(out) if live is None else live):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=out,
                            leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.out is not None:
            dt = time.monotonic() - self.t0
            self.out.write(f"{self.label}: {_mib(self.done)} of {_mib(self.total)} in {dt:.1f} s\n")
            self.out.flush()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"

"""The guest kernel's command line, with the host's TSC frequency where it is known."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
from pathlib import Path

# --------------------------------------------------------------------------
# kernel command line for the guest


_TSC_RE = (
    re.compile(rb"tsc: Refined TSC clocksource calibration: (\d+)\.(\d+) MHz"),
    re.compile(rb"tsc: Detected (\d+)\.(\d+) MHz processor"),
)


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz as its kernel found it, or None if unknown.

    Read from sysfs where the kernel exports it, else from the kernel log (/dev/kmsg,
    non-destructive; needs root or dmesg_restrict=0).
    """
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found: list[int | None] = [None, None]
    try:
        for _ in range(100000):
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # record overwritten while reading: skip it
                    continue
                break
            if b"tsc:" not in rec:
                continue
            for i, pattern in enumerate(_TSC_RE):
                m = pattern.search(rec)
                if m:
                    found[i] = int(m.group(1)) * 1000 + int(m.group(2).ljust(3, b"0")[:3])
    finally:
        os.close(fd)
    return found[0] or found[1]


def guest_kernel_args(accel: str = "tcg") -> str:
    """Kernel arguments a cell should get on this host, besides console/reboot/panic/quiet.

    cryptomgr.notests: skip the crypto self-tests (~0.2 s of a TCG boot; nothing in a
    cell depends on them).
    Under TCG, also tsc_early_khz=<host TSC rate> (+ tsc=reliable when the host TSC is
    invariant): the guest's TSC runs at the host's rate, but the guest kernel has to
    calibrate it against the PIT, which fails now and then on a busy host, and with
    no HPET/PM timer on microvm the kernel then marks the TSC unstable and hangs in
    early boot (2 of 30 boots on a quiet host here, 3 of 8 with both cores busy;
    0 of 52 with tsc_early_khz). tsc=reliable keeps the clocksource watchdog, whose
    jiffies run late on a busy TCG host, from demoting the TSC to jiffies.
    """
    args = ["cryptomgr.notests"]
    if accel != "tcg" or os.uname().machine != "x86_64":
        return " ".join(args)
    khz = host_tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
        with contextlib.suppress(OSError):
            flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
            if flags and {"constant_tsc", "nonstop_tsc"} <= set(flags.group(1).split()):
                args.append("tsc=reliable")
    return " ".join(args)

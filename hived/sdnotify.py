"""systemd notify protocol in a few lines: READY once serving, WATCHDOG, STOPPING."""

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(addr)
        try:
            # Never block the daemon's loop on a reader that is behind (a full datagram queue
            # blocks a Unix sender): a dropped ping is harmless, a stuck box is not.
            sock.send(state.encode(), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def pending_job(list_jobs: str, unit: str) -> str:
    """The type of the job systemd runs for `unit` (`systemctl list-jobs --no-legend --plain`:
    "JOB UNIT TYPE STATE" per line), or "" if none: "stop" versus "restart" is how a box's
    ExecStop= tells a stop, which ends builds, from a restart, which keeps them."""
    for line in list_jobs.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] == unit:
            return words[2]
    return ""

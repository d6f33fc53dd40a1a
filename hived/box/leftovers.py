"""Find and remove what a previous run of this box left behind (after a crash or kill -9).

Everything a cell owns is named after it: its directory under state_dir/cells, its VMM
(whose command line names that directory), its cgroup under the box's parent. That is
what makes this possible without any record written at crash time. A template VM is an
ordinary cell directory while it is being made; a finished template has no file at all
(its memory and state are memfds of the box process: they go with it, and with the last
clone still mapping them, which this removes like any other VMM).
"""

import logging
import os
import shutil
import signal
import time
from pathlib import Path

from hived.box.cgroups import Cgroups

log = logging.getLogger(__name__)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# What a cell's VMM process is called at each step of its start: a confined VMM is
# briefly unshare, then the jail script (sh), chroot and setpriv, before it becomes QEMU.
VMM_STAGES = ("qemu-system-x86_64", "unshare", "sh", "chroot", "setpriv", "firecracker")


def vmm_pids(cells_dir: Path) -> dict[int, str]:
    """Processes whose command line refers to a cell directory of this box: pid -> cell id."""
    prefix = str(cells_dir) + "/"
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        cmd = _cmdline(int(entry))
        i = cmd.find(prefix)
        if i >= 0 and os.path.basename(cmd.split(" ", 1)[0]) in VMM_STAGES:
            found[int(entry)] = cmd[i + len(prefix):].split("/", 1)[0]
    return found


def clean(cells_dir: Path, cgroups: Cgroups | None, keep: set[str] = frozenset()) -> list[str]:
    """Kill leftover VMMs, remove cgroups and cell directories, but those of the cells in
    `keep` (being adopted: hived/box/adopt.py); returns the cell ids cleaned."""
    cleaned: set[str] = set()
    pids = {pid: cell for pid, cell in vmm_pids(cells_dir).items() if cell not in keep}
    for pid, cell_id in pids.items():
        try:
            os.kill(pid, signal.SIGKILL)
            cleaned.add(cell_id)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") and _cmdline(pid) for pid in pids):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if cgroups is not None:
        for name in cgroups.cells():
            if name in keep:
                continue
            cgroups.remove(name)
            cleaned.add(name)
    if cells_dir.is_dir():
        for d in cells_dir.iterdir():
            if d.name in keep:
                continue
            shutil.rmtree(d, ignore_errors=True)
            cleaned.add(d.name)
    if cleaned:
        log.warning("removed leftovers of %d cell(s) from a previous run: %s",
                    len(cleaned), ", ".join(sorted(cleaned)))
    return sorted(cleaned)

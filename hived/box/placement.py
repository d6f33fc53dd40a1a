"""Where a box puts its cells' cgroups, so that they outlive the daemon (a restart, a crash).

`plan()` decides (pure: the cgroup root and the daemon's /proc/self/cgroup are passed in),
`place()` carries it out and opens the box's Cgroups:

* cgroup v2, and systemd started the daemon in a leaf below a cgroup it delegated
  (hived-box.service: `Delegate=yes` + `DelegateSubgroup=daemon`, systemd >= 254): the
  cells go to `<unit cgroup>/cells/<cell id>`, beside the daemon's `<unit cgroup>/daemon`.
  The box writes attributes only from the unit's cgroup down, never systemd's above it.
  With `KillMode=process` a restart or a crash of the unit leaves them running, and the
  unit's next main process starts in `daemon/` again, a leaf, so the kernel takes it.
  (containerd.service's model; libvirt goes further with a scope per VM through D-Bus.)
* cgroup v2, the unit delegated, but the daemon started in the unit's own cgroup (no
  DelegateSubgroup=: systemd < 254, such as Debian 12's 252): systemd starts every later
  main process of the unit there too, and the kernel refuses a process in a cgroup that
  hands controllers to its children ("no internal processes"). Cells below the unit
  would make it unable to start again while they live (status 219/CGROUP, systemd issue
  #24064). So the cells go to the box's own `hived/<box name>` below the root, outside the
  unit, as before: a restart or crash of the unit leaves them alone as well, at the price
  of a cgroup systemd does not know about.
* cgroup v1, or not under systemd (`hived up` from a shell, tests): `hived/<box name>`
  below each v1 controller's root, or below the v2 root.
* `[box] cgroup_parent = "/a/path"`: there. When that is below the daemon's own cgroup,
  the daemon first moves itself into the leaf `<own cgroup>/daemon` (no internal
  processes again); mind the restart caveat above when that own cgroup is a unit's.

On v1 the unit's processes are tracked in name=systemd, which has no controllers and so
no such rule: the VMMs stay in the unit's cgroup there, and `KillMode=process` alone keeps
them through a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from hived.box.cgroups import CgroupError, Cgroups, detect, open_cgroups

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# systemd marks a cgroup it delegates with one of these (trusted.* since v251, user.* since v253)
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")
DAEMON_LEAF = "daemon"  # the unit's DelegateSubgroup=, and where the daemon moves itself
CELLS = "cells"


@dataclasses.dataclass(frozen=True)
class Placement:
    parent: str          # the cells' parent cgroup, relative to the root (Cgroups.parent)
    anchor: str = ""     # the highest cgroup whose attributes the box writes ("": the root)
    move_self_to: str = ""  # a leaf cgroup the daemon moves into first ("": stays)
    why: str = ""


def own_cgroup(proc_self_cgroup: str) -> str | None:
    """The process's cgroup v2 path (relative, "" for the root) from /proc/PID/cgroup text."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip().strip("/")
    return None


def delegated(path: Path) -> bool:
    """Whether systemd delegated the cgroup at `path` (its xattr mark)."""
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:  # no such attribute (ENODATA), or a filesystem without xattrs
            pass
    return False


def _below(path: str, top: str) -> bool:
    return top == "" or path == top or path.startswith(top + "/")


def plan(setting: str, box_name: str, root: Path, proc_self_cgroup: str, version: int) -> Placement:
    """Where this box's cells go; see the module's text. `setting` is [box] cgroup_parent."""
    root = Path(root)
    legacy = f"hived/{box_name}"
    own = own_cgroup(proc_self_cgroup) if version == 2 else None
    if setting != "auto":
        parent = setting.strip("/")
        move = f"{own}/{DAEMON_LEAF}".lstrip("/") if own is not None and _below(parent, own) else ""
        if move and _below(move, parent):
            raise CgroupError(f"[box] cgroup_parent {setting}: the daemon's own leaf /{move} would be "
                              "among its cells: pick a parent beside the daemon's cgroup, not above it")
        return Placement(parent, anchor=own if move else "", move_self_to=move,
                         why=f"[box] cgroup_parent = {setting!r}")
    if version != 2:
        return Placement(legacy, why=f"cgroup v{version}: cells below each controller's root")
    if own and "/" in own and delegated(root / own.rsplit("/", 1)[0]) and not delegated(root / own):
        unit = own.rsplit("/", 1)[0]
        return Placement(f"{unit}/{CELLS}", anchor=unit,
                         why=f"systemd delegated /{unit} and started the daemon in its leaf /{own}")
    if own and delegated(root / own):
        return Placement(legacy, why=f"systemd delegated /{own} but started the daemon in it, not in a leaf "
                                     "(no DelegateSubgroup=, systemd < 254): cells below it would stop the "
                                     "unit from starting again while they live, so they go outside it")
    return Placement(legacy, why="not in a cgroup systemd delegated")


def move_into(root: Path, leaf: str, pid: int = 0) -> None:
    """Move process `pid` (0: this one, all its threads) into the cgroup v2 `leaf`, made if need be."""
    d = Path(root) / leaf
    try:
        d.mkdir(exist_ok=True)
        (d / "cgroup.procs").write_text(str(pid or os.getpid()))
    except OSError as exc:
        raise CgroupError(f"cannot move the box daemon into cgroup {d}: {exc.strerror}") from None


def place(setting: str, box_name: str, root: Path = CGROUP_ROOT,
          proc_self_cgroup: str | None = None, cpu_weight: int = 0) -> Cgroups:
    """Decide where the cells go, move the daemon if need be, and open the box's Cgroups
    (`cpu_weight`: [box] cells_cpu_weight, see Cgroups)."""
    version = detect(root)
    if proc_self_cgroup is None:
        proc_self_cgroup = Path("/proc/self/cgroup").read_text()
    where = plan(setting, box_name, root, proc_self_cgroup, version)
    if where.move_self_to:
        move_into(root, where.move_self_to)
    log.info("box %s: cells' cgroups under /%s (%s)", box_name, where.parent, where.why)
    return open_cgroups(where.parent, root, where.anchor, cpu_weight)

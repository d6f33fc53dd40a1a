"""A restored clone becomes its own (guest side; stdlib only): RNG, clock, name, network, disks.

Every clone of a template starts with the template's memory: its kernel RNG state, its
clock, no hostname of its own, no network, and a frozen scratch filesystem whose disk is the
clone's own copy of the template's (empty, just made). `become()` applies one
`cell.restore` message before the clone says `cell.hello`, so no build ever sees the
template's state. Each step is a syscall or ioctl (no process spawned: under TCG a
spawn costs tens of milliseconds).
"""

import ctypes
import fcntl
import os
import random
import socket
import struct
import time
from pathlib import Path

from hived.cell import container

# <linux/random.h>
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07)
# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2
ARPHRD_ETHER = 1
IFNAMSIZ = 16

MS_NODEV, MS_NOSUID, MS_NOATIME = 0x4, 0x2, 0x400
# <linux/fs.h>
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878    # _IOWR('X', 120, int)


class IdentityError(Exception):
    """One step of becoming a cell failed; the message names it."""


def reseed(entropy: bytes) -> None:
    """Credit the host's bytes to the kernel RNG and reseed its CRNG at once.

    Without RNDRESEEDCRNG the clone would go on drawing from the template's CRNG state
    until the kernel's next scheduled reseed: two clones would give the same bytes.
    Python's own `random` was seeded in the template too: reseed it from the new state.
    """
    if len(entropy) < 32:
        raise IdentityError(f"cell.restore carried {len(entropy)} bytes of entropy, need at least 32")
    buf = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, buf)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise IdentityError(f"reseeding the RNG: {exc}") from None
    finally:
        os.close(fd)
    random.seed()


def set_clock(time_ns: int) -> None:
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
    except OSError as exc:
        raise IdentityError(f"setting the clock: {exc}") from None


def parse_net(words: str) -> dict[str, str]:
    """`hived.ip=A/P hived.gw=G [hived.mtu=N]` (the kernel command line form) -> ip, gw, mtu."""
    out = {}
    for word in words.split():
        key, sep, value = word.partition("=")
        if not sep or not key.startswith("hived."):
            raise IdentityError(f"bad network word {word!r}")
        out[key[len("hived."):]] = value
    if out and ("ip" not in out or "gw" not in out or "/" not in out["ip"]):
        raise IdentityError(f"network config {words!r} needs hived.ip=ADDR/PREFIX and hived.gw=GW")
    return out


def _sockaddr_in(addr: str) -> bytes:
    return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))


def _ifreq(name: str, payload: bytes) -> bytes:
    return struct.pack(f"{IFNAMSIZ}s", name.encode()) + payload.ljust(24, b"\0")


def _rtentry(gateway: str, dev: bytes) -> bytes:
    """struct rtentry (<linux/route.h>, x86_64) for a default route via `gateway` on `dev`.

    `dev` must stay alive until the ioctl returns: the struct holds a pointer into it
    (bytes objects do not move, and the caller keeps a reference for the call).
    """
    any_addr = _sockaddr_in("0.0.0.0")
    dev_ptr = ctypes.cast(ctypes.c_char_p(dev), ctypes.c_void_p).value
    # rt_pad1, rt_dst, rt_gateway, rt_genmask, rt_flags, rt_pad2, rt_pad3, rt_pad4, rt_metric, rt_dev,
    # rt_mtu, rt_window, rt_irtt: 120 bytes with the C alignment ("@" and the explicit pads).
    return struct.pack("@L16s16s16sHhLPhPLLH6x", 0, any_addr, _sockaddr_in(gateway), any_addr,
                       RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, dev_ptr, 0, 0, 0)


def _link_up(s: socket.socket, dev: str) -> None:
    """IFF_UP on `dev` unless it is up already (bringing a link up is the costly part)."""
    flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(dev, b"")), IFNAMSIZ)[0]
    if not flags & IFF_UP:
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(dev, struct.pack("H", flags | IFF_UP)))


def links_up(dev: str = "eth0", sysctl: Path = Path("/proc/sys/net/ipv6/conf")) -> None:
    """In a template, before its snapshot point: loopback and the NIC up, without any address.

    Nothing here is per cell, and under TCG bringing the two links up costs a clone ~30 ms
    (the kernel's netdev notifiers, virtio-net filling its receive ring). The NIC gets no
    IPv6 link-local address (one derived from the template's MAC would be every clone's):
    the host side of a cell forwards no IPv6 anyway (hived/box/network.py). No NIC: only lo.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    step = "lo up"
    try:
        _link_up(s, "lo")
        if os.path.exists(f"/sys/class/net/{dev}"):
            step = f"{dev}: no IPv6"
            if (sysctl / dev).is_dir():
                (sysctl / dev / "disable_ipv6").write_text("1")
            step = f"{dev} up"
            _link_up(s, dev)
    except OSError as exc:
        raise IdentityError(f"template network: {step}: {exc}") from None
    finally:
        s.close()


def configure_net(words: str, mac: str, dev: str = "eth0") -> None:
    """What init.sh does with hived.ip= on a booted cell, by ioctl: MAC, MTU, address, up, route.
    On a clone whose template brought the links up (links_up) the MAC changes live."""
    net = parse_net(words)
    if not net:
        return
    addr, prefix = net["ip"].split("/")
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - int(prefix))) & 0xFFFFFFFF))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        step = "lo up"
        _link_up(s, "lo")
        if mac:
            step = f"{dev} address {mac}"
            hwaddr = struct.pack("H6s", ARPHRD_ETHER, bytes.fromhex(mac.replace(":", "")))
            fcntl.ioctl(s, SIOCSIFHWADDR, _ifreq(dev, hwaddr))
        if net.get("mtu"):
            step = f"{dev} mtu {net['mtu']}"
            fcntl.ioctl(s, SIOCSIFMTU, _ifreq(dev, struct.pack("i", int(net["mtu"]))))
        step = f"{dev} address {net['ip']}"
        fcntl.ioctl(s, SIOCSIFADDR, _ifreq(dev, _sockaddr_in(addr)))
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(dev, _sockaddr_in(mask)))
        step = f"{dev} up"
        _link_up(s, dev)
        step = f"default route via {net['gw']}"
        dev_name = dev.encode()
        fcntl.ioctl(s, SIOCADDRT, _rtentry(net["gw"], dev_name))
    except (OSError, ValueError) as exc:
        raise IdentityError(f"network: {step}: {exc}") from None
    finally:
        s.close()


def mount_scratch(target: Path = container.WORK) -> None:
    """The clone's own scratch disk on /work, as init.sh mounts it on a booted cell (a template
    whose init did not mount one: see thaw_scratch).

    The template's kernel probed a scratch disk of the same size at the same place and may
    hold some of its blocks in the page cache: drop them before mounting this one.
    """
    try:
        dev = container.find_disk("hived-scratch")
        container.drop_cached(dev)
        container.mount(dev, target, "ext4", MS_NODEV | MS_NOSUID | MS_NOATIME)
    except (container.ContainerError, OSError) as exc:
        raise IdentityError(f"scratch disk: {exc}") from None


def _fs_ioctl(target: Path, request: int, what: str) -> None:
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, request, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise IdentityError(f"scratch disk: {what} {target}: {exc.strerror}") from None


def freeze_scratch(target: Path = container.WORK) -> None:
    """In a template, at its snapshot point: flush and freeze the (empty) scratch filesystem.

    The box then copies the template's scratch disk file for every clone. Frozen, the file
    holds exactly what the template's kernel believes is on disk (superblock, bitmaps, no
    dirty page left in the guest), and nothing writes to it before the clone thaws it.
    Nothing to do if init mounted no scratch disk here.
    """
    if os.path.ismount(target):
        _fs_ioctl(target, FIFREEZE, "freezing")


def thaw_scratch(target: Path = container.WORK) -> None:
    """In a clone: its scratch disk is its own copy of the template's frozen one (hived/vmm/qemu.py,
    `scratch_image_fd`), so one FITHAW makes it usable: no probe, no mount under TCG. From a
    template that had none mounted, mount the clone's own."""
    if os.path.ismount(target):
        _fs_ioctl(target, FITHAW, "thawing")
    else:
        mount_scratch(target)


def become(msg) -> dict[str, float]:
    """Apply one cell.restore message; returns each step's duration in seconds."""
    times = {}
    t = time.monotonic()
    for name, step in (("reseed", lambda: reseed(msg["entropy"])),
                       ("clock", lambda: set_clock(msg["time_ns"])),
                       ("hostname", lambda: socket.sethostname(msg["cell_id"])),
                       ("net", lambda: configure_net(msg["net"], msg["mac"])),
                       ("disks", thaw_scratch)):
        step()
        now = time.monotonic()
        times[f"restore_{name}"] = now - t
        t = now
    return times

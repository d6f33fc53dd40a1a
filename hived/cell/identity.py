"""A restored clone becomes its own (guest side; stdlib only): RNG, clock, name, network, disks.

Every clone of a template starts with the template's memory: its kernel RNG state, its
clock, no hostname of its own, no network and no scratch disk. `become()` applies one
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


_Sockaddr = ctypes.c_ubyte * 16  # not c_char: ctypes copies a c_char array only up to a NUL


class _RtEntry(ctypes.Structure):  # struct rtentry, <linux/route.h>
    _fields_ = [("rt_pad1", ctypes.c_ulong), ("rt_dst", _Sockaddr),
                ("rt_gateway", _Sockaddr), ("rt_genmask", _Sockaddr),
                ("rt_flags", ctypes.c_ushort), ("rt_pad2", ctypes.c_short), ("rt_pad3", ctypes.c_ulong),
                ("rt_pad4", ctypes.c_void_p), ("rt_metric", ctypes.c_short), ("rt_dev", ctypes.c_char_p),
                ("rt_mtu", ctypes.c_ulong), ("rt_window", ctypes.c_ulong), ("rt_irtt", ctypes.c_ushort)]


def configure_net(words: str, mac: str, dev: str = "eth0") -> None:
    """What init.sh does with hived.ip= on a booted cell, by ioctl: MAC, MTU, address, up, route."""
    net = parse_net(words)
    if not net:
        return
    addr, prefix = net["ip"].split("/")
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - int(prefix))) & 0xFFFFFFFF))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        step = "lo up"
        flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq("lo", b"")), IFNAMSIZ)[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq("lo", struct.pack("H", flags | IFF_UP)))
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
        flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(dev, b"")), IFNAMSIZ)[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(dev, struct.pack("H", flags | IFF_UP)))
        step = f"default route via {net['gw']}"
        any_addr = _Sockaddr.from_buffer_copy(_sockaddr_in("0.0.0.0"))
        rt = _RtEntry(rt_dst=any_addr, rt_gateway=_Sockaddr.from_buffer_copy(_sockaddr_in(net["gw"])),
                      rt_genmask=any_addr, rt_flags=RTF_UP | RTF_GATEWAY, rt_dev=dev.encode())
        fcntl.ioctl(s, SIOCADDRT, bytes(rt))
    except (OSError, ValueError) as exc:
        raise IdentityError(f"network: {step}: {exc}") from None
    finally:
        s.close()


def mount_scratch(target: Path = container.WORK) -> None:
    """The clone's own scratch disk on /work, as init.sh mounts it on a booted cell.

    The template's kernel probed a scratch disk of the same size at the same place and may
    hold some of its blocks in the page cache: drop them before mounting this one.
    """
    try:
        dev = container.find_disk("hived-scratch")
        container.drop_cached(dev)
        container.mount(dev, target, "ext4", MS_NODEV | MS_NOSUID | MS_NOATIME)
    except (container.ContainerError, OSError) as exc:
        raise IdentityError(f"scratch disk: {exc}") from None


def become(msg) -> dict[str, float]:
    """Apply one cell.restore message; returns each step's duration in seconds."""
    times = {}
    t = time.monotonic()
    for name, step in (("reseed", lambda: reseed(msg["entropy"])),
                       ("clock", lambda: set_clock(msg["time_ns"])),
                       ("hostname", lambda: socket.sethostname(msg["cell_id"])),
                       ("net", lambda: configure_net(msg["net"], msg["mac"])),
                       ("disks", mount_scratch)):
        step()
        now = time.monotonic()
        times[f"restore_{name}"] = now - t
        t = now
    return times

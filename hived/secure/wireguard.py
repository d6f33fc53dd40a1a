r"""One WireGuard interface, made by wireguard-go (userspace) or by the kernel.

    birth netns (the box's; default: the caller's)       target netns (the cell's)
      wireguard-go process, its UDP socket  ──moved──▶     tun interface <name>
      /var/run/wireguard/<name>.sock (UAPI)                (address, routes: caller's job)

The interface is created in a *birth* namespace, where its UDP socket is bound and so
reaches the peer's endpoint, then (optionally) moved into a *target* namespace: every
packet routed into the interface there is encrypted and leaves from the birth namespace.
Kernel WireGuard documents this layout; for wireguard-go it was verified here (see
tests/test_secure_wireguard.py): the process and its sockets stay where they were born,
the tun fd keeps working after `ip link set netns`, and the handshake follows in ~7 ms.
Why it comes up at once: wireguard-go learns "interface up" from rtnetlink in its own
namespace (blind to the target) and from a zero-length write() on the tun every second;
on this kernel (6.x) that write answers EINVAL even while the tun is down, which
wireguard-go reads as "up", so the device is up (UDP bound) from its start. On a kernel
answering EIO for a down tun, wireguard-go would notice the interface going up in the
target namespace only by that 1 s poll: `wait_handshake` then takes up to 1 s longer.

Keys and peers go in over the UAPI socket (text protocol: set=1 / get=1, errno=0 means
success) or generic netlink (kernel): memory to memory, never argv, environment or a
file. `get` answers include the private key: they are parsed here and that line is
dropped at once, never kept, logged or put into an error.

Names: wireguard-go's UAPI socket path makes interface names global on a machine, so
`tunnel_name(box_tag, cell_id)` is injective over (box, cell): "w" + box tag + the
cell's 32 bits in 6 base-62 characters (at most 15 = IFNAMSIZ). `box_prefix(tag)` +
exactly 6 characters is how crash cleanup (`clean_leftovers`) recognises one box's.

Blocking work (fork/exec, netlink, setns) runs in a small thread pool of this module;
a thread enters a namespace only for the length of one call (hived.net.netns.entered).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence

from hived.secure.keys import KeyPair, b64, public_from_text

log = logging.getLogger(__name__)

UAPI_DIR = "/var/run/wireguard"
WIREGUARD_GO = "wireguard-go"
DEFAULT_MTU = 1420
START_TIMEOUT_S = 5.0          # wireguard-go's UAPI socket must appear by then
POLL_S = 0.003                 # wait_handshake / socket polling step
UAPI_TIMEOUT_S = 5.0
IFNAMSIZ = 15
_B62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CELL_CHARS = 6                # 62**6 > 2**32
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,7}$")
_CELL_RE = re.compile(r"^c[0-9a-f]{8}$")


class WireGuardError(Exception):
    """A WireGuard interface could not be made or used; the message says what and what to do."""


class MissingCapability(WireGuardError):
    """This host cannot run the asked driver (no wireguard-go, no kernel module, no tun)."""


class HandshakeTimeout(WireGuardError):
    """No handshake with the peer in time."""


# --------------------------------------------------------------------------------------
# names


def box_prefix(box_tag: str) -> str:
    """The prefix of every tunnel name of one box (a name is this + exactly 6 characters)."""
    if not isinstance(box_tag, str) or not _TAG_RE.match(box_tag):
        raise WireGuardError(f"box tag {box_tag!r} is not 1-8 characters of [a-z0-9-] "
                             "(see hived.box.network.box_tag)")
    return "w" + box_tag


def tunnel_name(box_tag: str, cell_id: str) -> str:
    """The interface name of a cell's tunnel: unique per (box, cell) on the machine."""
    if not isinstance(cell_id, str) or not _CELL_RE.match(cell_id):
        raise WireGuardError(f"cell id {cell_id!r} is not of the form c<8 hex digits>")
    n = int(cell_id[1:], 16)
    digits = []
    for _ in range(_CELL_CHARS):
        n, r = divmod(n, 62)
        digits.append(_B62[r])
    name = box_prefix(box_tag) + "".join(reversed(digits))
    assert len(name) <= IFNAMSIZ
    return name


def cell_of(name: str, box_tag: str) -> str | None:
    """The cell id a tunnel name of this box stands for (None: not one of this box's)."""
    prefix = box_prefix(box_tag)
    rest = name[len(prefix):]
    if not name.startswith(prefix) or len(rest) != _CELL_CHARS or any(c not in _B62 for c in rest):
        return None
    n = 0
    for c in rest:
        n = n * 62 + _B62.index(c)
    return f"c{n:08x}" if n < 1 << 32 else None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= IFNAMSIZ or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) \
            or name in (".", ".."):
        raise WireGuardError(f"interface name {name!r} is not 1-{IFNAMSIZ} characters of [A-Za-z0-9_.-]")
    return name


def socket_path(name: str) -> str:
    return os.path.join(UAPI_DIR, f"{name}.sock")


# --------------------------------------------------------------------------------------
# peers and their state


@dataclasses.dataclass(frozen=True)
class Peer:
    public_key: bytes
    endpoint: str | None = None            # "host:port" ([v6]:port); None: learn it from the peer
    allowed_ips: Sequence[str] = ()
    keepalive_s: int = 0                   # 0: off; >0 also makes the interface send (handshake) at once

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", public_from_text(self.public_key))
        object.__setattr__(self, "allowed_ips", tuple(self.allowed_ips))
        if not isinstance(self.keepalive_s, int) or not 0 <= self.keepalive_s <= 65535:
            raise WireGuardError(f"peer keepalive {self.keepalive_s!r}: an integer 0..65535 seconds")


@dataclasses.dataclass
class PeerState:
    public_key: bytes
    endpoint: str = ""
    allowed_ips: list[str] = dataclasses.field(default_factory=list)
    last_handshake: float = 0.0            # unix time; 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive_s: int = 0


@dataclasses.dataclass
class DeviceState:
    listen_port: int = 0
    has_private_key: bool = False
    public_key: bytes = b""                # kernel only (the UAPI does not show it)
    peers: dict[bytes, PeerState] = dataclasses.field(default_factory=dict)


def _private_bytes(key: bytes | KeyPair | None) -> bytes | None:
    if key is None or isinstance(key, bytes | bytearray):
        if key is not None and len(key) != 32:
            raise WireGuardError("a WireGuard private key is 32 bytes")
        return None if key is None else bytes(key)
    return key.private


# --------------------------------------------------------------------------------------
# the UAPI text protocol (pure: no I/O)


def uapi_set(*, private_key: bytes | None = None, listen_port: int | None = None,
             replace_peers: bool = False, peers: Iterable[Peer] = (), remove: Iterable[bytes] = ()) -> str:
    """The text of one `set=1` request (ends with the blank line)."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        if not 0 <= listen_port <= 65535:
            raise WireGuardError(f"listen port {listen_port!r}: 0..65535 (0: any free port)")
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for p in peers:
        lines.append(f"public_key={p.public_key.hex()}")
        lines.append("replace_allowed_ips=true")
        if p.endpoint:
            lines.append(f"endpoint={_check_endpoint(p.endpoint)}")
        for cidr in p.allowed_ips:
            lines.append(f"allowed_ip={_check_cidr(cidr)}")
        lines.append(f"persistent_keepalive_interval={p.keepalive_s}")
    for key in remove:
        lines.append(f"public_key={public_from_text(key).hex()}")
        lines.append("remove=true")
    return "\n".join(lines) + "\n\n"


def _check_endpoint(endpoint: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in endpoint):
        raise WireGuardError(f"peer endpoint {endpoint!r}: expected HOST:PORT (an IP address; [v6]:port)")
    return endpoint


def _check_cidr(cidr: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError:
        raise WireGuardError(f"allowed ip {cidr!r} is not an address/prefix") from None


def uapi_parse_get(text: str) -> DeviceState:
    """Parse a `get=1` answer. The private key is noted as present and dropped."""
    state = DeviceState()
    peer: PeerState | None = None
    hs_sec = 0
    errno_ = None
    for line in text.split("\n"):
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "private_key":
            state.has_private_key = value.strip("0") != ""
            value = ""
        elif key == "listen_port":
            state.listen_port = int(value)
        elif key == "public_key":
            peer = PeerState(bytes.fromhex(value))
            state.peers[peer.public_key] = peer
        elif peer is not None and key == "endpoint":
            peer.endpoint = value
        elif peer is not None and key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif peer is not None and key == "last_handshake_time_sec":
            hs_sec = int(value)
        elif peer is not None and key == "last_handshake_time_nsec":
            peer.last_handshake = hs_sec + int(value) / 1e9
        elif peer is not None and key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif peer is not None and key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif peer is not None and key == "persistent_keepalive_interval":
            peer.keepalive_s = int(value)
        elif key == "errno":
            errno_ = int(value)
    if errno_ not in (0, None):
        raise WireGuardError(f"wireguard-go answered get with errno={errno_}")
    return state


# --------------------------------------------------------------------------------------
# thread pool for blocking work


_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="hived-wg")
    return _executor


async def run_blocking(fn, *args):
    from hived.net.netns import _Stranded

    global _executor
    try:
        return await asyncio.get_running_loop().run_in_executor(_pool(), fn, *args)
    except _Stranded as exc:
        # a worker is in an unknown namespace: never use this pool again
        if _executor is not None:
            _executor.shutdown(wait=False)
        _executor = None
        raise WireGuardError(str(exc)) from None


@contextlib.contextmanager
def in_netns(name: str | None):
    if name is None:
        yield
        return
    from hived.net.errors import NetworkError
    from hived.net.netns import entered

    try:
        with entered(name):
            yield
    except NetworkError as exc:
        raise WireGuardError(str(exc)) from None


def _iproute(netns: str | None):
    from pyroute2 import IPRoute

    with in_netns(netns):
        return IPRoute()


def _netlink_why(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


def _move_and_up(name: str, birth: str | None, target: str | None, mtu: int) -> int:
    """Move interface `name` from birth into target (if any) and set it up there; its ifindex."""
    ipr = _iproute(birth)
    try:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise WireGuardError(f"interface {name} did not appear in "
                                 f"{'netns ' + birth if birth else 'this namespace'}")
        if target is not None:
            fd = os.open(f"/run/netns/{target}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=idx[0], net_ns_fd=fd)
            except Exception as exc:  # noqa: BLE001 - netlink error, said with its cause
                raise WireGuardError(f"move {name} into netns {target}: {_netlink_why(exc)}") from None
            finally:
                os.close(fd)
    finally:
        ipr.close()
    ipr = _iproute(target if target is not None else birth)
    try:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise WireGuardError(f"interface {name} is not in netns {target} after the move")
        ipr.link("set", index=idx[0], mtu=mtu, state="up")
        return idx[0]
    finally:
        ipr.close()


def _delete_link(name: str, netns: str | None) -> bool:
    if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
        return False
    try:
        ipr = _iproute(netns)
    except WireGuardError:
        return False
    try:
        idx = ipr.link_lookup(ifname=name)
        for i in idx:
            with contextlib.suppress(Exception):
                ipr.link("del", index=i)
        return bool(idx)
    finally:
        ipr.close()


# --------------------------------------------------------------------------------------
# the interface


class Interface(abc.ABC):
    """One WireGuard interface. Made by `open_interface()`; `close()` removes everything."""

    driver = ""

    def __init__(self, name: str, birth_netns: str | None, target_netns: str | None) -> None:
        self.name = name
        self.birth_netns = birth_netns
        self.target_netns = target_netns
        self.ifindex = 0
        self.timings: dict[str, float] = {}
        self._closed = False

    @property
    def netns(self) -> str | None:
        """Where the interface (not its UDP socket) lives."""
        return self.target_netns if self.target_netns is not None else self.birth_netns

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} birth={self.birth_netns or 'caller'} "
                f"netns={self.netns or 'caller'}{' closed' if self._closed else ''}>")

    # -- configuration -----------------------------------------------------------------
    async def configure(self, *, private_key: bytes | KeyPair | None = None, listen_port: int | None = None,
                        peers: Sequence[Peer] | None = None) -> None:
        """Set the private key and/or listen port; `peers` (if given) replace all peers."""
        self._check_open()
        await self._set(private_key=_private_bytes(private_key), listen_port=listen_port,
                        replace_peers=peers is not None, peers=list(peers or ()))

    async def add_peer(self, peer: Peer) -> None:
        """Add a peer, or update it (its allowed IPs are replaced) if its key is known."""
        self._check_open()
        await self._set(peers=[peer])

    async def remove_peer(self, public_key: bytes) -> None:
        """Remove a peer; removing one that is not there is fine."""
        self._check_open()
        await self._set(remove=[public_key])

    async def listen_port(self) -> int:
        return (await self.state()).listen_port

    async def peers(self) -> dict[bytes, PeerState]:
        return (await self.state()).peers

    async def wait_handshake(self, peer_public_key: bytes, timeout: float) -> float:
        """Wait for a completed handshake with the peer; the seconds waited.

        Raises HandshakeTimeout (with what was seen: bytes sent/received) after `timeout`."""
        self._check_open()
        key = public_from_text(peer_public_key)
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = None
        while True:
            state = await self.state()
            last = state.peers.get(key)
            if last is None:
                raise WireGuardError(f"{self.name}: no peer {b64(key)} to wait for: add it first")
            if last.last_handshake > 0:
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                raise HandshakeTimeout(
                    f"{self.name}: no WireGuard handshake with peer {b64(key)} at {last.endpoint or '(no endpoint)'} "
                    f"within {timeout:g} s (sent {last.tx_bytes} B, received {last.rx_bytes} B): is the peer up, "
                    "does it know this interface's public key, and is its UDP port reachable?")
            await asyncio.sleep(POLL_S)

    def usable(self) -> bool:
        """Still there to be configured (a pre-started interface is checked before it is used)."""
        return not self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise WireGuardError(f"interface {self.name} is closed")

    @abc.abstractmethod
    async def _set(self, *, private_key: bytes | None = None, listen_port: int | None = None,
                   replace_peers: bool = False, peers: Sequence[Peer] = (), remove: Sequence[bytes] = ()) -> None:
        ...

    @abc.abstractmethod
    async def state(self) -> DeviceState:
        ...

    @abc.abstractmethod
    async def close(self) -> None:
        ...


class GoInterface(Interface):
    """wireguard-go: a child process serving one tun and its UAPI socket."""

    driver = "wireguard-go"

    def __init__(self, name: str, birth_netns: str | None, target_netns: str | None) -> None:
        super().__init__(name, birth_netns, target_netns)
        self.process: subprocess.Popen | None = None
        self._log_fd = -1

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def socket(self) -> str:
        return socket_path(self.name)

    def usable(self) -> bool:
        return super().usable() and self.process is not None and self.process.poll() is None \
            and os.path.exists(self.socket)

    # -- start -----------------------------------------------------------------------------
    def _start_blocking(self, mtu: int, timeout: float) -> None:
        t0 = time.perf_counter()
        os.makedirs(UAPI_DIR, mode=0o755, exist_ok=True)
        if os.path.exists(self.socket):
            raise WireGuardError(f"{self.socket} already exists: is another wireguard-go serving {self.name}? "
                                 "(a leftover of a crash is removed by clean_leftovers)")
        # The log goes to memory (memfd), read only to explain a failed start.
        self._log_fd = os.memfd_create(f"wg-{self.name}", os.MFD_CLOEXEC)
        env = {"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        try:
            with in_netns(self.birth_netns):   # the child is born in this thread's namespace
                self.process = subprocess.Popen(
                    [WIREGUARD_GO, "-f", self.name], env=env, stdin=subprocess.DEVNULL, stdout=self._log_fd,
                    stderr=self._log_fd, start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise MissingCapability(f"{WIREGUARD_GO} is not installed (Debian: apt-get install wireguard-go; "
                                    "or use the kernel driver where the wireguard module exists)") from None
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.process.poll() is not None:
                raise WireGuardError(f"wireguard-go for {self.name} exited with {self.process.returncode} before "
                                     f"its UAPI socket appeared: {self._log_tail() or '(no output)'}")
            if time.monotonic() >= deadline:
                raise WireGuardError(f"wireguard-go for {self.name} did not open {self.socket} within {timeout:g} s")
            time.sleep(0.001)
        self.timings["spawn_ms"] = (time.perf_counter() - t0) * 1000
        self.ifindex = _move_and_up(self.name, self.birth_netns, self.target_netns, mtu)
        self.timings["start_ms"] = (time.perf_counter() - t0) * 1000

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log_fd < 0:
            return ""
        try:
            size = os.fstat(self._log_fd).st_size
            return os.pread(self._log_fd, limit, max(0, size - limit)).decode(errors="replace").strip()
        except OSError:
            return ""

    # -- UAPI ------------------------------------------------------------------------------
    async def _uapi(self, request: str) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.socket), UAPI_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            alive = self.process is not None and self.process.poll() is None
            raise WireGuardError(f"{self.name}: cannot reach wireguard-go's UAPI socket {self.socket} ({exc}); "
                                 f"process {'running' if alive else 'gone: ' + (self._log_tail() or 'no output')}")\
                from None
        try:
            writer.write(request.encode())
            await writer.drain()
            data = await asyncio.wait_for(reader.readuntil(b"\n\n"), UAPI_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise WireGuardError(f"{self.name}: UAPI request failed: {type(exc).__name__}") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return data.decode()

    async def _set(self, *, private_key=None, listen_port=None, replace_peers=False, peers=(), remove=()) -> None:
        answer = await self._uapi(uapi_set(private_key=private_key, listen_port=listen_port,
                                           replace_peers=replace_peers, peers=peers, remove=remove))
        m = re.search(r"errno=(-?\d+)", answer)
        if m is None or m.group(1) != "0":
            code = int(m.group(1)) if m else None
            why = os.strerror(code) if code and code > 0 else "unknown error"
            hint = " (the listen port is in use?)" if code == 98 or (listen_port and code) else ""
            raise WireGuardError(f"{self.name}: wireguard-go refused the configuration: errno={code} {why}{hint}")

    async def state(self) -> DeviceState:
        self._check_open()
        return uapi_parse_get(await self._uapi("get=1\n\n"))

    # -- close ---------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await run_blocking(self._close_blocking)

    def _close_blocking(self) -> None:
        proc = self.process
        if proc is None:  # never started: the name (socket, interface) may be another's
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("wireguard-go %d for %s did not die after SIGKILL", proc.pid, self.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        # The tun dies with the process's fd; delete it only if something still holds it.
        for ns in {self.netns, self.birth_netns}:
            if _delete_link(self.name, ns):
                log.warning("%s: interface still there after wireguard-go exited: deleted", self.name)
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1


class KernelInterface(Interface):
    """Kernel WireGuard through pyroute2 (link kind wireguard + generic netlink)."""

    driver = "kernel"

    def _start_blocking(self, mtu: int) -> None:
        t0 = time.perf_counter()
        ipr = _iproute(self.birth_netns)
        try:
            try:
                ipr.link("add", ifname=self.name, kind="wireguard")
            except Exception as exc:  # noqa: BLE001 - netlink error, said with its cause
                raise WireGuardError(f"create kernel WireGuard interface {self.name}: {_netlink_why(exc)}") from None
        finally:
            ipr.close()
        self.ifindex = _move_and_up(self.name, self.birth_netns, self.target_netns, mtu)
        self.timings["start_ms"] = (time.perf_counter() - t0) * 1000

    def _wg(self):
        from pyroute2 import WireGuard

        with in_netns(self.netns):
            return WireGuard()

    def _set_blocking(self, private_key, listen_port, replace_peers, peers, remove) -> None:
        wg = self._wg()
        try:
            if replace_peers:
                for key in list(self._state_blocking(wg).peers):
                    wg.set(self.name, peer={"public_key": b64(key), "remove": True})
            kwargs = {}
            if private_key is not None:
                kwargs["private_key"] = b64(private_key)
            if listen_port is not None:
                kwargs["listen_port"] = listen_port
            if kwargs:
                wg.set(self.name, **kwargs)
            for p in peers:
                spec = {"public_key": b64(p.public_key), "allowed_ips": [_check_cidr(c) for c in p.allowed_ips],
                        "persistent_keepalive": p.keepalive_s}
                if p.endpoint:
                    host, _, port = _check_endpoint(p.endpoint).rpartition(":")
                    spec["endpoint_addr"] = host.strip("[]")
                    spec["endpoint_port"] = int(port)
                wg.set(self.name, peer=spec)
            for key in remove:
                wg.set(self.name, peer={"public_key": b64(public_from_text(key)), "remove": True})
        except WireGuardError:
            raise
        except Exception as exc:  # noqa: BLE001 - netlink error, said with its cause
            raise WireGuardError(f"{self.name}: kernel WireGuard refused the configuration: "
                                 f"{_netlink_why(exc)}") from None
        finally:
            wg.close()

    async def _set(self, *, private_key=None, listen_port=None, replace_peers=False, peers=(), remove=()) -> None:
        await run_blocking(self._set_blocking, private_key, listen_port, replace_peers, list(peers), list(remove))

    def _state_blocking(self, wg=None) -> DeviceState:
        own = wg is None
        wg = wg or self._wg()
        try:
            state = DeviceState()
            for msg in wg.info(self.name):
                state.listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or 0
                state.has_private_key = bool(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
                state.public_key = _raw(msg.get_attr("WGDEVICE_A_PUBLIC_KEY"))
                for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                    ps = PeerState(_raw(peer.get_attr("WGPEER_A_PUBLIC_KEY")))
                    hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                    if hs:
                        sec = hs.get("tv_sec", 0) if isinstance(hs, dict) else getattr(hs, "tv_sec", 0)
                        nsec = hs.get("tv_nsec", 0) if isinstance(hs, dict) else getattr(hs, "tv_nsec", 0)
                        ps.last_handshake = sec + nsec / 1e9
                    ps.rx_bytes = peer.get_attr("WGPEER_A_RX_BYTES") or 0
                    ps.tx_bytes = peer.get_attr("WGPEER_A_TX_BYTES") or 0
                    ps.keepalive_s = peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0
                    state.peers[ps.public_key] = ps
            return state
        finally:
            if own:
                wg.close()

    async def state(self) -> DeviceState:
        self._check_open()
        return await run_blocking(self._state_blocking)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await run_blocking(lambda: [_delete_link(self.name, ns) for ns in {self.netns, self.birth_netns}])


def _raw(key) -> bytes:
    if not key:
        return b""
    if isinstance(key, bytes) and len(key) == 32:
        return key
    return public_from_text(key.decode() if isinstance(key, bytes) else key)


# --------------------------------------------------------------------------------------
# opening


_kernel_probe: tuple[bool, str] | None = None


def kernel_available() -> tuple[bool, str]:
    """(can this host make kernel WireGuard interfaces, why not). Probed once, in a scratch
    namespace, by creating one."""
    global _kernel_probe
    if _kernel_probe is not None:
        return _kernel_probe
    from hived.net.netns import create_netns, delete_netns

    scratch = f"hvwgprobe-{os.getpid()}"
    try:
        create_netns(scratch)
    except OSError as exc:
        return False, f"cannot make a scratch namespace to probe kernel WireGuard: {exc}"
    try:
        ipr = _iproute(scratch)
        try:
            ipr.link("add", ifname="wgprobe", kind="wireguard")
            _kernel_probe = (True, "")
        except Exception as exc:  # noqa: BLE001 - any refusal means "not here"
            _kernel_probe = (False, f"the kernel cannot create a wireguard link ({_netlink_why(exc)}): "
                                    "no wireguard module (CONFIG_WIREGUARD)")
        finally:
            ipr.close()
    finally:
        delete_netns(scratch)
    return _kernel_probe


async def open_interface(name: str, *, birth_netns: str | None = None, target_netns: str | None = None,
                         driver: str = "auto", mtu: int = DEFAULT_MTU,
                         start_timeout: float = START_TIMEOUT_S) -> Interface:
    """Create interface `name` in `birth_netns` (None: the caller's namespace), where its
    UDP socket stays, move it into `target_netns` (if given) and set it up there.

    driver: "wireguard-go", "kernel", or "auto" (kernel where the module exists). No key
    and no peer yet: `configure()` next. Nothing is left behind if this raises or is cancelled.
    """
    _check_name(name)
    for ns in (birth_netns, target_netns):
        if ns is not None and not os.path.exists(f"/run/netns/{ns}"):
            raise WireGuardError(f"network namespace {ns} does not exist")
    if driver == "auto":
        driver = "kernel" if (await run_blocking(kernel_available))[0] else "wireguard-go"
    if driver == "wireguard-go":
        iface: Interface = GoInterface(name, birth_netns, target_netns)
        start = (iface._start_blocking, mtu, start_timeout)
    elif driver == "kernel":
        ok, why = await run_blocking(kernel_available)
        if not ok:
            raise MissingCapability(why)
        iface = KernelInterface(name, birth_netns, target_netns)
        start = (iface._start_blocking, mtu)
    else:
        raise WireGuardError(f"WireGuard driver {driver!r}: expected auto, wireguard-go or kernel")
    fut = asyncio.get_running_loop().run_in_executor(_pool(), *start)
    try:
        await asyncio.shield(fut)
    except BaseException as exc:
        # let the blocking start finish (so its effects are known), then undo all of it
        with contextlib.suppress(BaseException):
            await fut
        with contextlib.suppress(Exception):
            await asyncio.shield(iface.close())
        if isinstance(exc, WireGuardError | asyncio.CancelledError) or not isinstance(exc, Exception):
            raise
        raise WireGuardError(f"interface {name}: {exc}") from None
    return iface


# --------------------------------------------------------------------------------------
# crash cleanup


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_ours(name: str, prefix: str, exact: bool = False) -> bool:
    if exact:
        return name == prefix
    rest = name[len(prefix):]
    return name.startswith(prefix) and len(rest) == _CELL_CHARS and all(c in _B62 for c in rest)


def wireguard_go_processes(prefix: str, *, exact: bool = False) -> dict[int, str]:
    """{pid: interface} of wireguard-go processes serving interfaces of this prefix."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if not argv or os.path.basename(argv[0]) != WIREGUARD_GO:
            continue
        names = [a for a in argv[1:] if not a.startswith("-")]
        if names and _is_ours(names[-1], prefix, exact):
            found[int(entry)] = names[-1]
    return found


def clean_leftovers(prefix: str, *, netns: Iterable[str | None] = (None,), exact: bool = False) -> list[str]:
    """Kill wireguard-go processes of interfaces named `prefix` + 6 characters (box_prefix),
    or exactly `prefix` if `exact`, remove their UAPI sockets and any such interface left in
    `netns` (None: this one). Returns what was removed ("process 123 (wab0001ab)", ...)."""
    removed = []
    procs = wireguard_go_processes(prefix, exact=exact)
    for pid, name in procs.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            removed.append(f"process {pid} ({name})")
    deadline = time.monotonic() + 5
    for pid in procs:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            # our own child (a zombie until reaped) or another's: wait until it is gone
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            if _proc_state(pid) == "Z":
                break
            time.sleep(0.005)
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(UAPI_DIR)):
            if entry.endswith(".sock") and _is_ours(entry[:-5], prefix, exact):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(UAPI_DIR, entry))
                    removed.append(f"socket {os.path.join(UAPI_DIR, entry)}")
    for ns in netns:
        if ns is not None and not os.path.exists(f"/run/netns/{ns}"):
            continue
        ipr = _iproute(ns)
        try:
            for link in ipr.get_links():
                ifname = link.get_attr("IFLA_IFNAME")
                if ifname and _is_ours(ifname, prefix, exact):
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=link["index"])
                        removed.append(f"interface {ifname}" + (f" in {ns}" if ns else ""))
        finally:
            ipr.close()
    return removed


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def parent_pid(pid: int) -> int:
    """The parent of a process (0 if it is gone); 1 (or a subreaper) once its owner died."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0

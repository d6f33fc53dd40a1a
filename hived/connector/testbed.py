"""A customer network on this machine, for tests, `hived bench secure` and demos.

    host ns  <host veth> 10.231.N.1/30 ── 10.231.N.2 up0   connector ns   priv0 10.50.N.1/24 ── eth0 10.50.N.2
      (the box, its cells' WireGuard                  `hived connector`                    private ns:
       UDP sockets, the control plane)                WireGuard :51820                      HTTP :8080 /secret

The private service is reachable only from the connector's namespace: nothing routes
10.50.N.0/24 from the host, so a cell gets there through its tunnel or not at all.
Everything is named `hvt?<tag>` and removed by `down()`, also after a failure half way.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

CONNECTOR_PORT = 51820
SERVICE_PORT = 8080


def _ip(*args, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {p.stderr.strip()}")
    return p


class CustomerNetwork:
    def __init__(self, workdir: Path, *, network: str = "acme-private") -> None:
        self.n = secrets.randbelow(200) + 20
        tag = secrets.token_hex(2)
        self.tag = tag
        self.network = network
        self.conn_ns, self.priv_ns, self.host_veth = f"hvtc{tag}", f"hvtp{tag}", f"hvtv{tag}"
        self.host_ip, self.conn_ip = f"10.231.{self.n}.1", f"10.231.{self.n}.2"
        self.private_net, self.private_ip = f"10.50.{self.n}.0/24", f"10.50.{self.n}.2"
        self.endpoint = f"{self.conn_ip}:{CONNECTOR_PORT}"
        self.workdir = Path(workdir)
        self.secret = secrets.token_hex(16)
        self.procs: dict[str, subprocess.Popen] = {}
        self.connector_log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.private_ip}:{SERVICE_PORT}/secret"

    def up(self) -> CustomerNetwork:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        _ip("netns", "add", self.conn_ns)
        _ip("netns", "add", self.priv_ns)
        _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", "up0", "netns", self.conn_ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_veth)
        _ip("link", "set", self.host_veth, "up")
        _ip("link", "add", "priv0", "type", "veth", "peer", "name", "eth0", "netns", self.priv_ns, ns=self.conn_ns)
        for args in (("addr", "add", f"{self.conn_ip}/30", "dev", "up0"), ("link", "set", "up0", "up"),
                     ("link", "set", "lo", "up"), ("addr", "add", f"10.50.{self.n}.1/24", "dev", "priv0"),
                     ("link", "set", "priv0", "up")):
            _ip(*args, ns=self.conn_ns)
        for args in (("addr", "add", f"{self.private_ip}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                     ("link", "set", "lo", "up")):
            _ip(*args, ns=self.priv_ns)
        www = self.workdir / f"www-{self.tag}"
        www.mkdir(parents=True, exist_ok=True)
        (www / "secret").write_text(self.secret + "\n")
        self.procs["private"] = subprocess.Popen(
            ["ip", "netns", "exec", self.priv_ns, sys.executable, "-m", "http.server", "-b", self.private_ip,
             "-d", str(www), str(SERVICE_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def connector_config(self, control: str, token: str) -> Path:
        cfg = self.workdir / f"connector-{self.tag}.toml"
        cfg.write_text(f"""[connector]
control = "{control}"
network = "{self.network}"
token = "{token}"
endpoint = "{self.endpoint}"
listen_port = {CONNECTOR_PORT}
masquerade = true
interface = "hvc{self.tag}"
""")
        cfg.chmod(0o600)
        return cfg

    def start_connector(self, control: str, token: str) -> subprocess.Popen:
        cfg = self.connector_config(control, token)
        self.connector_log = self.workdir / f"connector-{self.tag}-{time.monotonic_ns()}.log"
        with open(self.connector_log, "wb") as log:
            p = subprocess.Popen(["ip", "netns", "exec", self.conn_ns, sys.executable, "-m", "hived", "connector",
                                  "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        self.procs["connector"] = p
        return p

    def stop_connector(self, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop("connector", None)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def connector_output(self) -> str:
        with contextlib.suppress(OSError, AttributeError):
            return self.connector_log.read_text(errors="replace")[-4000:]
        return ""

    def down(self) -> None:
        for name in ("connector", *list(self.procs)):
            p = self.procs.pop(name, None)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        _ip("link", "del", self.host_veth, check=False)
        for ns in (self.conn_ns, self.priv_ns):
            _ip("netns", "del", ns, check=False)

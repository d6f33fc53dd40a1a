"""Helpers for the repository cache tests (no tests here): test repositories, a real `git daemon`
on 127.0.0.1, a proxy that kills the daemon mid-transfer, and git's smart HTTP (git
http-backend) behind Basic auth on 127.0.0.1.

Everything started here is stopped by the context manager that started it, on failure too,
and killed by its own process id or group (never by name).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from ports import free_port

EPOCH = 1_700_000_000


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop mounts, tmpfs)")


_HOME: Path | None = None


def git_env(extra: dict | None = None) -> dict:
    """A clean environment for the test's own git (no user or system config)."""
    global _HOME
    if _HOME is None:
        import atexit
        import shutil
        import tempfile

        _HOME = Path(tempfile.mkdtemp(prefix="hived-repos-home-"))
        atexit.register(shutil.rmtree, _HOME, True)
        (_HOME / "empty.gitconfig").write_text("")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(_HOME), "LC_ALL": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(_HOME / "empty.gitconfig"),
           "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    if extra:
        env.update(extra)
    return env


def git(*args: str, cwd: str | os.PathLike | None = None, input: bytes | None = None,
        env: dict | None = None) -> str:
    p = subprocess.run(["git", *args], cwd=cwd, input=input if input is not None else b"", capture_output=True,
                       env=git_env(env), check=False)
    if p.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout.decode(errors="replace").strip()


class TestRepo:
    """A non-bare repository the tests commit to (git daemon serves it as it is)."""

    __test__ = False

    def __init__(self, path: Path, branch: str = "main"):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "-b", branch, str(self.path))
        self.tick = 0

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def commit(self, files: dict[str, bytes | str | None], msg: str = "change", executable: tuple = (),
               symlinks: dict[str, str] | None = None) -> str:
        for name, data in files.items():
            p = self.path / name
            if data is None:
                git("rm", "-q", "-r", "--", name, cwd=self.path)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data.encode() if isinstance(data, str) else data)
            if name in executable:
                p.chmod(0o755)
        for name, target in (symlinks or {}).items():
            p = self.path / name
            p.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            os.symlink(target, p)
        git("add", "-A", cwd=self.path)
        self.tick += 1
        when = f"@{EPOCH + self.tick} +0000"
        git("commit", "-q", "--allow-empty", "-m", msg, cwd=self.path,
            env={"GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when})
        return self.head()

    def head(self, rev: str = "HEAD") -> str:
        return git("rev-parse", f"{rev}^{{commit}}", cwd=self.path)

    def archive_listing(self, rev: str) -> dict[str, tuple]:
        """path -> (kind, mode bits that matter, sha256 of content or link target), from git archive."""
        import io
        import tarfile

        raw = subprocess.run(["git", "archive", "--format=tar", rev], cwd=self.path, capture_output=True,
                             env=git_env(), check=True, input=b"").stdout
        out = {}
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            for m in tf.getmembers():
                name = m.name.rstrip("/")
                if m.isdir():
                    out[name] = ("dir", 0, "")
                elif m.issym():
                    out[name] = ("link", 0, m.linkname)
                else:
                    data = tf.extractfile(m).read()
                    out[name] = ("file", m.mode & 0o111 != 0, hashlib.sha256(data).hexdigest())
        return out


def tree_listing(root: Path) -> dict[str, tuple]:
    """The same shape as archive_listing, from a mounted image."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", 0, "")
            else:
                out[rel] = ("file", os.stat(p).st_mode & 0o111 != 0, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@contextlib.contextmanager
def mounted(image: Path, fs_type: str, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop,ro", "-t", fs_type, str(image), str(where)], check=True,
                   capture_output=True, input=b"")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True, input=b"")


class GitDaemon:
    """`git daemon` on 127.0.0.1:<free port>, serving every repository under base."""

    def __init__(self, base: Path, port: int | None = None):
        self.base = Path(base)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def start(self) -> GitDaemon:
        log = open(self.base.parent / f"git-daemon-{self.port}.log", "ab")  # noqa: SIM115 (the child has it)
        with log:
            self.proc = subprocess.Popen(
                ["git", "daemon", "--reuseaddr", f"--base-path={self.base}", "--export-all", f"--port={self.port}",
                 "--listen=127.0.0.1", str(self.base)],
                env=git_env(), stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        """Kill the daemon and the upload-packs it forked (its process group), by its pid."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> GitDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DyingProxy:
    """TCP relay 127.0.0.1:port -> upstream; after `limit` bytes towards the client it calls
    on_limit() (kills the daemon) and cuts the connection: a server dying mid-fetch."""

    def __init__(self, upstream_port: int, limit: int, on_limit=None, stall: bool = False):
        self.upstream_port = upstream_port
        self.limit = limit
        self.on_limit = on_limit
        self.stall = stall  # instead of dying, stop sending (a hung server)
        self.sent = 0
        self.tripped = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                c.close()
                continue
            self._conns += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if downstream:
                    room = self.limit - self.sent
                    if room <= 0 or self.tripped.is_set():
                        self._trip()
                        return
                    data = data[:room]
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not self.stall:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

    def _trip(self) -> None:
        if not self.tripped.is_set():
            self.tripped.set()
            if self.on_limit:
                self.on_limit()
        if self.stall:
            return
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        for s in [self.sock, *self._conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> DyingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SilentServer:
    """Accepts connections and never answers (a hung git server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class GitHttp:
    """git's smart HTTP protocol (git http-backend as a CGI) on 127.0.0.1, Basic auth required
    when user/password are set. Records the Authorization headers it saw."""

    def __init__(self, base: Path, user: str = "", password: str = ""):
        self.base = Path(base)
        self.expected = ("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()) if user else None
        self.auth_seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                self._cgi()

            def do_POST(self):
                self._cgi()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _cgi(self):
                auth = self.headers.get("Authorization")
                body = self._body()
                if auth:
                    outer.auth_seen.append(auth)
                if outer.expected and auth != outer.expected:
                    self._reply(401, [("WWW-Authenticate", 'Basic realm="git"')], b"no\n")
                    return
                path, _, query = self.path.partition("?")
                env = git_env({"GIT_PROJECT_ROOT": str(outer.base), "GIT_HTTP_EXPORT_ALL": "1",
                               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                               "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                               "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
                               "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")})
                p = subprocess.run(["git", "http-backend"], input=body, capture_output=True, env=env, check=False)
                head, _, payload = p.stdout.partition(b"\r\n\r\n")
                status, headers = 200, []
                for line in head.decode(errors="replace").split("\r\n"):
                    k, _, v = line.partition(":")
                    if k.lower() == "status":
                        status = int(v.strip().split()[0])
                    elif k:
                        headers.append((k, v.strip()))
                self._reply(status, headers, payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> GitHttp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CmdlineWatch:
    """Reads every /proc/*/cmdline (world-readable) while running; records any that contain
    one of the secrets."""

    def __init__(self, secrets: list[str]):
        self.secrets = [s.encode() for s in secrets if s]
        self.hits: list[str] = []
        self.scans = 0
        self.git_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if b"git" in cmd.split(b"\0")[0]:
                    self.git_seen += 1
                if any(s in cmd for s in self.secrets):
                    self.hits.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def files_containing(root: Path, needles: list[str]) -> list[str]:
    bad = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            with contextlib.suppress(OSError):
                data = p.read_bytes()
                if any(n.encode() in data for n in needles if n):
                    bad.append(str(p))
    return bad


def random_blobs(total: int, count: int, seed: int = 1) -> dict[str, bytes]:
    """count incompressible files adding up to total bytes (deterministic)."""
    import random

    rnd = random.Random(seed)
    size = total // count
    return {f"blob/{i:03d}.bin": rnd.randbytes(size) for i in range(count)}

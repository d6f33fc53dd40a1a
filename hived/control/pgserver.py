"""A throwaway PostgreSQL server: `initdb` in a temporary directory, run as an unprivileged
user, listening only on a Unix socket in that directory; stopped and removed on close().

For tests and `hived bench control --store postgresql` (no `--database`). A hive in
production points `[hive] database` at a server its operators run.

    with ThrowawayPostgres() as pg:
        pg.url            # postgresql://hived@/hived?host=/tmp/hived-pg-XXXX (no password in it)
        pg.password_file  # the superuser's password (scram-sha-256), mode 0600

Debian keeps the server binaries out of PATH (/usr/lib/postgresql/<major>/bin); the newest
major is used, or $HIVED_PG_BIN.
"""

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

USER = "hived"  # the server's superuser (a database role, not a Unix account)
DATABASE = "hived"


class PostgresUnavailable(Exception):
    """The PostgreSQL server binaries are not installed (Debian package postgresql)."""


def find_bindir() -> Path:
    env = os.environ.get("HIVED_PG_BIN")
    candidates = [Path(env)] if env else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, postgres) not found: install Debian's "
                              "postgresql package (make deps) or set HIVED_PG_BIN")


def _server_account() -> tuple[int, int] | None:
    """initdb refuses to run as root: as root, run the server as `nobody`."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


class ThrowawayPostgres:
    def __init__(self, *, fsync: bool = True, max_connections: int = 100) -> None:
        self.bindir = find_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="hived-pg-"))
        self.proc: subprocess.Popen | None = None
        self.fsync = fsync
        self.max_connections = max_connections
        self.password = secrets.token_urlsafe(24)
        self.password_file = self.dir / "password"
        self.log_path = self.dir / "server.log"

    @property
    def socket_dir(self) -> Path:
        return self.dir / "sock"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@/{DATABASE}?host={self.socket_dir}"

    def start(self) -> "ThrowawayPostgres":
        account = _server_account()
        try:
            data = self.dir / "data"
            self.socket_dir.mkdir()
            pwfile_for_initdb = self.dir / "initdb.pw"
            pwfile_for_initdb.write_text(self.password + "\n")
            self.password_file.write_text(self.password + "\n")
            self.password_file.chmod(0o600)
            if account is not None:
                for path in (self.dir, self.socket_dir, pwfile_for_initdb):
                    os.chown(path, *account)
            self.dir.chmod(0o711)
            as_user = {"user": account[0], "group": account[1], "extra_groups": []} if account else {}
            self._run([self.bindir / "initdb", "-D", data, "-U", USER, "--pwfile", pwfile_for_initdb,
                       "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"], as_user)
            pwfile_for_initdb.unlink()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.bindir / "postgres", "-D", data, "-k", self.socket_dir, "-c", "listen_addresses=",
                     "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", f"max_connections={self.max_connections}",
                     "-c", "unix_socket_permissions=0777"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, **as_user)
            self._wait_ready(30)
            self._run([self.bindir / "createdb", "-h", self.socket_dir, "-U", USER, DATABASE], {},
                      env=dict(os.environ, PGPASSWORD=self.password))
        except BaseException:
            self.close()
            raise
        return self

    def _run(self, argv, as_user: dict, env=None) -> None:
        out = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True, env=env,
                             timeout=120, **as_user)
        if out.returncode != 0:
            raise RuntimeError(f"{Path(str(argv[0])).name} failed ({out.returncode}): "
                               f"{(out.stderr or out.stdout).decode(errors='replace')[-1500:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sock = self.socket_dir / ".s.PGSQL.5432"
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not open its socket within {timeout:g} s: {self.log()}")
            time.sleep(0.05)
        while subprocess.run([str(self.bindir / "pg_isready"), "-q", "-h", str(self.socket_dir)]).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready within {timeout:g} s: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server (fast shutdown, then kill) and remove everything it had."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, stop
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "ThrowawayPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

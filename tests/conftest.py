import importlib
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["cython", "python"])
def framing(request):
    """Both frame implementations; the compiled one must exist (native.compiled is required)."""
    if request.param == "cython":
        return importlib.import_module("hived._framing")
    return importlib.import_module("hived.protocol.framing_py")


@pytest.fixture(params=["cython", "python"])
def tokenbucket(request):
    if request.param == "cython":
        return importlib.import_module("hived._tokenbucket")
    return importlib.import_module("hived.ratelimit_py")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy_name(request):
    return request.param


def run_on(loop_name: str, coro_fn):
    """Run `coro_fn()` on a fresh loop of the named kind."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro_fn())
    import asyncio

    return asyncio.run(coro_fn())


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups, namespaces, taps)")


def need_binary(name: str, package: str):
    if shutil.which(name) is None:
        pytest.skip(f"{name} not installed (Debian package {package})")


def python() -> str:
    return sys.executable


# -- PostgreSQL: one throwaway server per test session, one fresh database per test ---------------
@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's postgresql package): initdb in a temp dir, run as an
    unprivileged user, on a Unix socket in that dir; stopped and removed at the end, also on failure."""
    from hived.control.pgserver import PostgresUnavailable, ThrowawayPostgres

    try:
        server = ThrowawayPostgres(fsync=False)  # tests: durability across power cuts is not under test
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.close()


class PgDatabase:
    """One empty database on the test server; `url` has no password (`password` is separate)."""

    def __init__(self, server, name: str) -> None:
        self.server, self.name = server, name
        self.url = server.url.replace("/hived?", f"/{name}?")
        self.password = server.password

    def sql(self, statement: str, *args):
        """Run one statement on a connection of its own (what another process would see)."""
        import asyncio

        import asyncpg

        async def go():
            conn = await asyncpg.connect(self.url, password=self.password)
            try:
                return await conn.fetch(statement, *args)
            finally:
                await conn.close()
        return asyncio.run(go())


@pytest.fixture
def pg_database(postgres_server):
    import secrets

    name = f"t_{secrets.token_hex(6)}"
    admin = PgDatabase(postgres_server, "hived")
    admin.sql(f"CREATE DATABASE {name}")
    yield PgDatabase(postgres_server, name)
    admin.sql(f"DROP DATABASE {name} WITH (FORCE)")


class Opener:
    """Opens the store under test on one place (a file, a database), as often as asked."""

    def __init__(self, kind: str, tmp_path, request) -> None:
        self.kind = kind
        self.path = tmp_path / "h.db"
        self.db = request.getfixturevalue("pg_database") if kind == "postgresql" else None

    def __call__(self, hive: str = "h", **kw):
        if self.kind == "sqlite":
            from hived.control.store import SQLiteStore

            return SQLiteStore(self.path, hive, **kw)
        from hived.control.pgstore import PostgresStore

        return PostgresStore(self.db.url, hive, password=self.db.password, **kw)

    def committed_state(self, build_id: str):
        """The build's state as another connection sees it."""
        if self.kind == "sqlite":
            import sqlite3

            raw = sqlite3.connect(self.path)
            try:
                row = raw.execute("SELECT state FROM builds WHERE id = ?", (build_id,)).fetchone()
            finally:
                raw.close()
            return row[0] if row else None
        rows = self.db.sql("SELECT state FROM builds WHERE id = $1", build_id)
        return rows[0]["state"] if rows else None


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request, tmp_path):
    return Opener(request.param, tmp_path, request)

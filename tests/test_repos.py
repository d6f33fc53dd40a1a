"""The repository cache with real parts: repositories made here, served by a real `git daemon`
on 127.0.0.1 (and file://, and git's smart HTTP behind Basic auth), checkout images mounted
read-only through a loop device and compared with `git archive`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_repos_support import (
    CmdlineWatch,
    DyingProxy,
    GitDaemon,
    GitHttp,
    SilentServer,
    TestRepo,
    files_containing,
    git,
    mounted,
    need_root,
    random_blobs,
    tree_listing,
)

from hived.repos import (
    AuthError,
    CacheFull,
    CheckoutImage,
    Credentials,
    InUse,
    InvalidRevision,
    InvalidUrl,
    RemoteUnavailable,
    RepoCache,
    RepoError,
    RepoNotFound,
    RevisionNotFound,
)
from hived.repos.git import GitFailed
from hived.repos.url import parse_url

from conftest import run_on

ALLOW = ("git", "file", "http")


def run(coro):
    return asyncio.run(coro)


def make_cache(root: Path, max_bytes: int = 1 << 30, **kw) -> RepoCache:
    c = RepoCache(root, max_bytes, protocols=kw.pop("protocols", ALLOW), **kw)
    c.min_free_bytes = 0
    return c


def one_line(e: BaseException) -> str:
    s = str(e)
    assert "\n" not in s and len(s) < 600, s
    return s


class Project:
    """srv/proj: branches main and feature, tags v1 (light) and v2 (annotated), a commit only
    reachable from refs/pull/7/head, files of every kind."""

    def __init__(self, base: Path):
        self.repo = TestRepo(base / "proj")
        r = self.repo
        self.c1 = r.commit({"README.md": "hello\n", "src/main.c": "int main(void) { return 0; }\n",
                            "tools/run.sh": "#!/bin/sh\necho run\n", "deep/a/b/c/d.txt": "deep\n",
                            "crlf.txt": "line\n", ".gitattributes": "crlf.txt text eol=crlf\n"},
                           "one", executable=("tools/run.sh",), symlinks={"link-to-readme": "README.md"})
        git("tag", "v1", cwd=r.path)
        self.c2 = r.commit({"README.md": "hello again\n", "src/util.c": "/* util */\n"}, "two")
        git("tag", "-a", "-m", "release 2", "v2", cwd=r.path)
        git("checkout", "-q", "-b", "feature", cwd=r.path)
        self.c3 = r.commit({"feature.txt": "feature\n", "deep/a/b/c/d.txt": None}, "three")
        git("checkout", "-q", "main", cwd=r.path)
        tree = git("rev-parse", f"{self.c2}^{{tree}}", cwd=r.path)
        self.c4 = git("commit-tree", tree, "-p", self.c2, "-m", "a pull request", cwd=r.path)
        git("update-ref", "refs/pull/7/head", self.c4, cwd=r.path)


@pytest.fixture
def srv(tmp_path):
    base = tmp_path / "srv"
    base.mkdir()
    return base


@pytest.fixture
def project(srv):
    return Project(srv)


@pytest.fixture
def daemon(srv):
    d = GitDaemon(srv).start()
    try:
        yield d
    finally:
        d.stop()


# ------------------------------------------------------------------------------------ resolving


@pytest.mark.parametrize("transport", ["git", "file"])
def test_resolve_branches_tags_commits(tmp_path, project, daemon, transport):
    url = daemon.url("proj") if transport == "git" else project.repo.url
    cache = make_cache(tmp_path / "cache")
    p = project

    async def main():
        assert await cache.resolve(url, "main") == p.c2
        assert cache.stats["fetches"] == 1
        assert await cache.resolve(url, "feature") == p.c3
        assert await cache.resolve(url, "refs/heads/feature") == p.c3
        assert await cache.resolve(url, "v1") == p.c1
        assert await cache.resolve(url, "v2") == p.c2  # annotated: peeled to its commit
        assert await cache.resolve(url, "refs/tags/v2") == p.c2
        assert await cache.resolve(url, p.c1) == p.c1
        assert await cache.resolve(url, p.c1.upper()) == p.c1
        assert await cache.resolve(url, p.c3[:10]) == p.c3  # abbreviated, known locally
        assert cache.stats["fetches"] == 1  # all of those came from the one mirror fetch
        assert await cache.resolve(url, "HEAD") == p.c2  # the server's default branch
        assert await cache.resolve(url, "refs/pull/7/head") == p.c4
        assert cache.stats["fetches"] == 3  # HEAD and refs/pull/* are fetched by name
        assert await cache.resolve(url, p.c4) == p.c4  # kept under refs/pull/7/head now
        assert cache.stats["fetches"] == 3

    run(main())


def test_commit_only_reachable_from_other_refs_is_fetched_by_id(tmp_path, project, daemon):
    cache = make_cache(tmp_path / "cache")

    async def main():
        assert await cache.resolve(daemon.url("proj"), "main") == project.c2
        assert await cache.resolve(daemon.url("proj"), project.c4) == project.c4  # by id (protocol v2)
        assert cache.stats["fetches"] == 3  # main, then all branches again, then the id itself
        mirror = next((cache.root / "mirrors").iterdir())
        assert git("--git-dir", str(mirror), "rev-parse", f"refs/hived/commits/{project.c4}") == project.c4

    run(main())


def test_same_repository_spelled_differently_shares_one_mirror(tmp_path, project, daemon):
    cache = make_cache(tmp_path / "cache")

    async def main():
        for url in (daemon.url("proj"), daemon.url("proj") + "/", daemon.url("proj.git"),
                    f"git://127.0.0.1:{daemon.port}//proj"):
            assert await cache.resolve(url, "main") == project.c2
        assert cache.stats["fetches"] == 1
        assert len(list((cache.root / "mirrors").iterdir())) == 1

    run(main())


# ------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("fs_type", ["erofs", "ext4"])
def test_checkout_image_is_the_tree_at_that_commit(tmp_path, project, daemon, fs_type):
    need_root()
    cache = make_cache(tmp_path / "cache", fs_type=fs_type)

    async def main():
        for rev, commit in (("v1", project.c1), ("main", project.c2), ("feature", project.c3)):
            img = await cache.checkout_image(daemon.url("proj"), rev)
            assert img.commit == commit and img.fs_type == fs_type and img.size == img.path.stat().st_size
            assert img.path.name == f"checkout.{fs_type}" and img.path.parent.name == commit
            assert not os.access(img.path, os.W_OK) or (img.path.stat().st_mode & 0o222) == 0
            with mounted(img.path, fs_type, tmp_path / f"mnt-{rev}") as mnt:
                got = tree_listing(mnt)
                got.pop("lost+found", None)
                dot_git = {k: got.pop(k) for k in list(got) if k == ".git" or k.startswith(".git/")}
                want = project.repo.archive_listing(commit)
                assert got == want
                # a depth-1 .git of that commit: git in the build sees the commit and a clean tree
                assert ".git/shallow" in dot_git and ".git/index" in dot_git
                work = tmp_path / f"work-{rev}"
                shutil.copytree(mnt, work, symlinks=True)
                assert git("rev-parse", "HEAD", cwd=work) == commit
                assert git("status", "--porcelain", cwd=work) == ""
                assert git("log", "--format=%H", cwd=work).split() == [commit]
                assert git("cat-file", "-p", "HEAD:README.md", cwd=work) == (work / "README.md").read_text().strip()
                if rev == "v1":
                    assert (mnt / "crlf.txt").read_bytes() == b"line\r\n"  # attributes applied, like a clone
                    assert os.readlink(mnt / "link-to-readme") == "README.md"
                    assert os.access(mnt / "tools/run.sh", os.X_OK)
                    st = os.stat(mnt / "README.md")
                    assert (st.st_uid, st.st_gid) == (1000, 1000)  # the cell's build user owns it
                    assert int(st.st_mtime) == 1_700_000_001  # the commit's time: reproducible
        assert cache.stats["images_built"] == 3

    run(main())


def test_image_is_reproducible_and_content_addressed(tmp_path, project, daemon):
    a, b = make_cache(tmp_path / "a"), make_cache(tmp_path / "b")

    async def main():
        ia = await a.checkout_image(daemon.url("proj"), "main")
        ib = await b.checkout_image(project.repo.url, project.c2)
        assert ia.path.read_bytes() == ib.path.read_bytes()

    run(main())


def test_second_request_is_served_from_cache_with_the_server_gone(tmp_path, project, daemon):
    cache = make_cache(tmp_path / "cache")
    url = daemon.url("proj")

    async def main():
        t0 = time.monotonic()
        first = await cache.checkout_image(url, "main")
        cold = time.monotonic() - t0
        daemon.stop()
        t0 = time.monotonic()
        by_branch = await cache.checkout_image(url, "main")
        by_commit = await cache.checkout_image(url, project.c2)
        warm = (time.monotonic() - t0) / 2
        assert by_branch == first and by_commit == first
        assert cache.stats["fetches"] == 1 and cache.stats["images_built"] == 1
        assert warm < cold
        with pytest.raises(RemoteUnavailable) as e:  # asking to refresh needs the server
            await cache.checkout_image(url, "main", refresh=True)
        assert "connection refused" in one_line(e.value).lower()
        assert await cache.checkout_image(url, "main") == first  # and the cache still serves

    run(main())


def test_refresh_picks_up_a_pushed_commit(tmp_path, project, daemon):
    cache = make_cache(tmp_path / "cache")
    url = daemon.url("proj")

    async def main():
        old = await cache.checkout_image(url, "main")
        new_commit = project.repo.commit({"NEW": "pushed\n"}, "pushed")
        assert (await cache.checkout_image(url, "main")).commit == project.c2  # no refresh: the mirror's
        new = await cache.checkout_image(url, "main", refresh=True)
        assert new.commit == new_commit and new.path != old.path
        assert await cache.resolve(url, "main") == new_commit
        assert old.path.is_file()  # the old commit's image stays (other cells may use it)
        assert await cache.resolve(url, new_commit) == new_commit

    run(main())


def test_bundle_has_the_history_and_clones(tmp_path, project, daemon):
    cache = make_cache(tmp_path / "cache")

    async def main():
        b = await cache.bundle(daemon.url("proj"), "feature")
        assert b.commit == project.c3 and b.size == b.path.stat().st_size
        dest = tmp_path / "clone"
        git("clone", "-q", str(b.path), str(dest))
        assert git("rev-parse", "HEAD", cwd=dest) == project.c3
        assert git("rev-list", "--count", "HEAD", cwd=dest) == "3"
        assert git("fsck", "--strict", cwd=dest) == ""
        assert (dest / "feature.txt").read_text() == "feature\n"
        again = await cache.bundle(daemon.url("proj"), project.c3)
        assert again == b and cache.stats["bundles_built"] == 1

    run(main())


# ------------------------------------------------------------------------------------ bad input


def test_missing_repository_and_revisions_are_precise_errors(tmp_path, project, daemon):
    cache = make_cache(tmp_path / "cache")

    async def main():
        for url in (daemon.url("nope"), f"file://{tmp_path}/nope"):
            with pytest.raises(RepoNotFound) as e:
                await cache.resolve(url, "main")
            assert "no such repository" in one_line(e.value)
        with pytest.raises(RevisionNotFound) as e:
            await cache.checkout_image(daemon.url("proj"), "no-such-branch")
        assert "no-such-branch does not exist" in one_line(e.value)
        with pytest.raises(RevisionNotFound) as e:
            await cache.checkout_image(daemon.url("proj"), "refs/heads/nope")
        assert "refs/heads/nope" in one_line(e.value)
        with pytest.raises(RevisionNotFound) as e:
            await cache.checkout_image(daemon.url("proj"), "f" * 40)
        assert "f" * 40 in one_line(e.value)
        # nothing half-made; the repository that exists works
        assert len(list((cache.root / "mirrors").iterdir())) == 1
        assert [p.name for p in (cache.root / "tmp").iterdir() if not p.name.startswith("del-")] == []
        assert list((cache.root / "images").iterdir()) == []
        assert (await cache.checkout_image(daemon.url("proj"), "main")).commit == project.c2

    run(main())


def test_submodules_and_empty_repositories(tmp_path, srv, daemon):
    """A gitlink becomes an empty directory (submodules are never fetched, whatever .gitmodules
    says); an empty repository has no revisions."""
    need_root()
    marker = tmp_path / "pwned-submodule"
    sub = TestRepo(srv / "sub")
    sub_head = sub.commit({"s": "s\n"}, "sub")
    top = TestRepo(srv / "top")
    top.commit({".gitmodules": f'[submodule "vendor/sub"]\n\tpath = vendor/sub\n\turl = ext::sh -c touch% {marker}\n'},
               "gitmodules")
    git("update-index", "--add", "--cacheinfo", f"160000,{sub_head},vendor/sub", cwd=top.path)
    git("commit", "-q", "-m", "a submodule", cwd=top.path)
    TestRepo(srv / "empty")
    cache = make_cache(tmp_path / "cache")

    async def main():
        img = await cache.checkout_image(daemon.url("top"), "main")
        with mounted(img.path, img.fs_type, tmp_path / "mnt") as mnt:
            assert sorted(os.listdir(mnt)) == [".git", ".gitmodules", "vendor"]
            assert os.listdir(mnt / "vendor" / "sub") == []
        for rev in ("main", "HEAD"):
            with pytest.raises(RevisionNotFound) as e:
                await cache.resolve(daemon.url("empty"), rev)
            one_line(e.value)

    run(main())
    assert not marker.exists()


HOSTILE_URLS = [
    "ext::sh -c touch% {m}",
    "ext::sh -c 'touch {m}'",
    "fd::7",
    "--upload-pack=touch {m}",
    "-u touch {m}",
    "ssh://-oProxyCommand=touch% {m}/x",
    "ssh://-oProxyCommand=touch {m}/x",
    "git@-oProxyCommand=touch:{m}",
    "-oProxyCommand=touch {m}:x",
    "ssh://host/path\n--upload-pack=touch {m}",
    "https://host/x\x00",
    "relative/path",
    "ftp://127.0.0.1/x",
    "file:///x",  # file:// not allowed in this cache
    "https://127.0.0.1/repo.git",  # https not allowed in this cache
    "git://127.0.0.1/-x",
    "ssh://user:pass@host/x",
]


def test_hostile_urls_are_refused_and_nothing_runs(tmp_path):
    cache = make_cache(tmp_path / "cache", protocols=("git", "ssh"))
    marker = tmp_path / "pwned"

    async def main():
        for tmpl in HOSTILE_URLS:
            url = tmpl.format(m=marker)
            with pytest.raises(InvalidUrl) as e:
                await cache.checkout_image(url, "main")
            one_line(e.value)
        for rev in ("--upload-pack=touch /tmp/x", "-x", "main..other", "a b", "HEAD^", "ma:in", "x\n-y",
                    "@{-1}", ".hidden", "x.lock", "refs/heads/", "refs/x"):
            with pytest.raises(InvalidRevision):
                await cache.checkout_image("git://127.0.0.1:9/x", rev)
        assert cache.stats["fetches"] == 0

    run(main())
    assert not marker.exists()


def test_git_itself_refuses_transports_outside_the_allowlist(tmp_path):
    """The second wall: even a URL that got past url.py cannot run ext:: (GIT_ALLOW_PROTOCOL and
    protocol.allow=never), nor read user or system config."""
    cache = make_cache(tmp_path / "cache", protocols=("git",))
    marker = tmp_path / "pwned-ext"
    mirror = tmp_path / "m.git"
    git("init", "-q", "--bare", str(mirror))

    async def main():
        for url in (f"ext::sh -c touch% {marker}", f"file://{tmp_path}/m.git"):
            with pytest.raises(GitFailed) as e:
                await cache.git.run(["fetch", "--", url, "+refs/heads/*:refs/heads/*"], git_dir=mirror, timeout=30)
            assert "not allowed" in e.value.stderr
        env = cache.git.env()
        assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_CONFIG_NOSYSTEM"] == "1"
        assert Path(env["GIT_CONFIG_GLOBAL"]).read_text() == ""
        assert set(env) >= {"PATH", "HOME", "GIT_ALLOW_PROTOCOL"} and "GIT_CONFIG_COUNT" not in env

    run(main())
    assert not marker.exists()


# ------------------------------------------------------------------------------------ faults


def big_project(srv: Path) -> TestRepo:
    r = TestRepo(srv / "big")
    r.commit({"README": "small start\n"}, "small")
    return r


def test_server_dies_mid_fetch(tmp_path, srv, daemon):
    """The daemon is killed (with its upload-pack) after 1 MiB of an 8 MiB pack went out."""
    repo = big_project(srv)
    small = repo.head()
    cache = make_cache(tmp_path / "cache")

    async def main():
        # 1. a first fetch dies: no mirror is left, nothing in tmp
        repo.commit(random_blobs(8 << 20, 16, seed=1), "big")
        with DyingProxy(daemon.port, 1 << 20, on_limit=daemon.stop) as proxy:
            with pytest.raises(RemoteUnavailable) as e:
                await cache.checkout_image(f"git://127.0.0.1:{proxy.port}/big", "main")
            assert proxy.tripped.is_set()
        msg = one_line(e.value)
        assert "git://127.0.0.1" in msg and "server failed or went away" in msg
        assert list((cache.root / "mirrors").iterdir()) == []
        assert [p for p in (cache.root / "tmp").iterdir() if not p.name.startswith("del-")] == []

        # 2. with a mirror in place: a refresh dies mid-fetch; the mirror keeps serving
        daemon.start()
        url = daemon.url("big")
        old = await cache.checkout_image(url, small)
        assert old.commit == small
        newer = repo.commit(random_blobs(8 << 20, 16, seed=2), "bigger")
        with DyingProxy(daemon.port, 1 << 20, on_limit=daemon.stop) as proxy, pytest.raises(RemoteUnavailable):
            await cache.resolve(f"git://127.0.0.1:{proxy.port}/big", "main", refresh=True)
        mirror = next((cache.root / "mirrors").iterdir())
        leftovers = [p.name for p in (mirror / "objects" / "pack").iterdir() if p.name.startswith(("tmp_", ".tmp"))]
        assert leftovers == [] and not (mirror / "hived-fetching").exists()
        assert not list(mirror.rglob("*.lock"))
        assert git("--git-dir", str(mirror), "rev-parse", "refs/heads/main") != newer  # refs did not move
        assert await cache.checkout_image(url, small) == old  # still served, server down
        daemon.start()
        assert await cache.resolve(url, "main", refresh=True) == newer
        img = await cache.checkout_image(url, "main")
        assert img.commit == newer and img.size > 8 << 20  # the 16 files were replaced
        git("--git-dir", str(mirror), "fsck", "--no-progress")

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_cancelled_fetch_leaves_a_usable_mirror(tmp_path, srv, daemon, loop):
    """A hung server, and the build gives up (task cancelled): git is killed, its leftovers
    removed; the next fetch works."""
    repo = big_project(srv)
    cache = make_cache(tmp_path / "cache")

    async def main():
        await cache.resolve(daemon.url("big"), "main")
        newer = repo.commit(random_blobs(4 << 20, 8, seed=3), "big")
        with DyingProxy(daemon.port, 256 << 10, stall=True) as proxy:
            task = asyncio.ensure_future(cache.resolve(f"git://127.0.0.1:{proxy.port}/big", "main", refresh=True))
            for _ in range(500):
                if proxy.tripped.is_set():
                    break
                await asyncio.sleep(0.01)
            assert proxy.tripped.is_set()
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        mirror = next((cache.root / "mirrors").iterdir())
        assert not (mirror / "hived-fetching").exists()
        assert [p for p in (mirror / "objects" / "pack").iterdir() if p.name.startswith("tmp_")] == []
        assert await cache.resolve(daemon.url("big"), "main", refresh=True) == newer

    run_on(loop, main)


def test_hung_server_times_out(tmp_path):
    cache = make_cache(tmp_path / "cache", fetch_timeout_s=1.0)
    silent = SilentServer()
    try:
        async def main():
            t0 = time.monotonic()
            with pytest.raises(RemoteUnavailable) as e:
                await cache.resolve(f"git://127.0.0.1:{silent.port}/x", "main")
            assert time.monotonic() - t0 < 10
            assert "timed out" in one_line(e.value)

        run(main())
    finally:
        silent.close()
    assert list((cache.root / "mirrors").iterdir()) == []


def test_full_cache_disk(tmp_path, srv, daemon, project):
    """The cache on a 6 MiB tmpfs: a repository that does not fit fails with CacheFull, nothing
    partial stays, the repository already there keeps working."""
    need_root()
    repo = big_project(srv)
    repo.commit(random_blobs(8 << 20, 8, seed=4), "big")
    mid = TestRepo(srv / "mid")
    mid.commit(random_blobs(2200 << 10, 4, seed=5), "mid")
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(root)], check=True, input=b"")
    try:
        cache = make_cache(root / "cache", scratch_dir=None)  # checkouts on the full disk too

        async def main():
            ok = await cache.checkout_image(daemon.url("proj"), "main")
            with pytest.raises(CacheFull) as e:
                await cache.checkout_image(daemon.url("big"), "main")
            assert "full" in one_line(e.value)
            assert len(list((cache.root / "mirrors").iterdir())) == 1
            assert [p for p in (cache.root / "tmp").iterdir() if not p.name.startswith("del-")] == []
            assert await cache.checkout_image(daemon.url("proj"), "main") == ok
            assert (await cache.checkout_image(daemon.url("proj"), "feature")).commit == project.c3
            # the mirror fits, the checkout and its image do not: the image step fails cleanly
            with pytest.raises(CacheFull) as e:
                await cache.checkout_image(daemon.url("mid"), "main")
            assert "full" in one_line(e.value)
            assert len(list((cache.root / "mirrors").iterdir())) == 2  # the mid mirror is complete
            assert [p for p in (cache.root / "tmp").iterdir() if not p.name.startswith("del-")] == []
            index = json.loads((cache.root / "index.json").read_text())
            assert set(index["images"]) == {project.c2, project.c3}
            assert await cache.resolve(daemon.url("mid"), "main") == mid.head()

        run(main())
        RepoCache(root / "cache", protocols=ALLOW)  # a restart finds a consistent cache
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, input=b"")


# ------------------------------------------------------------------------------------ credentials


def test_credentials_travel_in_the_environment_only(tmp_path, srv, project):
    secret = "s3cr3t-t0ken-for-the-test"
    with GitHttp(srv, "builder", secret) as server:
        cache = make_cache(tmp_path / "cache")
        url = server.url("proj")
        good = Credentials("builder", secret)

        async def main():
            with pytest.raises(AuthError) as e:
                await cache.resolve(url, "main")
            assert "access denied" in one_line(e.value)
            with pytest.raises(AuthError):
                await cache.resolve(url, "main", Credentials("builder", "wrong"))
            with CmdlineWatch([secret, good.header().split()[-1]]) as watch:
                img = await cache.checkout_image(url, "main", good)
                b = await cache.bundle(url, "v1", good)
            assert img.commit == project.c2 and b.commit == project.c1
            assert watch.scans > 0 and watch.git_seen > 0
            assert watch.hits == []
            assert good.header() in [f"Authorization: {a}" for a in server.auth_seen]
            assert files_containing(cache.root, [secret, good.header().split()[-1]]) == []
            assert "builder" not in (cache.root / "index.json").read_text()

            # cached now; still, whoever asks must show credentials the server accepts
            checks = cache.stats["access_checks"]
            assert await cache.checkout_image(url, "main", good) == img  # remembered: no new check
            assert cache.stats["access_checks"] == checks
            with pytest.raises(AuthError):
                await cache.checkout_image(url, "main")
            with pytest.raises(AuthError):
                await cache.checkout_image(url, project.c2, Credentials("builder", "wrong"))
            # credentials in the URL are moved out of it (and out of argv)
            with CmdlineWatch([secret]) as watch:
                img2 = await cache.checkout_image(server.url("proj", f"builder:{secret}"), "main", refresh=True)
            assert img2 == img and watch.hits == []

        run(main())


# ------------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_concurrent_requests_do_the_work_once(tmp_path, project, daemon, loop):
    cache = make_cache(tmp_path / "cache")
    url = daemon.url("proj")

    async def main():
        imgs = await asyncio.gather(*(cache.checkout_image(url, "main") for _ in range(6)),
                                    *(cache.checkout_image(url, project.c2) for _ in range(2)))
        assert len({i.path for i in imgs}) == 1
        assert cache.stats["fetches"] == 1 and cache.stats["images_built"] == 1
        # refreshes asked at the same time share one fetch
        before = cache.stats["fetches"]
        await asyncio.gather(*(cache.resolve(url, "main", refresh=True) for _ in range(4)))
        assert cache.stats["fetches"] - before == 1
        # different commits of one repository build in parallel, one fetch
        res = await asyncio.gather(cache.checkout_image(url, "v1"), cache.checkout_image(url, "feature"))
        assert [r.commit for r in res] == [project.c1, project.c3]

    run_on(loop, main)


CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from hived.repos import RepoCache
    c = RepoCache(sys.argv[1], protocols=("git",))
    c.min_free_bytes = 0
    img = asyncio.run(c.checkout_image(sys.argv[2], "main"))
    print(json.dumps({"commit": img.commit, "path": str(img.path), "stats": dict(c.stats)}))
""")


def test_two_processes_share_one_cache(tmp_path, project, daemon):
    root = tmp_path / "cache"
    make_cache(root)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), daemon.url("proj")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        outs.append(json.loads(out))
    assert {o["commit"] for o in outs} == {project.c2} and len({o["path"] for o in outs}) == 1
    assert sum(o["stats"].get("fetches", 0) for o in outs) >= 1
    assert len(list((root / "mirrors").iterdir())) == 1 and len(list((root / "images").iterdir())) == 1
    git("--git-dir", str(next((root / "mirrors").iterdir())), "fsck", "--no-progress")


# ------------------------------------------------------------------------------------ bound, leases, restart


def test_lru_eviction_respects_the_bound_and_leases(tmp_path, srv, daemon):
    repos = {}
    for name in ("r1", "r2", "r3", "r4"):
        r = TestRepo(srv / name)
        r.commit(random_blobs(300 << 10, 3, seed=hash(name) & 0xFFFF), name)
        repos[name] = r
    probe = make_cache(tmp_path / "probe")

    async def sizes():
        img = await probe.checkout_image(daemon.url("r1"), "main")
        return probe.usage(), img.size

    per_repo, _ = run(sizes())  # mirror + image of one repository
    bound = int(per_repo * 2.5)
    cache = make_cache(tmp_path / "cache", max_bytes=bound)

    async def main():
        leased = await cache.checkout_image(daemon.url("r1"), "main", acquire=True)
        for name in ("r2", "r3", "r4"):
            await cache.checkout_image(daemon.url(name), "main")
            assert cache.usage() <= bound or leased.path.exists()
        index = json.loads((cache.root / "index.json").read_text())
        assert leased.commit in index["images"] and leased.path.is_file()  # leased: kept though oldest
        assert repos["r4"].head() in index["images"]  # newest: kept
        assert repos["r2"].head() not in index["images"]  # least recently used and free: gone
        assert cache.usage() <= bound
        with pytest.raises(InUse):
            cache.remove(leased.commit)
        cache.release(leased.path)
        cache.remove(leased.commit)
        assert not leased.path.exists()
        # the image outlives its mirror: served by commit without the server
        r4 = repos["r4"].head()
        cache.remove(daemon.url("r4"), kind="mirror")
        daemon.stop()
        assert (await cache.checkout_image(daemon.url("r4"), r4)).commit == r4
        with pytest.raises(RemoteUnavailable):  # by branch it needs the mirror, hence the server
            await cache.checkout_image(daemon.url("r4"), "main")

    run(main())


def test_restart_keeps_the_index(tmp_path, project, daemon):
    root = tmp_path / "cache"
    url = daemon.url("proj")

    async def first():
        c = make_cache(root)
        return await c.checkout_image(url, "main"), await c.bundle(url, "v1")

    img, b = run(first())
    (root / "tmp" / "image-999999-dead").mkdir()  # a crashed build's leftovers
    (root / "images" / ("0" * 40)).mkdir()  # a half-installed image without meta.json
    daemon.stop()

    async def second():
        c = make_cache(root)
        assert await c.checkout_image(url, "main") == img
        assert await c.checkout_image(url, project.c2) == img
        assert await c.bundle(url, "v1") == b
        assert c.stats["fetches"] == 0 and c.stats["images_built"] == 0
        return c

    run(second())
    assert not (root / "tmp" / "image-999999-dead").exists()
    assert not (root / "images" / ("0" * 40)).exists()
    (root / "index.json").write_text("{not json")  # a broken index is rebuilt from the directories
    c = run(second())
    assert set(c.list()["images"][0]) >= {"name", "size", "repos", "last_used"}


def test_errors_are_repo_errors_with_one_line(tmp_path):
    cache = make_cache(tmp_path / "cache")

    async def main():
        for url, rev in (("git://127.0.0.1:1/x", "main"), ("nope", "main"), ("git://h/x", "-x")):
            with pytest.raises(RepoError) as e:
                await cache.resolve(url, rev)
            assert "; " in one_line(e.value)

    run(main())


def test_url_parsing_keys():
    a, _ = parse_url("git://127.0.0.1:9418/proj.git", ("git",))
    b, _ = parse_url("git://127.0.0.1/proj/", ("git",))
    assert a.key == b.key


def test_operator_cli(tmp_path, project):
    root = tmp_path / "cache"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hived", "repo", *args, "--cache-dir", str(root),
                               "--allow-protocol", "file"], capture_output=True, text=True, timeout=120, input="")

    p = cli("get", project.repo.url, "v2", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["commit"] == project.c2
    p = cli("ls", "--json")
    assert [e["name"] for e in json.loads(p.stdout)["images"]] == [project.c2]
    p = cli("get", project.repo.url, "nope")
    assert p.returncode == 1 and p.stderr.startswith("hived repo: ") and p.stderr.count("\n") == 1
    assert cli("rm", project.c2).returncode == 0
    assert cli("rm", "--mirror", project.repo.url).returncode == 0
    assert json.loads(cli("ls", "--json").stdout)["bytes"] == 0


def test_scratch_checkouts_and_their_fallback(tmp_path, project, daemon):
    """Checkouts go to the scratch dir when they fit (and leave nothing there), else to the
    cache's own tmp/; a dead process's scratch trees are removed at start."""
    need_root()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "hived-tree-999999-dead").mkdir()  # a crashed build's (pid 999999 is not running)
    cache = make_cache(tmp_path / "cache", scratch_dir=scratch)
    assert not (scratch / "hived-tree-999999-dead").exists()

    async def main():
        img = await cache.checkout_image(daemon.url("proj"), "main")
        assert cache.stats["scratch_checkouts"] == 1 and list(scratch.iterdir()) == []
        small = tmp_path / "small"
        small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True, input=b"")
        try:
            c2 = make_cache(tmp_path / "cache2", scratch_dir=small)
            assert await c2.checkout_image(daemon.url("proj"), "main") == CheckoutImage(
                project.c2, c2.root / "images" / project.c2 / img.path.name, img.size, img.fs_type, img.tree)
            assert c2.stats["scratch_checkouts"] == 0  # 1 MiB free: not enough headroom, the disk it is
            assert img.path.read_bytes() == (c2.root / "images" / project.c2 / img.path.name).read_bytes()
        finally:
            subprocess.run(["umount", "-l", str(small)], check=False, input=b"")

    run(main())

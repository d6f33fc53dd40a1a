"""Benchmark of the repository cache: a ~20 MB repository served by `git daemon` on 127.0.0.1.

One run measures, on a fresh cache:
* clone_cold_ms: first checkout image of the repository (mirror fetch + checkout + mkfs);
  with the defaults (the checkout is written to /dev/shm when that is a tmpfs: `scratch_dir`);
* clone_cold_disk_ms: the same with the checkout written to the cache disk (scratch_dir=None);
* clone_warm_ms: the same branch again (median of several; the mirror answers locally, the
  image is a cache hit), and clone_warm_commit_ms (by commit id: no git process at all);
* bundle_cold_ms (fetch + bundle, on another fresh cache), bundle_ms (bundle from a present
  mirror), bundle_warm_ms, and what the cell would pay to use a bundle: bundle_clone_ms
  (`git clone` of it, measured on the host; a TCG guest is several times slower), against
  image_read_ms (mount the image read-only and read every file, root only; page cache warm, as
  on a box that just made the image).

`hived bench repos [--json] [--size-mb 20]`; `run(args)` returns the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hived.bench.common import BenchError
from hived.repos.cache import RepoCache

WORDS = ("int", "return", "static", "const", "void", "struct", "if", "else", "for", "while", "self", "def",
         "import", "from", "class", "async", "await", "value", "buffer", "length", "error", "result", "config",
         "parse", "write", "read", "open", "close", "index", "count", "name", "path", "node", "list", "map")




def _env(home: Path) -> dict:
    (home / "empty.gitconfig").touch()
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(home / "empty.gitconfig")}


def make_repo(path: Path, size_mb: float, env: dict, seed: int = 7) -> dict:
    """A source-like repository via git fast-import (one pack, deltas as fast-import makes
    them): ~70% of the packed size incompressible assets, the rest text files changed over
    60 commits."""
    rnd = random.Random(seed)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], env=env, check=True, input=b"")
    target = int(size_mb * (1 << 20))
    assets = int(target * 0.7)
    n_text = 1500
    text_size = 6000

    def text() -> bytes:
        out, n = [], 0
        while n < text_size:
            line = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))) + f" {rnd.randint(0, 99999)};\n"
            out.append(line)
            n += len(line)
        return "".join(out).encode()

    stream = bytearray()
    mark = 0

    def blob(data: bytes) -> int:
        nonlocal mark
        mark += 1
        stream.extend(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
        stream.extend(data)
        stream.extend(b"\n")
        return mark

    files: dict[str, int] = {}
    for i in range(n_text):
        files[f"src/mod{i % 40:02d}/file{i:04d}.c"] = blob(text())
    for i in range(24):
        files[f"assets/asset{i:02d}.bin"] = blob(rnd.randbytes(assets // 24))
    prev = None
    commits = 60
    for c in range(commits):
        if c:
            for _ in range(25):
                name = f"src/mod{rnd.randrange(40):02d}/file{rnd.randrange(n_text):04d}.c"
                files[name] = blob(text())
        mark += 1
        msg = f"commit {c}\n".encode()
        stream.extend(b"commit refs/heads/main\nmark :%d\ncommitter Bench <b@example.invalid> %d +0000\n"
                      b"data %d\n%s" % (mark, 1_700_000_000 + c * 60, len(msg), msg))
        if prev:
            stream.extend(b"from :%d\n" % prev)
        changed = files.items() if c == 0 else list(files.items())[-25:]
        for name, m in changed:
            stream.extend(b"M 100644 :%d %s\n" % (m, name.encode()))
        stream.extend(b"\n")
        prev = mark
    subprocess.run(["git", f"--git-dir={path}", "fast-import", "--quiet"], input=bytes(stream), env=env, check=True)
    pack = sum(p.stat().st_size for p in (path / "objects" / "pack").glob("*.pack"))
    return {"pack_bytes": pack, "commits": commits, "files": n_text + 24}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Daemon:
    def __init__(self, base: Path, env: dict):
        self.port = _free_port()
        log = open(base.parent / "git-daemon.log", "ab")  # noqa: SIM115 (the child has it)
        with log:
            self.proc = subprocess.Popen(
                ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all", f"--port={self.port}",
                 "--listen=127.0.0.1", str(base)], env=env, stdin=subprocess.PIPE, stdout=log, stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchError("git daemon did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


def _read_all(root: Path) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    n += len(fh.read())
    return n


async def _measure(work: Path, url: str, warm_runs: int) -> dict:
    r: dict = {}
    cache = RepoCache(work / "cache", 4 << 30, protocols=("git",))  # the defaults: scratch on /dev/shm
    cache.min_free_bytes = 0
    t0 = time.monotonic()
    img = await cache.checkout_image(url, "main")
    r["clone_cold_ms"] = _ms(t0)
    r["clone_cold_fetch_ms"] = round(cache.timings["fetch_ms"], 1)
    r["clone_cold_checkout_ms"] = round(cache.timings["checkout_ms"], 1)
    r["clone_cold_mkfs_ms"] = round(cache.timings["mkfs_ms"], 1)
    r["clone_cold_scratch"] = str(cache.scratch_dir or "")
    warm, warm_commit = [], []
    for _ in range(warm_runs):
        t0 = time.monotonic()
        again = await cache.checkout_image(url, "main")
        warm.append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        await cache.checkout_image(url, img.commit)
        warm_commit.append((time.monotonic() - t0) * 1000)
        assert again == img
    r["clone_warm_ms"] = round(statistics.median(warm), 2)
    r["clone_warm_commit_ms"] = round(statistics.median(warm_commit), 2)
    r["clone_warm_runs"] = warm_runs
    r["image_fs"] = img.fs_type
    r["image_bytes"] = img.size
    r["mirror_bytes"] = cache.list()["mirrors"][0]["size"]

    t0 = time.monotonic()
    b = await cache.bundle(url, "main")
    r["bundle_ms"] = _ms(t0)  # the mirror is there: pack-objects only
    t0 = time.monotonic()
    await cache.bundle(url, "main")
    r["bundle_warm_ms"] = _ms(t0)
    r["bundle_bytes"] = b.size

    fresh = RepoCache(work / "cache2", 4 << 30, protocols=("git",), scratch_dir=None)
    fresh.min_free_bytes = 0
    t0 = time.monotonic()
    await fresh.bundle(url, "main")
    r["bundle_cold_ms"] = _ms(t0)

    disk = RepoCache(work / "cache3", 4 << 30, protocols=("git",), scratch_dir=None)  # all on the cache disk
    disk.min_free_bytes = 0
    t0 = time.monotonic()
    await disk.checkout_image(url, "main")
    r["clone_cold_disk_ms"] = _ms(t0)
    r["clone_cold_disk_checkout_ms"] = round(disk.timings["checkout_ms"], 1)
    disk.close()

    env = _env(work)
    dest = work / "clone"
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(b.path), str(dest)], env=env, check=True, capture_output=True, input=b"")
    r["bundle_clone_ms"] = _ms(t0)  # what a cell would pay to get a work tree out of the bundle
    r["tree_bytes"] = _read_all(dest) - _read_all(dest / ".git")
    if os.geteuid() == 0:
        mnt = work / "mnt"
        mnt.mkdir()
        t0 = time.monotonic()
        subprocess.run(["mount", "-o", "loop,ro", "-t", img.fs_type, str(img.path), str(mnt)], check=True,
                       capture_output=True, input=b"")
        try:
            r["image_mount_ms"] = _ms(t0)
            _read_all(mnt)
            r["image_read_ms"] = _ms(t0)  # mount + read every file
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True, input=b"")
    cache.close()
    fresh.close()
    return r


def run(args: argparse.Namespace) -> dict:
    for tool in ("git", "mkfs.erofs"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    work = Path(tempfile.mkdtemp(prefix="hived-bench-repos-"))
    daemon = None
    try:
        base = work / "srv"
        base.mkdir()
        env = _env(work)
        t0 = time.monotonic()
        info = make_repo(base / "bench.git", args.size_mb, env)
        report: dict = {"repo": {**info, "size_mb": args.size_mb, "make_ms": _ms(t0)}}
        daemon = _Daemon(base, env)
        report.update(asyncio.run(_measure(work, f"git://127.0.0.1:{daemon.port}/bench.git", args.warm_runs)))
        report["machine"] = {"nproc": os.cpu_count(), "git": subprocess.run(
            ["git", "--version"], capture_output=True, text=True, check=False, input="").stdout.strip()}
        return report
    finally:
        if daemon is not None:
            daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def render(r: dict) -> str:
    return "\n".join([
        f"repository: {r['repo']['pack_bytes'] / 1e6:.1f} MB packed, {r['repo']['files']} files, "
        f"{r['repo']['commits']} commits; checkout {r['tree_bytes'] / 1e6:.1f} MB",
        f"clone cold: {r['clone_cold_ms']:.0f} ms (fetch {r['clone_cold_fetch_ms']:.0f}, checkout "
        f"{r['clone_cold_checkout_ms']:.0f}, mkfs.{r['image_fs']} {r['clone_cold_mkfs_ms']:.0f}); "
        f"image {r['image_bytes'] / 1e6:.1f} MB",
        f"clone cold, checkout on the cache disk: {r['clone_cold_disk_ms']:.0f} ms "
        f"(checkout {r['clone_cold_disk_checkout_ms']:.0f})",
        f"clone warm: {r['clone_warm_ms']:.1f} ms by branch, {r['clone_warm_commit_ms']:.1f} ms by commit "
        f"(median of {r['clone_warm_runs']})",
        f"bundle: cold {r['bundle_cold_ms']:.0f} ms, from the mirror {r['bundle_ms']:.0f} ms, warm "
        f"{r['bundle_warm_ms']:.1f} ms, {r['bundle_bytes'] / 1e6:.1f} MB; "
        f"git clone of it {r['bundle_clone_ms']:.0f} ms",
        (f"image in the consumer: mount {r['image_mount_ms']:.0f} ms, mount + read all {r['image_read_ms']:.0f} ms"
         if "image_read_ms" in r else "image read: needs root"),
    ])


def parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--size-mb", type=float, default=20.0, help="packed size of the test repository (default 20)")
    p.add_argument("--warm-runs", type=int, default=15, help="warm requests to take the median of (default 15)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (printed on stderr)")
    return p



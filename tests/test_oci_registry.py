"""Build images against a real registry (Debian's docker-registry on 127.0.0.1): pull,
convert to erofs, serve from cache, and every fault the issue names.

Each test starts its own registry (and token service) in its own temp dir and stops it in
a finally; mounts are always unmounted. Timings are printed (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_oci_support import (
    Layer,
    Registry,
    TokenServer,
    make_image,
    make_index,
    mounted,
    need_registry,
    push,
    running_registry,
    tree_files,
)

from hived.cli import image as cli
from hived.oci.cache import ImageCache
from hived.oci.errors import AuthError, CacheError, DigestMismatch, InUse, NotFound, RegistryUnavailable
from hived.oci.registry import Credentials

pytestmark = pytest.mark.root


@pytest.fixture
def work(tmp_path):
    need_registry()
    yield tmp_path


def run(coro):
    return asyncio.run(coro)


def assert_empty_cache(root: Path) -> None:
    """No image, no blob, no temp dir: what a failed pull must leave."""
    assert tree_files(root / "images") == []
    assert tree_files(root / "blobs/sha256") == []
    assert tree_files(root / "tmp") == []
    index = json.loads((root / "index.json").read_text())
    assert index["images"] == {} and index["refs"] == {}


# ---------------------------------------------------------------------------------------- images

BIG_FILES = 300  # x 64 KiB of random data: ~20 MB that does not compress
BIG_SIZE = 64 << 10


def build_image_layers(seed: bytes = b"") -> tuple[list[bytes], dict[str, bytes]]:
    """Three layers, ~28 MB compressed: a base, links, then whiteouts. Returns (tars, files
    that must be in the final tree with their content)."""
    expect = {}
    base = Layer().dir("usr").dir("usr/share").dir("usr/share/data").dir("etc").dir("opt").dir("opt/old")
    for i in range(BIG_FILES):
        data = os.urandom(BIG_SIZE)
        base.file(f"usr/share/data/f{i:03d}", data)
        expect[f"usr/share/data/f{i:03d}"] = data
    base.file("etc/os-release", b"ID=hived-test\n" + seed).file("etc/doomed", b"goes away")
    base.file("opt/old/a", b"old").dir("opt/old/sub").file("opt/old/sub/b", b"old too")
    base.dir("home").dir("home/build", mode=0o750, uid=1000, gid=1000)
    base.file("home/build/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1000, xattrs={"user.hived": "x"})
    base.file("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755)
    expect["etc/os-release"] = b"ID=hived-test\n" + seed
    expect["home/build/.profile"] = b"export A=1\n"
    big = os.urandom(8 << 20)
    links = (Layer().dir("usr/bin").file("usr/bin/tool", big, mode=0o755).hardlink("usr/bin/tool-hardlink",
                                                                                   "usr/bin/tool")
             .symlink("usr/bin/tool-symlink", "tool").symlink("bin", "usr/bin").file("etc/doomed2", b"x"))
    expect["usr/bin/tool"] = big
    top = (Layer().whiteout("etc/doomed").whiteout("etc/doomed2").opaque("opt/old").file("opt/old/new", b"new")
           .file("etc/added", b"top layer\n"))
    expect["opt/old/new"] = b"new"
    expect["etc/added"] = b"top layer\n"
    return [base.bytes(), links.bytes(), top.bytes()], expect


@pytest.fixture(scope="module")
def big_image():
    layers, expect = build_image_layers()
    return make_image(layers), expect


def small_image(tag: str, size: int = 1 << 20):
    return make_image([Layer().file("payload", os.urandom(size)).file("name", tag.encode()).bytes()])


# ---------------------------------------------------------------------------------------- tests


def test_pull_convert_mount_and_warm_from_cache(work, big_image):
    image, expect = big_image
    root = work / "cache"
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/team/build:1"
        run(push(ref, image))
        cache = ImageCache(root)
        t0 = time.monotonic()
        img = run(cache.pull(ref))
        cold_ms = (time.monotonic() - t0) * 1000
        assert img.digest == image.digest
        assert img.fs_type == "erofs" and img.path.name == "rootfs.erofs" and img.size == img.path.stat().st_size
        assert img.config.entrypoint == ["/bin/sh", "-c"] and img.config.cmd == ["make"]
        assert img.config.env == ["PATH=/usr/bin:/bin", "A=1"]
        assert (img.config.workdir, img.config.user) == ("/src", "1000:1000")
        assert ref in img.refs
        reg.stop()  # from here on the registry is gone: the cache must serve the image by itself
        t0 = time.monotonic()
        again = run(cache.pull(ref))
        warm_ms = (time.monotonic() - t0) * 1000
        assert again.digest == img.digest and again.path == img.path
        by_digest = run(ImageCache(root).pull(f"{reg.host}/team/build@{image.digest}"))
        assert by_digest.digest == img.digest
    size_mb = sum(len(b) for b in image.blobs.values()) / 1e6
    print(f"\nimage_cold_ms={cold_ms:.0f} image_warm_ms={warm_ms:.1f} (image {size_mb:.1f} MB compressed, "
          f"rootfs.erofs {img.size / 1e6:.1f} MB)")
    with mounted(img.path, "erofs", work) as mnt:
        for rel, data in expect.items():
            assert (mnt / rel).read_bytes() == data, rel
        assert not (mnt / "etc/doomed").exists() and not (mnt / "etc/doomed2").exists()
        assert sorted(os.listdir(mnt / "opt/old")) == ["new"]  # opaque: the lower a, sub/ are hidden
        assert os.readlink(mnt / "usr/bin/tool-symlink") == "tool"
        assert os.readlink(mnt / "bin") == "usr/bin"
        t, h = os.lstat(mnt / "usr/bin/tool"), os.lstat(mnt / "usr/bin/tool-hardlink")
        assert t.st_ino == h.st_ino and t.st_nlink == 2 and t.st_mode & 0o777 == 0o755
        home = os.lstat(mnt / "home/build")
        assert (home.st_uid, home.st_gid, home.st_mode & 0o777) == (1000, 1000, 0o750)
        prof = os.lstat(mnt / "home/build/.profile")
        assert (prof.st_uid, prof.st_mode & 0o777) == (1000, 0o600)
        assert os.getxattr(mnt / "home/build/.profile", "user.hived") == b"x"
        assert os.lstat(mnt / "usr/bin/suid").st_mode & 0o7777 == 0o4755
        assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(mnt) for n in ds + fs)
        with pytest.raises(OSError):
            (mnt / "etc/new").write_text("read-only")


def test_index_picks_linux_amd64_and_zstd_layers(work):
    amd = make_image([Layer().file("arch", b"amd64").bytes()], compress="zstd")
    arm = make_image([Layer().file("arch", b"arm64").bytes()], arch="arm64")
    index = make_index({"linux/arm64": arm, "linux/amd64": amd})
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/multi:latest"
        run(push(ref, index))
        cache = ImageCache(work / "cache")
        img = run(cache.pull(ref))
        assert img.digest == amd.digest
        reg.stop()
        # the index digest finds the same image without the registry
        assert run(cache.pull(f"{reg.host}/multi@{index.digest}")).digest == amd.digest
        only_arm = make_index({"linux/arm64": arm})
        reg.start()
        run(push(f"{reg.host}/armonly:1", only_arm))
        with pytest.raises(Exception, match="no linux/amd64 image .*linux/arm64"):
            run(cache.pull(f"{reg.host}/armonly:1"))


def test_digest_mismatch_keeps_nothing(work, big_image):
    image, _ = big_image
    root = work / "cache"
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/team/corrupt:1"
        run(push(ref, image))
        blob = reg.blob_file(image.layer_digests[1])
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, other content: only the digest can tell
        blob.write_bytes(bytes(data))
        cache = ImageCache(root)
        with pytest.raises(DigestMismatch) as e:
            run(cache.pull(ref))
        assert image.layer_digests[1] in str(e.value) and "re-push" in str(e.value)
        assert_empty_cache(root)
        assert cache.list() == []


def test_missing_image_is_a_clear_error(work):
    root = work / "cache"
    with running_registry(work / "reg") as reg:
        run(push(f"{reg.host}/exists:1", small_image("x", 1000)))
        cache = ImageCache(root)
        with pytest.raises(NotFound, match="exists:2 not found .*MANIFEST_UNKNOWN"):
            run(cache.pull(f"{reg.host}/exists:2"))
        with pytest.raises(NotFound, match="nope:1 not found .*(NAME_UNKNOWN|MANIFEST_UNKNOWN)"):
            run(cache.pull(f"{reg.host}/nope:1"))
        assert_empty_cache(root)
    with pytest.raises(RegistryUnavailable, match="cannot connect to 127.0.0.1"):
        run(cache.pull(f"{reg.host}/exists:1"))  # registry stopped, nothing cached


def test_basic_auth(work):
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd not installed (Debian package apache2-utils)")
    root = work / "cache"
    with running_registry(work / "reg", users={"alice": "s3cret"}) as reg:
        ref = f"{reg.host}/private/img:1"
        good = Credentials("alice", "s3cret")
        run(push(ref, small_image("private", 1000), good))
        cache = ImageCache(root)
        with pytest.raises(AuthError, match="requires credentials"):
            run(cache.pull(ref))
        with pytest.raises(AuthError, match="rejected the credentials of 'alice'") as e:
            run(cache.pull(ref, Credentials("alice", "wrong")))
        assert "s3cret" not in str(e.value) and "wrong" not in str(e.value)
        assert_empty_cache(root)
        assert run(cache.pull(ref, good)).refs == (ref,)


def test_bearer_token_auth(work):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (Debian package openssl)")
    root = work / "cache"
    with TokenServer(work, {"bob": "hunter2"}) as tokens, \
            running_registry(work / "reg", token_auth=tokens) as reg:
        ref = f"{reg.host}/team/tok:1"
        good = Credentials("bob", "hunter2")
        run(push(ref, small_image("token", 1000), good))
        cache = ImageCache(root)
        with pytest.raises(AuthError, match="token service wants credentials"):
            run(cache.pull(ref))
        with pytest.raises(AuthError, match="rejected the credentials of 'bob'"):
            run(cache.pull(ref, Credentials("bob", "nope")))
        assert_empty_cache(root)
        img = run(cache.pull(ref, good))
        assert img.refs == (ref,)
        pulls = [r for r in tokens.requests if r["user"] == "bob" and r["scope"] == ["repository:team/tok:pull"]]
        assert pulls and pulls[-1]["service"] == [tokens.service]


def test_registry_killed_mid_pull(work, big_image):
    image, _ = big_image
    root = work / "cache"
    reg = Registry(work / "reg")
    try:
        reg.start()
        ref = f"{reg.host}/team/dies:1"
        run(push(ref, image))
        cache = ImageCache(root)
        seen = []

        def progress(stage, info):
            if stage == "blob" and not seen:
                seen.append(info)
                reg.kill()  # SIGKILL while the first blob is streaming

        with pytest.raises(RegistryUnavailable) as e:
            run(cache.pull(ref, progress=progress))
        assert seen
        assert "lost while downloading" in str(e.value) or "cannot connect" in str(e.value)
        assert_empty_cache(root)
        reg.start()  # same storage, same port
        img = run(cache.pull(ref))
        assert img.digest == image.digest and img.path.is_file()
    finally:
        reg.stop()


CRASH_SCRIPT = """
import asyncio, os, signal, sys
from hived.oci.cache import ImageCache
def progress(stage, info):
    if stage == "blob" and info["done"] > (1 << 20):
        os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(ImageCache(sys.argv[1]).pull(sys.argv[2], progress=progress))
"""


def test_crash_mid_pull_leaves_only_temp_that_next_start_removes(work, big_image):
    image, _ = big_image
    root = work / "cache"
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/team/crash:1"
        run(push(ref, image))
        p = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), ref], capture_output=True, timeout=120)
        assert p.returncode == -signal.SIGKILL, p.stderr.decode()
        leftovers = tree_files(root / "tmp")
        assert leftovers and all(x.startswith("pull-") for x in leftovers)  # only temp
        assert tree_files(root / "images") == [] and tree_files(root / "blobs/sha256") == []
        cache = ImageCache(root)  # the next start
        assert tree_files(root / "tmp") == []
        assert cache.list() == []
        assert run(cache.pull(ref)).digest == image.digest


def test_lru_eviction_respects_bound_and_leases(work):
    root = work / "cache"
    mb = 1 << 20
    images = {t: small_image(t, mb) for t in "abcd"}
    with running_registry(work / "reg") as reg:
        refs = {t: f"{reg.host}/lru:{t}" for t in images}
        for t, img in images.items():
            run(push(refs[t], img))
        # each image: ~1 MB blob + ~1 MB erofs; room for two, not three
        cache = ImageCache(root, max_bytes=5 * mb)
        run(cache.pull(refs["a"]))
        path_a = cache.acquire(refs["a"])
        run(cache.pull(refs["b"]))
        time.sleep(0.01)
        run(cache.pull(refs["b"]))  # b is used after a: a is the least recently used, but leased
        run(cache.pull(refs["c"]))
        have = {i.refs[0].rsplit(":", 1)[1] for i in cache.list()}
        assert have == {"a", "c"}, have  # b evicted, never the leased a
        assert cache.usage() <= cache.max_bytes
        assert path_a.is_file()
        other = ImageCache(root)  # another process's view: the lease is visible through flock
        assert {i.digest: i.in_use for i in other.list()}[images["a"].digest] is True
        with pytest.raises(InUse):
            other.remove(images["a"].digest)
        cache.release(path_a)
        run(cache.pull(refs["d"]))
        have = {i.refs[0].rsplit(":", 1)[1] for i in cache.list()}
        assert have == {"c", "d"}, have
        assert cache.usage() <= cache.max_bytes
        assert not path_a.exists()
        blobs = set(os.listdir(root / "blobs/sha256"))
        assert blobs == {d.split(":")[1] for t in "cd" for d in images[t].layer_digests}


def test_restart_keeps_index_and_bound(work):
    root = work / "cache"
    img = small_image("restart", 1000)
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/keep:1"
        run(push(ref, img))
        first = run(ImageCache(root, max_bytes=123 << 20).pull(ref))
    again = ImageCache(root)  # a new daemon on the same directory, registry gone
    assert again.max_bytes == 123 << 20
    [listed] = again.list()
    assert listed.digest == first.digest and listed.refs == (ref,) and listed.config == first.config
    assert run(again.pull(ref)).path == first.path
    # a crash between the rename into images/ and the index write: the image is adopted
    index = json.loads((root / "index.json").read_text())
    index["images"], index["refs"] = {}, {}
    (root / "index.json").write_text(json.dumps(index))
    assert [i.digest for i in ImageCache(root).list()] == [first.digest]
    (root / "index.json").write_text("")  # a power cut after a rename that was not fsync'ed
    assert [(i.digest, i.refs) for i in ImageCache(root).list()] == [(first.digest, (ref,))]
    assert ImageCache(root).remove(ref) == [first.digest]
    assert ImageCache(root).list() == [] and tree_files(root / "images") == []


def test_concurrent_pulls_share_one_download(work):
    img = small_image("shared", 2 << 20)
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/shared:1"
        run(push(ref, img))
        cache = ImageCache(work / "cache")
        blob_fetches = []

        async def both():
            def progress(stage, info):
                if stage == "blob-done":
                    blob_fetches.append(info["digest"])

            return await asyncio.gather(cache.pull(ref, progress=progress), cache.pull(ref, progress=progress))

        a, b = run(both())
        assert a.digest == b.digest == img.digest
        assert blob_fetches == img.layer_digests


def test_full_cache_disk(work, big_image):
    """A tiny tmpfs as the cache disk: refused before download when the layers cannot fit,
    a clean error (and nothing left) when unpacking runs out of space."""
    disk = work / "disk"
    disk.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {p.stderr.strip()}")
    try:
        root = disk / "cache"
        zeros = make_image([Layer().file("zeros", bytes(24 << 20)).bytes()])  # 24 MB unpacked, ~24 KB packed
        with running_registry(work / "reg") as reg:
            run(push(f"{reg.host}/big:1", big_image[0]))
            run(push(f"{reg.host}/zeros:1", zeros))
            cache = ImageCache(root)
            with pytest.raises(CacheError, match="MiB free under"):
                run(cache.pull(f"{reg.host}/big:1"))
            cache.min_free_bytes = 1 << 20
            with pytest.raises(CacheError, match="disk full under") as e:
                run(cache.pull(f"{reg.host}/zeros:1"))
            assert "nothing partial was kept" in str(e.value)
            assert_empty_cache(root)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_ext4_fallback(work):
    img = make_image([Layer().dir("etc").file("etc/hello", b"ext4\n", uid=1000).symlink("l", "etc/hello").bytes()])
    with running_registry(work / "reg") as reg:
        ref = f"{reg.host}/ext:1"
        run(push(ref, img))
        got = run(ImageCache(work / "cache", fs_type="ext4").pull(ref))
    assert got.fs_type == "ext4" and got.path.name == "rootfs.ext4"
    with mounted(got.path, "ext4", work) as mnt:
        assert (mnt / "etc/hello").read_bytes() == b"ext4\n"
        assert os.lstat(mnt / "etc/hello").st_uid == 1000
        assert os.readlink(mnt / "l") == "etc/hello"


def test_cli_pull_ls_rm_and_one_line_errors(work, capsys):
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd not installed (Debian package apache2-utils)")
    img = small_image("cli", 1000)
    root = str(work / "cache")
    with running_registry(work / "reg", users={"op": "pw"}) as reg:
        ref = f"{reg.host}/ops/img:1"
        run(push(ref, img, Credentials("op", "pw")))
        capsys.readouterr()
        assert cli.main(["pull", "--cache-dir", root, ref]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"hived image: pull {ref} failed: ") and "requires credentials" in err
        assert err.count("\n") == 1 and "Traceback" not in err

        sys_stdin = sys.stdin
        try:
            sys.stdin = io.StringIO("pw\n")
            assert cli.main(["pull", "--cache-dir", root, "--user", "op", "--password-stdin", ref]) == 0
        finally:
            sys.stdin = sys_stdin
        out = capsys.readouterr().out
        assert img.digest in out and "rootfs.erofs" in out

    assert cli.main(["ls", "--cache-dir", root, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["digest"] for i in doc["images"]] == [img.digest] and doc["images"][0]["refs"] == [ref]
    assert cli.main(["ls", "--cache-dir", root]) == 0
    assert ref in capsys.readouterr().out
    assert cli.main(["pull", "--cache-dir", root, "--cached", ref]) == 0  # registry gone: from the cache
    capsys.readouterr()
    assert cli.main(["pull", "--cache-dir", root, ref]) == 1  # a refresh needs the registry
    err = capsys.readouterr().err
    assert "cannot connect" in err and err.count("\n") == 1
    assert cli.main(["rm", "--cache-dir", root, ref]) == 0
    assert "removed sha256:" in capsys.readouterr().out
    assert cli.main(["rm", "--cache-dir", root, ref]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hived image: rm {ref} failed: ") and "not in the image cache" in err
    assert cli.main(["pull", "--cache-dir", root, "Not A Ref"]) == 1
    assert "white space" in capsys.readouterr().err

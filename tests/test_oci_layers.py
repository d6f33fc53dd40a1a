"""Build images without a registry: references, auth challenges, and applying layers
(whiteouts, opaque dirs, links, ownership, path traversal) to a tree."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess

import pytest
from test_oci_support import MTIME, Layer, sha256

from hived.oci import reference
from hived.oci.errors import DigestMismatch, InvalidReference, LayerError
from hived.oci.layers import TreeBuilder
from hived.oci.registry import parse_challenge

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,want", [
    ("debian", ("docker.io", "library/debian", "latest", None)),
    ("debian:12-slim", ("docker.io", "library/debian", "12-slim", None)),
    ("docker.io/debian", ("docker.io", "library/debian", "latest", None)),
    ("index.docker.io/team/img:v1", ("docker.io", "team/img", "v1", None)),
    ("team/img", ("docker.io", "team/img", "latest", None)),
    ("localhost/img", ("localhost", "img", "latest", None)),
    ("localhost:5000/a/b/c:t", ("localhost:5000", "a/b/c", "t", None)),
    ("127.0.0.1:5000/img@" + DIGEST, ("127.0.0.1:5000", "img", None, DIGEST)),
    ("ghcr.io/o/r:tag@" + DIGEST, ("ghcr.io", "o/r", "tag", DIGEST)),
    ("[::1]:5000/img", ("[::1]:5000", "img", "latest", None)),
])
def test_reference_normalisation(text, want):
    r = reference.parse(text)
    assert (r.registry, r.repository, r.tag, r.digest) == want
    assert reference.parse(str(r)) == r


def test_reference_api_host_and_reference():
    assert reference.parse("debian").api_host == "registry-1.docker.io"
    assert reference.parse("127.0.0.1:5000/x:t").api_host == "127.0.0.1:5000"
    assert reference.parse("x:t@" + DIGEST).reference == DIGEST


@pytest.mark.parametrize("text", ["", "UPPER", "a b", "img@sha256:abc", "img:bad tag", "img:-x", "a//b",
                                  "img@md5:" + "0" * 32, "host:99999999/x"])
def test_reference_rejects(text):
    with pytest.raises(InvalidReference) as e:
        reference.parse(text)
    assert "[registry" in str(e.value) or ";" in str(e.value)


def test_parse_challenge():
    scheme, p = parse_challenge('Bearer realm="https://auth.example/token",service="reg.example",'
                                'scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert p == {"realm": "https://auth.example/token", "service": "reg.example", "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# ---------------------------------------------------------------------------------------- layers


@pytest.fixture
def tree(tmp_path):
    need_root()  # layers carry owners (uid 0 here): applying them is root's work
    root = tmp_path / "tree"
    root.mkdir()
    yield root
    shutil.rmtree(tmp_path, ignore_errors=True)


def apply(root, *layers: bytes, compress=None):
    b = TreeBuilder(root)
    for i, tar in enumerate(layers):
        blob = root.parent / f"layer{i}"
        blob.write_bytes(gzip.compress(tar) if compress == "gzip" else tar)
        assert b.apply_file(blob, str(i), sha256(tar)) == sha256(tar)
    b.finish()
    return b


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (ownership, device nodes)")


def test_whiteouts_opaque_and_replacement(tree):
    base = (Layer().dir("etc").file("etc/keep", b"k").file("etc/gone", b"g").dir("opq").file("opq/old", b"o")
            .dir("opq/sub").file("opq/sub/deep", b"d").dir("gonedir").file("gonedir/x", b"x")
            .dir("d2f").file("d2f/inner", b"i").file("f2d", b"f").bytes())
    upper = (Layer().whiteout("etc/gone").whiteout("gonedir").dir("opq").file("opq/new", b"n").opaque("opq")
             .dir("opq/sub").file("opq/sub/fresh", b"f")
             .file("d2f", b"now a file").dir("f2d").file("f2d/inner", b"now a dir")
             .file("same", b"s").whiteout("same")  # a whiteout never hides its own layer's files
             .whiteout("never-existed").bytes())
    apply(tree, base, upper, compress="gzip")
    assert (tree / "etc/keep").read_bytes() == b"k"
    assert not (tree / "etc/gone").exists()
    assert not (tree / "gonedir").exists()
    assert sorted(os.listdir(tree / "opq")) == ["new", "sub"]
    assert os.listdir(tree / "opq/sub") == ["fresh"]
    assert (tree / "d2f").read_bytes() == b"now a file"
    assert (tree / "f2d/inner").read_bytes() == b"now a dir"
    assert (tree / "same").read_bytes() == b"s"
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(tree) for n in ds + fs)


def test_links_ownership_modes_xattrs_devices(tree):
    layer1 = (Layer().dir("bin", mode=0o755).file("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0)
              .dir("home/build", mode=0o700, uid=1000, gid=1000)
              .file("home/build/own", b"mine", mode=0o640, uid=1000, gid=1001, xattrs={"user.hived": "yes"})
              .symlink("bin/sh", "busybox").file("bin/busybox", b"bb", mode=0o755).bytes())
    layer2 = (Layer().hardlink("bin/tool-again", "bin/tool").hardlink("/bin/lower-link", "./bin/busybox")
              .chardev("null", 1, 3).symlink("abs", "/etc/passwd").file("/rooted", b"r").bytes())
    apply(tree, layer1, layer2)
    st = os.lstat(tree / "bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o4755  # set-uid survives the chown
    assert os.lstat(tree / "bin/tool-again").st_ino == st.st_ino and st.st_nlink == 2
    assert os.lstat(tree / "bin/lower-link").st_ino == os.lstat(tree / "bin/busybox").st_ino
    own = os.lstat(tree / "home/build/own")
    assert (own.st_uid, own.st_gid, stat.S_IMODE(own.st_mode)) == (1000, 1001, 0o640)
    assert int(own.st_mtime) == MTIME
    assert os.getxattr(tree / "home/build/own", "user.hived") == b"yes"
    home = os.lstat(tree / "home/build")
    assert (home.st_uid, stat.S_IMODE(home.st_mode), int(home.st_mtime)) == (1000, 0o700, MTIME)
    assert os.readlink(tree / "bin/sh") == "busybox"
    assert os.readlink(tree / "abs") == "/etc/passwd"  # a symlink's target is data, kept as is
    dev = os.lstat(tree / "null")
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    assert (tree / "rooted").read_bytes() == b"r"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../../etc/x"])
def test_path_traversal_is_rejected(tree, name):
    with pytest.raises(LayerError, match="escapes the image root"):
        apply(tree, Layer().dir("a").file(name, b"x").bytes())
    assert not (tree.parent / "escape").exists()


def test_hardlink_target_outside_is_rejected(tree):
    with pytest.raises(LayerError, match="escapes the image root"):
        apply(tree, Layer().hardlink("h", "../../etc/passwd").bytes())
    with pytest.raises(LayerError, match="does not exist"):
        apply(tree, Layer().hardlink("h", "nothing/here").bytes())


def test_symlinked_parents_stay_inside_the_root(tree):
    """`etc -> /` and `up -> ../../..` must not let a later layer write outside the tree."""
    outside = tree.parent / "outside"
    outside.mkdir()
    layer1 = (Layer().symlink("etc", "/").symlink("up", "../../..").dir("real")
              .symlink("real/loop", "../real/loop2").symlink("real/loop2", "loop").bytes())
    layer2 = Layer().file("etc/passwd", b"in root").file("up/outside/planted", b"in root too").bytes()
    apply(tree, layer1, layer2)
    assert (tree / "passwd").read_bytes() == b"in root"
    assert (tree / "outside/planted").read_bytes() == b"in root too"
    assert os.listdir(outside) == []
    with pytest.raises(LayerError, match="too many symlinks"):
        apply(tree, Layer().file("real/loop/x", b"x").bytes())


def test_diff_id_mismatch_and_formats(tree):
    tar = Layer().file("a", b"a").bytes()
    blob = tree.parent / "blob"
    blob.write_bytes(tar)
    with pytest.raises(DigestMismatch, match="unpacks to"):
        TreeBuilder(tree).apply_file(blob, "0", sha256(b"other"))
    if shutil.which("zstd"):
        blob.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout)
        assert TreeBuilder(tree).apply_file(blob, "0", sha256(tar)) == sha256(tar)
    blob.write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(LayerError, match="not a valid tar"):
        TreeBuilder(tree).apply_file(blob, "0")


def test_unpacked_size_bound(tree):
    with pytest.raises(LayerError, match="more than 100 bytes"):
        apply_bounded = TreeBuilder(tree, max_bytes=100)
        blob = tree.parent / "big"
        blob.write_bytes(Layer().file("big", b"x" * 200).bytes())
        apply_bounded.apply_file(blob, "0")

"""The cell image: content-addressed cache, manifest, root contents, real boots under QEMU.

Uses the image in $HIVED_IMAGE_DIR (default /var/lib/hived/images); without one the
vm tests skip ("no cell image: run `hived image build`"). Boots use TCG unless
HIVED_ACCEL=kvm. Every test removes its temp dir and kills its QEMU even when it fails.
"""

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hived import image
from hived.cli import image as image_cli

IMAGE_ROOT = Path(os.environ.get("HIVED_IMAGE_DIR") or image.DEFAULT_DEST)
QEMU = "qemu-system-x86_64"
BOOT_LIMIT_S = 60.0
# TCG unless told otherwise: a /dev/kvm that exists is not always usable (nested KVM on
# the dev/CI machines fails on MSR 0x10a with -cpu host and hangs with other models).
ACCEL = os.environ.get("HIVED_ACCEL", "tcg")


def _skip(reason: str):
    print(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image_dir() -> Path:
    found = image.find_image(IMAGE_ROOT)
    if found is None:
        _skip(f"no cell image: run `hived image build` (looked in {IMAGE_ROOT})")
    return found


@pytest.fixture
def tmpdir_clean():
    d = tempfile.mkdtemp(prefix="hived-img-test-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _need(binary: str, package: str):
    if shutil.which(binary) is None:
        _skip(f"{binary} not installed (Debian package {package})")


# --------------------------------------------------------------------------
# the hash (no image needed)


def test_inputs_hash_changes_with_every_input(tmpdir_clean):
    kernel = image.Kernel("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    local = image.local_inputs()
    base = image.inputs_hash(image.image_inputs(kernel, local))
    assert base == image.inputs_hash(image.image_inputs(kernel, image.local_inputs()))
    assert len(base) == 16 and all(c in "0123456789abcdef" for c in base)

    # a modified copy of the package: one .py file changed
    pkg = tmpdir_clean / "hived"
    shutil.copytree(image.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    agent = pkg / "cell" / "agent.py"
    agent.write_text(agent.read_text() + "\n# changed\n")
    changed_py = image.local_inputs(package_dir=pkg)

    def with_(key, value):
        return {**local, key: value}

    variants = {
        "kernel version": image.image_inputs(image.Kernel(kernel.package, "6.1.192-3"), local),
        "kernel package": image.image_inputs(
            image.Kernel("linux-image-6.1.0-57-cloud-amd64", kernel.version), local),
        "module list": image.image_inputs(kernel, with_("modules", [*image.MODULES, "vsock"])),
        "init.sh": image.image_inputs(
            kernel, image.local_inputs(init_sh=image.INIT_SH.read_bytes() + b"\n")),
        "include list": image.image_inputs(kernel, with_("debootstrap", {
            **local["debootstrap"], "include": [*image.INCLUDE, "git"]})),
        "mirror": image.image_inputs(kernel, with_("debootstrap", {
            **local["debootstrap"], "mirror": "http://example.invalid/debian"})),
        "suite": image.image_inputs(kernel, with_("debootstrap", {
            **local["debootstrap"], "suite": "trixie"})),
        "format": image.image_inputs(kernel, with_("format", image.FORMAT_VERSION + 1)),
        "python file": image.image_inputs(kernel, changed_py),
    }
    hashes = {name: image.inputs_hash(inp) for name, inp in variants.items()}
    for name, h in hashes.items():
        assert h != base, f"changing the {name} did not change the hash"
    assert len(set(hashes.values())) == len(hashes)
    # the kernel-independent key ignores the kernel but not the code
    assert image.local_key(local) == image.local_key(image.local_inputs())
    assert image.local_key(changed_py) != image.local_key(local)


def test_python_files_are_pure_python():
    files = image.python_files()
    assert Path("cell/agent.py") in files and Path("__init__.py") in files
    assert all(f.suffix == ".py" and "__pycache__" not in f.parts for f in files)


def test_newc_writer_round_trip():
    c = image.Newc()
    c.dir("bin")
    c.file("bin/x", b"abc", 0o755)
    c.symlink("bin/sh", "x")
    c.chardev("dev-console", 5, 1)
    entries = _read_newc(c.finish())
    assert entries["bin/x"] == (0o100755, b"abc")
    assert entries["bin/sh"] == (0o120777, b"x")
    assert entries["bin"][0] == 0o40755


# --------------------------------------------------------------------------
# the built image


@pytest.mark.vm
def test_build_returns_cached_image_without_rebuilding(image_dir, monkeypatch):
    _need("apt-cache", "apt")
    kernel = image.resolve_kernel(update=False)
    h = image.inputs_hash(image.image_inputs(kernel))
    if not (IMAGE_ROOT / h / "manifest.json").is_file():
        _skip(f"no cell image for kernel {kernel.package} {kernel.version}: "
              "run `hived image build`")

    def no_build(*a, **kw):
        raise AssertionError("build_image rebuilt an image whose inputs did not change")

    monkeypatch.setattr(image.store, "_build", no_build)
    monkeypatch.setattr(image.store, "debootstrap_tarball", no_build)
    manifest = IMAGE_ROOT / h / "manifest.json"
    before = manifest.stat().st_mtime_ns
    t0 = time.monotonic()
    got = image.build_image(IMAGE_ROOT, out=None)
    took = time.monotonic() - t0
    assert got == IMAGE_ROOT / h
    assert took < 20.0, f"cache hit took {took:.1f} s"  # a rebuild takes minutes
    assert manifest.stat().st_mtime_ns == before
    assert os.readlink(IMAGE_ROOT / "current") == h
    assert image.find_image(IMAGE_ROOT) == got


@pytest.mark.vm
def test_manifest_is_complete(image_dir):
    m = image.read_manifest(image_dir)
    assert m["hash"] == image_dir.name
    assert m["format"] == image.FORMAT_VERSION
    assert m["local_key"] == image.local_key(image.local_inputs())
    assert image.inputs_hash(m["inputs"]) == image_dir.name
    assert m["kernel"]["package"].startswith("linux-image-")
    assert m["kernel"]["version"] and m["kernel"]["release"] in m["kernel"]["package"]
    assert set(m["modules"]) | set(m["modules_builtin"]) >= set(image.MODULES)
    assert m["modules"].index("virtio_ring") < m["modules"].index("virtio") < \
        m["modules"].index("virtio_blk")
    assert m["root"]["size_bytes"] > m["root"]["used_bytes"] > 50 << 20
    assert m["build_seconds"] > 0 and m["built_at"].endswith("Z")
    for name in image.IMAGE_FILES:
        info = m["files"][name]
        path = image_dir / name
        assert path.stat().st_size == info["size"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert h.hexdigest() == info["sha256"], f"{name} does not match its manifest hash"


def _debugfs(img: Path, request: str) -> str:
    p = subprocess.run(["debugfs", "-R", request, str(img)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.vm
def test_root_image_contents(image_dir):
    _need("debugfs", "e2fsprogs")
    root = image_dir / "root.ext4"
    passwd = _debugfs(root, "cat /etc/passwd")
    assert "build:x:1000:1000:hived build:/work:/bin/sh" in passwd.splitlines()
    assert any(ln.startswith("build:x:1000:") for ln in _debugfs(root, "cat /etc/group")
               .splitlines())
    cell = _debugfs(root, "ls -p /opt/hived/hived/cell")
    assert "/agent.py/" in cell and "/__pycache__/" in cell
    pyc = _debugfs(root, "ls -p /opt/hived/hived/cell/__pycache__")
    assert ".pyc/" in pyc and "/agent.cpython-" in pyc
    top = _debugfs(root, "ls -p /opt/hived/hived")
    assert "/__init__.py/" in top and ".so/" not in top and ".c/" not in top
    work = _debugfs(root, "stat /work")
    assert "User:  1000   Group:  1000" in work
    for mountpoint in ("/tmp", "/run", "/var/tmp", "/proc", "/sys", "/dev", "/work"):
        assert "Type: directory" in _debugfs(root, f"stat {mountpoint}"), mountpoint
    assert "python3" in _debugfs(root, "ls -p /usr/bin")
    msgpack = _debugfs(root, "ls -p /usr/lib/python3/dist-packages")
    assert "/msgpack/" in msgpack
    # slimmed: no apt lists, no man pages
    lists = _debugfs(root, "ls -p /var/lib/apt/lists")
    assert "_Packages" not in lists
    features = subprocess.run(["dumpe2fs", "-h", str(root)], capture_output=True, text=True,
                              check=False).stdout
    assert "has_journal" not in features and image.ROOT_LABEL in features


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        off += 110
        name = data[off:off + namesize - 1].decode()
        off += namesize
        off += -off % 4
        body = data[off:off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


@pytest.mark.vm
def test_initramfs_contents(image_dir):
    data = (image_dir / "initrd.img").read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries = _read_newc(data)
    assert entries["init"][1] == image.INIT_SH.read_bytes()
    assert entries["init"][0] & 0o111
    assert entries["bin/busybox"][1][:4] == b"\x7fELF"
    order = entries["lib/modules/order"][1].decode().split()
    assert order == image.read_manifest(image_dir)["modules"]
    for name in order:
        ko = entries[f"lib/modules/{name}.ko"][1]
        assert ko[:4] == b"\x7fELF", f"{name}.ko is not a plain ELF module"
    assert entries["dev/console"][0] & 0o170000 == 0o020000  # char device


@pytest.mark.vm
def test_scratch_disk_is_owned_by_build_user(tmpdir_clean):
    _need("debugfs", "e2fsprogs")
    path = tmpdir_clean / "scratch.ext4"
    t0 = time.monotonic()
    image.scratch_disk(path, 2 << 30)
    took = time.monotonic() - t0
    st = path.stat()
    assert st.st_size == 2 << 30 and st.st_blocks * 512 < 64 << 20  # sparse
    assert "User:  1000   Group:  1000" in _debugfs(path, "stat /")
    assert took < 5.0


# --------------------------------------------------------------------------
# real boots


def _qemu_cmd(img: Path, tmp: Path, append: str, scratch: Path | None) -> list[str]:
    cmd = [
        QEMU, "-M", "microvm,x-option-roms=off,rtc=on", "-accel", ACCEL,
        "-cpu", "host" if ACCEL == "kvm" else "max", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
        "-append", f"console=ttyS0 reboot=t panic=-1 quiet {image.guest_kernel_args(ACCEL)} "
                   f"{append}".strip(),
        "-chardev", f"file,id=con,path={tmp / 'console.log'}", "-serial", "chardev:con",
        "-drive", f"id=root,file={img / 'root.ext4'},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
    ]
    if scratch is not None:
        cmd += ["-drive", f"id=scratch,file={scratch},format=raw,if=none",
                "-device", "virtio-blk-device,drive=scratch"]
    cmd += ["-device", "virtio-serial-device",
            "-chardev", f"socket,id=ch0,path={tmp / 'chan.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=ch0,name=hived.0"]
    return cmd


@contextlib.contextmanager
def _qemu(cmd: list[str]):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        if p.stdout:
            p.stdout.close()


def _boot_until_exit(image_dir: Path, tmp: Path, append: str, scratch: bool = True):
    _need(QEMU, "qemu-system-x86")
    disk = image.scratch_disk(tmp / "scratch.ext4", 256 << 20) if scratch else None
    t0 = time.monotonic()
    with _qemu(_qemu_cmd(image_dir, tmp, append, disk)) as p:
        try:
            rc = p.wait(timeout=BOOT_LIMIT_S)
        except subprocess.TimeoutExpired:
            console = (tmp / "console.log").read_text(errors="replace")
            pytest.fail(f"QEMU still running after {BOOT_LIMIT_S:.0f} s; console:\n{console}")
        qemu_out = p.stdout.read().decode(errors="replace")
    took = time.monotonic() - t0
    console = (tmp / "console.log").read_text(errors="replace")
    return rc, took, console, qemu_out


@pytest.mark.vm
def test_bare_boot_reports_ready_and_exits(image_dir, tmpdir_clean):
    rc, took, console, qemu_out = _boot_until_exit(image_dir, tmpdir_clean, "hived.mode=bare")
    lines = [ln.strip() for ln in console.splitlines()]
    assert "hived-bare-ready" in lines, f"console:\n{console}\nqemu:\n{qemu_out}"
    assert not any(ln.startswith("hived-init-error") for ln in lines), console
    assert rc == 0, f"qemu exited {rc}: {qemu_out}"
    print(f"bare boot: {took:.2f} s wall")


@pytest.mark.vm
def test_missing_root_device_fails_loudly_and_exits(image_dir, tmpdir_clean):
    rc, took, console, qemu_out = _boot_until_exit(
        image_dir, tmpdir_clean, "hived.mode=bare hived.root=/dev/vdz")
    errors = [ln.strip() for ln in console.splitlines()
              if ln.strip().startswith("hived-init-error:")]
    assert errors, f"no hived-init-error line; console:\n{console}\nqemu:\n{qemu_out}"
    assert "/dev/vdz" in errors[0]
    assert "hived-bare-ready" not in console
    assert rc == 0, f"qemu exited {rc}: {qemu_out}"


@pytest.mark.vm
def test_bad_mode_fails_loudly_and_exits(image_dir, tmpdir_clean):
    rc, _, console, _ = _boot_until_exit(image_dir, tmpdir_clean, "hived.mode=nonsense",
                                         scratch=False)
    assert "hived-init-error: unknown hived.mode=nonsense" in console, console
    assert rc == 0


@pytest.mark.vm
def test_agent_mode_reaches_the_agent(image_dir, tmpdir_clean):
    """The agent (PID 1 after switch_root) answers on the hived.0 port: the box's resync marker
    echoed (protocol/SPEC.md, v4), then its hello."""
    from hived.protocol.resync import NONCE_BYTES, marker
    _need(QEMU, "qemu-system-x86")
    tmp = tmpdir_clean
    disk = image.scratch_disk(tmp / "scratch.ext4", 256 << 20)
    t0 = time.monotonic()
    with _qemu(_qemu_cmd(image_dir, tmp, "hived.mode=agent", disk)) as p:
        sock = socket.socket(socket.AF_UNIX)
        try:
            deadline = t0 + BOOT_LIMIT_S
            while True:
                try:
                    sock.connect(str(tmp / "chan.sock"))
                    break
                except OSError:
                    assert p.poll() is None, "QEMU exited before opening the channel"
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            nonce = os.urandom(NONCE_BYTES)
            sock.sendall(marker(nonce))
            sock.settimeout(max(1.0, deadline - time.monotonic()))
            first = b""
            try:
                while len(first) < len(marker(nonce)) + 4:
                    got = sock.recv(4096)
                    if not got:
                        break
                    first += got
            except TimeoutError:
                pass
            took = time.monotonic() - t0
        finally:
            sock.close()
        console = (tmp / "console.log").read_text(errors="replace")
        assert first, f"no bytes from the agent within {BOOT_LIMIT_S:.0f} s; console:\n{console}"
        assert first.startswith(marker(nonce)), first[:64]  # the echo, then the agent's hello frame
        assert "hived-init-error" not in console, console
        print(f"agent spoke after {took:.2f} s wall")


def test_main_reports_errors_in_one_line(monkeypatch, capsys):
    def fail(*a, **kw):
        raise image.ImageError("debootstrap", "E: no network", "check the network")

    monkeypatch.setattr(image, "build_image", fail)
    assert image_cli.main(["build", "--dest", "/nonexistent"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "hived image: debootstrap failed: E: no network; check the network"
    assert image_cli.main(["bogus"]) == 2


def test_missing_tool_names_the_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(image.ImageError) as e:
        image._require_tools(["debootstrap"])
    assert "apt-get install debootstrap" in str(e.value)


def test_find_image_required_names_the_command(tmpdir_clean):
    assert image.find_image(tmpdir_clean) is None
    with pytest.raises(image.ImageMissing) as e:
        image.find_image(tmpdir_clean, required=True)
    assert "hived image build" in str(e.value)
    json.dumps(image.local_inputs())  # inputs are plain JSON


def test_prune_keeps_newest_and_current(tmpdir_clean):
    def fake(name: str, built_at: str):
        d = tmpdir_clean / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"built_at": built_at}))

    for i in range(5):
        fake(f"{i:016x}", f"2026-01-0{i + 1}T00:00:00Z")
    fake("ffffffffffffffff", "2025-01-01T00:00:00Z")  # oldest, but current
    os.symlink("ffffffffffffffff", tmpdir_clean / "current")
    (tmpdir_clean / "cache").mkdir()
    removed = image.prune_images(tmpdir_clean, keep=3)
    left = sorted(p.name for p in tmpdir_clean.iterdir())
    assert left == ["0000000000000003", "0000000000000004", "cache", "current",
                    "ffffffffffffffff"]
    assert sorted(removed) == ["0000000000000000", "0000000000000001", "0000000000000002"]

"""The image store: build an image into <root>/<hash> (locked, atomic rename, newest kept),
find the one for the current code, read its manifest."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from hived.image.initramfs import build_initramfs, find_busybox
from hived.image.kernel import extract_kernel, fetch_kernel, resolve_kernel
from hived.image.rootfs import (
    add_build_user,
    compile_buildinit,
    debootstrap_tarball,
    finish_rootfs,
    install_hived,
    make_root_ext4,
    slim_rootfs,
)
from hived.image.spec import (
    _HEX_NAME,
    FORMAT_VERSION,
    IMAGE_FILES,
    INIT_SH,
    INITRD_COMPRESSION,
    KEEP_IMAGES,
    KERNEL_META_PACKAGE,
    NEEDED_FREE_BYTES,
    SUITE,
    VARIANT,
    ImageError,
    ImageMissing,
    Kernel,
    _sha256_file,
    default_dest,
    image_inputs,
    inputs_hash,
    local_inputs,
    local_key,
)
from hived.image.tools import _Log, _require_tools, _run
from hived.termprogress import Steps

# --------------------------------------------------------------------------
# the build


def _complete(d: Path) -> bool:
    return (d / "manifest.json").is_file() and all((d / f).is_file() for f in IMAGE_FILES)


@contextlib.contextmanager
def _locked(dest_root: Path) -> Iterator[None]:
    with open(dest_root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _set_current(dest_root: Path, name: str) -> None:
    tmp = dest_root / f".current.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, dest_root / "current")


def build_image(dest_root: Path | str | None = None, force: bool = False, *,
                out: TextIO | None = sys.stderr, cache_dir: Path | None = None) -> Path:
    """The image dir for the current inputs, built first unless it is already complete.

    Progress goes to `out` (stderr); failures raise ImageError. `force` rebuilds
    even a complete image and reruns debootstrap instead of using its cache.
    """
    dest_root = Path(dest_root) if dest_root is not None else default_dest()
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError("image dir", f"cannot create {dest_root}: {e.strerror}",
                         "run as root or set HIVED_IMAGE_DIR / --dest") from None
    cache_dir = cache_dir or dest_root / "cache"
    local = local_inputs()
    kernel = resolve_kernel()
    inputs = image_inputs(kernel, local)
    h = inputs_hash(inputs)
    final = dest_root / h
    if _complete(final) and not force:
        current = dest_root / "current"
        if not current.is_symlink() or os.readlink(current) != h:
            _set_current(dest_root, h)
        return final
    with _locked(dest_root):
        if _complete(final) and not force:
            _set_current(dest_root, h)
            return final
        try:
            return _build(dest_root, cache_dir, kernel, inputs, local, h, force, out)
        except ImageError as e:
            log = cache_dir / "last-build.log"
            if log.is_file() and e.what not in ("tool check", "build"):
                e.todo += f" (full log: {log})"
            raise
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ImageError("build", f"disk full under {dest_root}",
                                 "free space or set HIVED_IMAGE_DIR to a bigger disk") from None
            raise


def _build(dest_root: Path, cache_dir: Path, kernel: Kernel, inputs: dict, local: dict,
           h: str, force: bool, out: TextIO | None) -> Path:
    if os.geteuid() != 0:
        raise ImageError("build", "debootstrap and chroot need root", "run it as root")
    _require_tools(["apt-get", "dpkg-deb", "debootstrap", "mke2fs", "e2fsck", "chroot", "tar", "cc"])
    busybox = find_busybox()
    for stale in dest_root.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest_root).free
    if free < NEEDED_FREE_BYTES:
        raise ImageError("build", f"only {free >> 20} MiB free under {dest_root}, "
                         f"need about {NEEDED_FREE_BYTES >> 20} MiB",
                         "free space or set HIVED_IMAGE_DIR to a bigger disk")
    init_sh = INIT_SH.read_bytes()
    log = _Log(cache_dir / "last-build.log")
    log.path.write_text(f"hived image build {h} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    t_start = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f".build-{h}-", dir=dest_root))
    try:
        work, img = build / "work", build / "image"
        work.mkdir()
        img.mkdir(mode=0o755)
        prog = Steps(6, out)   # a live line on a terminal, plain lines otherwise
        with prog.step("kernel", f"kernel {kernel.package} {kernel.version}") as note:
            deb, cached = fetch_kernel(kernel, cache_dir, log)
            kp = extract_kernel(deb, work / "kernel", log)
            shutil.copyfile(kp.vmlinuz, img / "vmlinuz")
            note["note"] = ("cached .deb, " if cached else "") + \
                f"modules {' '.join(n for n, _ in kp.modules)}"
        with prog.step("initrd", f"initramfs ({INITRD_COMPRESSION})"):
            (img / "initrd.img").write_bytes(build_initramfs(busybox, kp.modules, init_sh,
                                                             net_only=kp.net_only))
            shutil.rmtree(work / "kernel")
        with prog.step("debootstrap", f"debootstrap {SUITE} ({VARIANT})") as note:
            tarball, cached = debootstrap_tarball(cache_dir, work, log, refresh=force)
            note["note"] = "cached" if cached else "cached for next time"
        root = work / "root"
        with prog.step("rootfs", "root tree: unpack, slim, build user, hived + compileall"):
            root.mkdir()
            _run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root),
                  "-xpf", str(tarball)], "unpack debootstrap cache",
                 "rerun with --force to redo debootstrap", log)
            slim_rootfs(root)
            add_build_user(root)
            finish_rootfs(root)
            if not (root / "usr/bin/python3").exists():
                raise ImageError("root filesystem", "no /usr/bin/python3 after debootstrap",
                                 "rerun with --force")
            install_hived(root)
            compile_buildinit(root, log)
        with prog.step("mke2fs", "root.ext4 (mke2fs -d, no journal)") as note:
            rootinfo = make_root_ext4(root, img / "root.ext4", h, log)
            note["note"] = f"{rootinfo['size_bytes'] >> 20} MiB, " \
                f"{rootinfo['used_bytes'] >> 20} MiB used"
            shutil.rmtree(root)
        with prog.step("manifest", "manifest + install"):
            files = {}
            for f in IMAGE_FILES:
                st = (img / f).stat()
                files[f] = {"size": st.st_size, "disk_bytes": st.st_blocks * 512,
                            "sha256": _sha256_file(img / f)}
            manifest = {
                "format": FORMAT_VERSION,
                "hash": h,
                "local_key": local_key(local),
                "inputs": inputs,
                "kernel": {"meta_package": KERNEL_META_PACKAGE, "package": kernel.package,
                           "version": kernel.version, "release": kp.release},
                "modules": [n for n, _ in kp.modules],
                "modules_builtin": kp.builtin,
                "modules_net_only": kp.net_only,
                "initrd": {"compression": INITRD_COMPRESSION,
                           "busybox": str(busybox), "busybox_sha256": _sha256_file(busybox)},
                "root": rootinfo,
                "debootstrap": {"tarball": tarball.name},
                "files": files,
                "steps_seconds": prog.times,
                "build_seconds": round(time.monotonic() - t_start, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            tmp = img / ".manifest.json"
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, img / "manifest.json")
            final = dest_root / h
            old = None
            if final.exists():  # --force over a complete image
                old = dest_root / f".build-old-{h}-{os.getpid()}"
                os.rename(final, old)
            os.rename(img, final)
            _set_current(dest_root, h)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            prune_images(dest_root)
        return final
    finally:
        shutil.rmtree(build, ignore_errors=True)


def prune_images(dest_root: Path, keep: int = KEEP_IMAGES) -> list[str]:
    """Remove all but the `keep` newest complete images (never `current`); names removed.

    A running cell is not disturbed: QEMU holds its files open.
    """
    current = dest_root / "current"
    cur_name = os.readlink(current) if current.is_symlink() else None
    images = []
    for d in dest_root.iterdir():
        if _HEX_NAME.match(d.name) and d.is_dir() and not d.is_symlink():
            try:
                built = json.loads((d / "manifest.json").read_text()).get("built_at", "")
            except (OSError, ValueError):
                built = ""  # incomplete leftovers go first
            images.append((d.name == cur_name, built, d))
    images.sort(key=lambda t: (t[0], t[1]), reverse=True)
    removed = []
    for is_current, _, d in images[max(keep, 1):]:
        if not is_current:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


# --------------------------------------------------------------------------
# lookup


def find_image(dest_root: Path | str | None = None, *, required: bool = False) -> Path | None:
    """The complete image built from the current hived code, init.sh and recipe.

    Matches on every input except the kernel version, so that an `apt-get update`
    bringing a newer kernel does not strand running hosts; `hived image build`
    picks the new kernel up. Prefers `current`, then the newest build. Needs no
    apt and no root. With required=True a miss raises ImageMissing naming the fix.
    """
    dest_root = Path(dest_root) if dest_root is not None else default_dest()
    key = local_key(local_inputs())
    best: tuple[str, Path] | None = None
    current = dest_root / "current"
    cur_name = os.readlink(current) if current.is_symlink() else None
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for d in dest_root.iterdir():
            if not _HEX_NAME.match(d.name) or not _complete(d):
                continue
            try:
                m = json.loads((d / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            if m.get("local_key") != key:
                continue
            rank = ("1" if d.name == cur_name else "0") + str(m.get("built_at", ""))
            if best is None or rank > best[0]:
                best = (rank, d)
    if best is not None:
        return best[1]
    if required:
        raise ImageMissing("cell image lookup",
                           f"no image for the current hived code in {dest_root}",
                           "run `hived image build`")
    return None


def read_manifest(image_dir: Path | str) -> dict:
    return json.loads((Path(image_dir) / "manifest.json").read_text())

"""The root filesystem: debootstrap, slimming, the build user, the hived package's guest
files byte-compiled, hived-buildinit, and the read-only ext4 made from it."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import stat
import uuid
from pathlib import Path

from hived.image.spec import (
    BUILD_GID,
    BUILD_UID,
    BUILD_USER,
    BUILDINIT_C,
    BUILDINIT_PATH,
    INCLUDE,
    MIRROR,
    PACKAGE_DIR,
    ROOT_HEADROOM,
    ROOT_LABEL,
    SUITE,
    VARIANT,
    ImageError,
    _debootstrap_key,
    python_files,
)
from hived.image.tools import _last_error_line, _Log, _run

# --------------------------------------------------------------------------
# root filesystem


def debootstrap_tarball(cache_dir: Path, workdir: Path, log: _Log | None = None, *,
                        refresh: bool = False) -> tuple[Path, bool]:
    """The cached debootstrap result for SUITE/VARIANT/INCLUDE/MIRROR; (path, was_cached)."""
    tarball = cache_dir / f"debootstrap-{SUITE}-{VARIANT}-{_debootstrap_key()}.tar"
    if tarball.is_file() and not refresh:
        return tarball, True
    target = workdir / "debootstrap"
    cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
           SUITE, str(target), MIRROR]
    todo = f"check the network and that {MIRROR} is reachable, then rerun `hived image build`"
    p = _run(cmd, "debootstrap", todo, log, check=False)
    if p.returncode != 0:
        why = _last_error_line(p.stdout)
        dlog = target / "debootstrap" / "debootstrap.log"
        if dlog.is_file():
            log_text = dlog.read_text(errors="replace")
            if log is not None:
                log.write(f"--- debootstrap.log\n{log_text}\n")
            if "No space left on device" in log_text:
                why = "disk full (No space left on device)"
        if "No space left on device" in p.stdout:
            why = "disk full (No space left on device)"
        raise ImageError("debootstrap", why, todo)
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}")
    _run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(target),
          "-cf", str(tmp), "."], "debootstrap cache", "check free space in the cache dir", log)
    os.replace(tmp, tarball)
    shutil.rmtree(target)
    return tarball, False


def _rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _empty_dir(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _rm(child)


def slim_rootfs(root: Path) -> None:
    """Drop what a read-only build cell never reads: apt state, docs, man pages, locales."""
    for sub in ("var/lib/apt/lists", "var/cache/apt", "usr/share/man", "usr/share/info",
                "usr/share/lintian", "usr/share/linda", "var/cache/man", "var/log",
                "usr/share/bash-completion", "tmp", "var/tmp", "run",
                "dev", "debootstrap"):
        _empty_dir(root / sub)
    _rm(root / "debootstrap")
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    # /usr/share/doc: keep only the copyright files
    doc = root / "usr/share/doc"
    if doc.is_dir():
        for pkg in doc.iterdir():
            if pkg.is_dir() and not pkg.is_symlink():
                for child in pkg.iterdir():
                    if child.name != "copyright":
                        _rm(child)
            elif not pkg.is_symlink():
                _rm(pkg)
    # translations; locale.alias stays (glibc reads it), C.utf8 is in /usr/lib/locale
    locale = root / "usr/share/locale"
    if locale.is_dir():
        for child in locale.iterdir():
            if child.name != "locale.alias":
                _rm(child)
    for pattern in ("var/lib/dpkg/*-old", "var/cache/debconf/*-old", "var/cache/ldconfig/aux-cache",
                    "etc/*-"):
        for p in root.glob(pattern):
            _rm(p)
    for p in (root / "etc/machine-id",):
        if p.exists():
            p.write_text("")


def add_build_user(root: Path) -> None:
    """uid/gid 1000 'build', home /work; /etc/passwd, group and shadow edited in place."""
    def add(path: Path, line: str, mode: int) -> None:
        text = path.read_text() if path.exists() else ""
        lines = [ln for ln in text.splitlines() if ln and ln.split(":")[0] != BUILD_USER]
        for ln in lines:
            fields = ln.split(":")
            if path.name in ("passwd", "group") and len(fields) > 2 and \
                    fields[2] == str(BUILD_UID):
                raise ImageError("root filesystem", f"id {BUILD_UID} already taken in "
                                 f"{path.name}: {ln}", "check the debootstrap result")
        lines.append(line)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(mode)

    etc = root / "etc"
    add(etc / "passwd", f"{BUILD_USER}:x:{BUILD_UID}:{BUILD_GID}:hived build:/work:/bin/sh",
        0o644)
    add(etc / "group", f"{BUILD_USER}:x:{BUILD_GID}:", 0o644)
    add(etc / "shadow", f"{BUILD_USER}:!::0:99999:7:::", 0o640)
    if (etc / "gshadow").exists():
        add(etc / "gshadow", f"{BUILD_USER}:!::", 0o640)


def install_hived(root: Path, package_dir: Path | None = None) -> list[str]:
    """Copy the pure-Python files to /opt/hived/hived and byte-compile with the guest python."""
    src = package_dir or PACKAGE_DIR
    dest = root / "opt/hived/hived"
    if dest.exists():
        shutil.rmtree(dest)
    files = python_files(src)
    for rel in files:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.copyfile(src / rel, out)
        out.chmod(0o644)
    for d in [root / "opt/hived", *dest.rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)
    _run(["chroot", str(root), "/usr/bin/python3", "-m", "compileall", "-q",
          "--invalidation-mode", "unchecked-hash", "/opt/hived"],
         "byte-compile", "check the hived sources for syntax errors", None)
    return [str(r) for r in files]


def compile_buildinit(root: Path, log: _Log | None = None) -> Path:
    """The build containers' init (hived/guest/buildinit.c), static so any image can run it."""
    out = root / BUILDINIT_PATH
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _run(["cc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(out), str(BUILDINIT_C)],
         "compile hived-buildinit", "run `apt-get install gcc libc6-dev`", log)
    out.chmod(0o755)
    return out


def finish_rootfs(root: Path) -> None:
    for d, mode in (("work", 0o755), ("tmp", 0o1777), ("run", 0o755), ("var/tmp", 0o1777),
                    ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("root", 0o700)):
        p = root / d
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(mode)
    os.chown(root / "work", BUILD_UID, BUILD_GID)
    (root / "etc/hostname").write_text("cell\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost cell\n::1\tlocalhost ip6-localhost\n")
    (root / "etc/fstab").write_text("# mounted by the hived initramfs\n")


def tree_usage(root: Path, block: int = 4096) -> tuple[int, int]:
    """(bytes the tree needs in `block`-sized blocks, inode count); hard links count once."""
    used, inodes = 0, 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."] if dirpath == str(root) else [*dirnames,
                                                                              *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                used += math.ceil(st.st_size / block) * block
            elif stat.S_ISDIR(st.st_mode):
                used += max(block, math.ceil(st.st_size / block) * block)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                used += block
    return used, inodes


def make_root_ext4(root: Path, out: Path, image_hash: str, log: _Log | None = None) -> dict:
    used, inodes = tree_usage(root)
    n_inodes = int(inodes * (1 + ROOT_HEADROOM)) + 1024
    # data + inode tables (256 B each), + headroom, + fixed room for ext4 metadata
    size = int((used + n_inodes * 256) * (1 + ROOT_HEADROOM)) + (16 << 20)
    size = math.ceil(size / (1 << 20)) << 20
    fs_uuid = str(uuid.UUID(hashlib.sha256(image_hash.encode()).hexdigest()[:32]))
    with open(out, "wb") as f:
        f.truncate(size)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", str(n_inodes),
          "-m", "0", "-O", "^has_journal", "-L", ROOT_LABEL, "-U", fs_uuid,
          "-E", f"hash_seed={fs_uuid},assume_storage_prezeroed=1",
          "-d", str(root), str(out)],
         "mke2fs", "check free space under the image dir", log)
    _run(["e2fsck", "-fn", str(out)], "root.ext4 check", "report a bug in hived image build",
         log)
    return {"used_bytes": used, "inodes": inodes, "inode_count": n_inodes, "size_bytes": size,
            "label": ROOT_LABEL, "uuid": fs_uuid}

"""Cell templates: a booted cell saved at its snapshot point, restored into many clones.

A template belongs to one warm pool (shape, or shape + build image) and is valid only for
the inputs it was made from: the shape's devices, the build image, the cell image's files,
the VMM binary, the accelerator (`inputs_digest`). Its three parts live in sealed memfds
held by the box process:

    memory  the guest's RAM as the template VM left it (QEMU wrote through to it:
            `memory-backend-file,share=on`); each clone maps it privately (copy-on-write)
    state   the VM's device state (QEMU migration stream, x-ignore-shared: no RAM)
    scratch its scratch disk: an empty ext4 the template mounted and froze (FIFREEZE) at
            the snapshot point; each clone's scratch disk file starts as a copy of it
            (holes kept: a few MiB), so the clone's kernel, which has it mounted already,
            only thaws it. Nothing of a build is ever in it.

Sealed (F_SEAL_WRITE and the size seals), none can be changed by anyone, clones
included, and both vanish with the box process: nothing of a template outlives the box,
not even after a kill -9 (a clone still running keeps its private mapping until it ends).

With `[box] template_hugepages = true` the memory memfd is on huge pages (MFD_HUGETLB, the
host's default size, from the pool `vm.nr_hugepages` reserved). Sealing works there as on
tmpfs (kernel >= 4.16; checked on 6.x by tests/test_templates_hugepages.py): F_SEAL_WRITE
refuses a shared writable mapping and write() (hugetlbfs has no write() at all), and a
clone's private mapping copies a huge page on its first write to it. The catch is the
kernel's accounting: a private hugetlb mapping reserves huge pages for its whole size when
it is made (QEMU's default; without the reservation a copy-on-write fault on an empty pool
would SIGBUS the VMM in mid-build). So a template takes memory_mib of huge pages and so
does each of its clones; when the pool cannot cover a clone, the cell boots instead (on
ordinary memory) and the template stays. Huge pages are not charged to the cells' memory
cgroups, and not counted in Pss (smaps: Shared_Hugetlb / Private_Hugetlb).
A template lives at most `max_age_s` and serves at most `max_clones` clones (they share its
kernel address layout and everything in its memory before they reseed), then it is
replaced; one that fails to restore is discarded at once.
"""

import asyncio
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time

from hived import __version__

log = logging.getLogger(__name__)

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0


class TemplateFailed(Exception):
    """A template could not be made; the message says why."""


def _file_identity(path) -> list:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ino]


@functools.lru_cache(maxsize=8)
def _vmm_version(path: str, size: int, mtime_ns: int) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return out.splitlines()[0] if out else "unknown"


def vmm_identity(binary: str = "qemu-system-x86_64") -> dict:
    path = shutil.which(binary) or binary
    ident = _file_identity(path)
    return {"file": ident, "version": _vmm_version(path, ident[1], ident[2])}


def template_inputs(shape, image, cell_image, *, accelerator: str, source_slot_mib: int, nic: bool,
                    tsc_khz: int) -> dict:
    """Everything a clone must share with its template (pure apart from stat() of the files)."""
    return {
        "shape": {"vcpus": shape.vcpus, "memory_mib": shape.memory_mib, "scratch_mib": shape.scratch_mib},
        "image": [image.digest, os.stat(image.path).st_size] if image is not None else None,
        "cell_image": [_file_identity(p) for p in (cell_image.kernel, cell_image.initrd, cell_image.rootfs)],
        "vmm": vmm_identity(),
        "accelerator": accelerator,
        "source_slot_mib": source_slot_mib,
        "nic": nic,
        "tsc_khz": tsc_khz,
        "hived": __version__,
    }


def inputs_digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def memfd_prefix(box_name: str) -> str:
    """Template memfds are named after their box (see /proc/PID/fd of a clone's VMM)."""
    return f"hived-template-{box_name}-"


def template_memfds(box_name: str) -> list[str]:
    """Processes holding a memfd of this box's templates: "pid: name" (for no-leak checks)."""
    needle = "/memfd:" + memfd_prefix(box_name)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for text in (maps, "\n".join(fds)):
            i = text.find(needle)
            if i >= 0:
                found.append(f"{pid}: {text[i + 1:].split()[0]}")
                break
    return found


def new_memfd(name: str, size: int = 0, *, hugetlb: bool = False) -> int:
    """A sealable memfd of `size` bytes; on huge pages (hugetlbfs) with `hugetlb` (the size must be
    a multiple of the huge page size)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if hugetlb else 0))
    if size:
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
    return fd


@dataclasses.dataclass(frozen=True)
class HugePages:
    """The host's default-size huge pages (/proc/meminfo): what `vm.nr_hugepages` reserved."""
    size: int        # bytes per page (Hugepagesize)
    total: int       # HugePages_Total (vm.nr_hugepages, plus surplus pages in use)
    free: int        # HugePages_Free: not faulted in by anyone
    reserved: int    # HugePages_Rsvd: free, but promised to mappings made already

    @property
    def available(self) -> int:
        """Pages a new mapping can still reserve."""
        return self.free - self.reserved

    @classmethod
    def read(cls, meminfo: str = "/proc/meminfo") -> "HugePages":
        fields = {}
        with open(meminfo) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) if rest.split() else 0
        return cls(size=fields.get("Hugepagesize", 0) * 1024, total=fields.get("HugePages_Total", 0),
                   free=fields.get("HugePages_Free", 0), reserved=fields.get("HugePages_Rsvd", 0))

    def pages(self, nbytes: int) -> int:
        return -(-nbytes // self.size) if self.size else 0

    def shortage(self, nbytes: int, what: str) -> str:
        """Why `nbytes` of huge pages cannot be had now ("" if they can), naming vm.nr_hugepages."""
        if not self.size:
            return f"{what} needs huge pages and this kernel has none (no Hugepagesize in /proc/meminfo)"
        need = self.pages(nbytes)
        if need <= self.available:
            return ""
        return (f"{what} needs {need} huge pages of {self.size >> 10} kB and {max(0, self.available)} are free "
                f"(vm.nr_hugepages = {self.total}): raise it, e.g. `sysctl -w vm.nr_hugepages="
                f"{self.total + need - max(0, self.available)}`, or set [box] template_hugepages = false")


def reopen_readonly(fd: int) -> int:
    """A new open file (own offset) on the same memfd, read-only, close-on-exec."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


@dataclasses.dataclass
class Template:
    id: str
    key: str              # the warm pool it serves
    digest: str           # inputs_digest() of what it was made from
    memory_fd: int
    state_fd: int
    made_at: float        # time.monotonic()
    make_ms: float = 0.0
    state_bytes: int = 0
    clones: int = 0
    boot: dict = dataclasses.field(default_factory=dict)
    hugetlb: bool = False  # its memory is on huge pages
    scratch_fd: int = -1   # its scratch disk, frozen at the snapshot point: each clone's starts as a copy
    scratch_bytes: int = 0  # of data in it (the rest are holes)

    def _fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.memory_fd, self.state_fd, self.scratch_fd) if fd >= 0)

    def seal(self) -> None:
        for fd in self._fds():
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)

    def unusable(self, digest: str, now: float, max_age_s: float, max_clones: int) -> str:
        """Why this template may not make another clone, or ""."""
        if digest != self.digest:
            return f"its inputs changed (made for {self.digest}, now {digest})"
        if max_age_s and now - self.made_at >= max_age_s:
            return f"older than {max_age_s:g} s"
        if max_clones and self.clones >= max_clones:
            return f"made its {max_clones} clones"
        return ""

    def clone_fds(self) -> tuple[int, int, int]:
        """(memory, state, scratch) for one clone, each its own read-only open file (scratch -1 if
        the template kept none)."""
        self.clones += 1
        fds: list[int] = []
        try:
            for fd in (self.memory_fd, self.state_fd, self.scratch_fd):
                fds.append(reopen_readonly(fd) if fd >= 0 else -1)
        except OSError:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            raise
        return fds[0], fds[1], fds[2]

    def close(self) -> None:
        for fd in self._fds():
            os.close(fd)
        self.memory_fd = self.state_fd = self.scratch_fd = -1

    def describe(self, now: float) -> dict:
        return {"id": self.id, "digest": self.digest, "age_s": round(now - self.made_at, 1),
                "clones": self.clones, "make_ms": round(self.make_ms, 1), "state_bytes": self.state_bytes,
                "scratch_bytes": self.scratch_bytes,
                "hugepages": self.hugetlb}


class TemplateStore:
    """At most one template per warm pool; makes them (one at a time per pool) and retires them.

    `make(key, digest, shape, image)` boots a template VM and returns a sealed Template.
    """

    def __init__(self, make, *, max_age_s: float, max_clones: int, clock=time.monotonic) -> None:
        self._make = make
        self.max_age_s = max_age_s
        self.max_clones = max_clones
        self._clock = clock
        self.templates: dict[str, Template] = {}
        self._making: dict[str, asyncio.Task] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self.last_error: dict[str, str] = {}
        self.made = 0
        self.discarded = 0

    def usable(self, key: str, digest: str) -> Template | None:
        tpl = self.templates.get(key)
        if tpl is None:
            return None
        why = tpl.unusable(digest, self._clock(), self.max_age_s, self.max_clones)
        if why:
            self.discard(key, why)
            return None
        return tpl

    async def get(self, key: str, digest: str, shape, image) -> Template | None:
        """The pool's template, made now if there is none (waiting for it); None while making fails."""
        tpl = self.usable(key, digest)
        if tpl is not None:
            return tpl
        task = self._making.get(key)
        if task is None:
            if self._clock() < self._retry_at.get(key, 0.0):
                return None  # failed lately: boot instead of trying again at once
            task = asyncio.get_running_loop().create_task(self._make_one(key, digest, shape, image),
                                                          name=f"template-{key}")
            self._making[key] = task
        try:
            tpl = await asyncio.shield(task)
        except TemplateFailed:
            return None
        return tpl if tpl.digest == digest and tpl.memory_fd >= 0 else None

    async def _make_one(self, key: str, digest: str, shape, image) -> Template:
        try:
            tpl = await self._make(key, digest, shape, image)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (n - 1))
            self._retry_at[key] = self._clock() + delay
            self.last_error[key] = str(exc)
            log.warning("pool %s: template not made (%s); cells boot, next try in %.0f s", key, exc, delay)
            raise TemplateFailed(str(exc)) from None
        finally:
            self._making.pop(key, None)
        self._failures.pop(key, None)
        self.last_error.pop(key, None)
        old = self.templates.pop(key, None)
        if old is not None:
            old.close()
        self.templates[key] = tpl
        self.made += 1
        log.info("pool %s: template %s made in %.0f ms (%d bytes of device state)",
                 key, tpl.id, tpl.make_ms, tpl.state_bytes)
        return tpl

    def discard(self, key: str, why: str, template: Template | None = None) -> None:
        """Forget the pool's template (only `template`, if given: a newer one stays)."""
        tpl = self.templates.get(key)
        if tpl is None or (template is not None and tpl is not template):
            return
        del self.templates[key]
        tpl.close()
        self.discarded += 1
        log.warning("pool %s: template %s discarded: %s", key, tpl.id, why)

    async def close(self) -> None:
        tasks = list(self._making.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in list(self.templates):
            self.templates.pop(key).close()

    def describe(self) -> dict:
        now = self._clock()
        return {"max_age_s": self.max_age_s, "max_clones": self.max_clones, "made": self.made,
                "discarded": self.discarded,
                "templates": {k: t.describe(now) for k, t in self.templates.items()},
                "making": sorted(self._making), "last_error": dict(self.last_error)}

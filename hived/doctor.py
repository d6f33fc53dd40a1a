"""`hived doctor [--json]`: check this host for what hived needs, and say how to fix what is missing.

run_checks() returns one nested dict (JSON-ready):

    kvm.{present,device,api_version,guest_runs,reason,guest_mips,timed_out,elapsed_ms}
    accelerator            "kvm" | "tcg" (hived.kvm.accelerator(); None if it cannot be decided)
    accelerator_source     "probe" | "HIVED_ACCEL"
    cgroup.{version,root,controllers{name: usable},errors{name: why}}
    netns.{ok,method,error}          a real unshare(CLONE_NEWNET) in a child process
    tun.{ok,path,tap,error}          /dev/net/tun opens; a tap can be made (inside the throwaway netns)
    tc.{ok,tc,ip,qdiscs,filters,actions,ifb,errors}   each tried for real in the throwaway netns
    wireguard.{kernel,kernel_error,wireguard_go,wireguard_go_version,wg,used}
    qemu / crun / firecracker .{path,version}   (qemu also .microvm, .accels)
    tools{name: path or None}
    image                  the cell image directory for the current code, or None
    native.{compiled,modules,in_use,pure_python_forced}
    problems / warnings    [{check, message, fix}]: failing required / optional checks
    ok                     no problems
    elapsed_ms, timings_ms{check: ms}

Required (a problem, exit status 1): qemu-system-x86_64, an accelerator decided, cgroup v1 or
v2 with cpuset+memory+pids, netns, /dev/net/tun (and taps), compiled native modules, mke2fs.
Everything else is a warning. Every message names the fix: a Debian package to
`apt-get install`, or the command to run.

The network checks run in one child process that first unshare()s a new network
namespace: it is anonymous (never in /run/netns), so everything made in it (veth, ifb,
tap, wireguard) vanishes with the child, even if the child is SIGKILLed on timeout.
Nothing is left behind on the host. One host-visible side effect is possible on other
hosts: if the ifb module is not loaded yet, creating an ifb device loads it, and the
module makes ifb0 and ifb1 in the host namespace (as the box daemon would anyway).

Every check runs in its own daemon thread with subprocess timeouts, and a crash in a
check becomes a problem naming it; the whole doctor is bounded by DEADLINE seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

DEADLINE = 30.0          # seconds for the whole doctor; a check still running then is a problem
CMD_TIMEOUT = 5.0        # seconds for one --version / help command
NET_CHILD_TIMEOUT = 8.0  # seconds for the whole network child
KVM_TIMEOUT = 4.0        # seconds for the KVM probe child
CGROUP_ROOT = Path("/sys/fs/cgroup")
TUN_PATH = "/dev/net/tun"
QEMU = "qemu-system-x86_64"

# tool -> Debian package that ships it
PACKAGES = {
    QEMU: "qemu-system-x86",
    "crun": "crun",
    "debootstrap": "debootstrap",
    "mke2fs": "e2fsprogs",
    "mkfs.erofs": "erofs-utils",
    "cpio": "cpio",
    "busybox": "busybox-static",
    "ip": "iproute2",
    "tc": "iproute2",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
}
REQUIRED_TOOLS = ("mke2fs",)
OPTIONAL_TOOLS = ("debootstrap", "mkfs.erofs", "cpio", "busybox", "ip", "tc")
TOOL_USE = {
    "mke2fs": "builds the cells' ext4 root and scratch disks",
    "debootstrap": "`hived image build` needs it for the cell root filesystem",
    "mkfs.erofs": "for erofs cell roots",
    "cpio": "to inspect initramfs images",
    "busybox": "`hived image build` puts it in the cell initramfs",
    "ip": "network namespaces, taps and ifb devices for cells",
    "tc": "the cells' network bandwidth limits",
}

CGROUP_V1 = ("cpuset", "cpu", "memory", "pids", "blkio")
CGROUP_V2 = ("cpuset", "cpu", "memory", "pids", "io")
CGROUP_REQUIRED = ("cpuset", "memory", "pids")

# tc pieces the box uses: tbf (host->guest) on the tap, ingress -> u32 + mirred -> ifb -> tbf.
TC_NEEDED = {
    "tbf": ("qdiscs", "sch_tbf"),
    "htb": ("qdiscs", "sch_htb"),
    "ingress": ("qdiscs", "sch_ingress"),
    "u32": ("filters", "cls_u32"),
    "mirred": ("actions", "act_mirred"),
    "ifb": (None, "ifb"),
}
# Tried and reported, but not needed (guest->host is shaped through ifb + tbf instead).
TC_NOT_NEEDED = {"police": ("actions", "act_police")}

TCG_FIX = ("nothing to do to run cells under TCG; for KVM speed run hived on bare metal with VT-x/AMD-V "
           "enabled in the firmware (or a VM with nested virtualisation) and `modprobe kvm_intel` "
           "(Intel) or `modprobe kvm_amd` (AMD)")


# ---- helpers ------------------------------------------------------------------


def _which(name: str) -> str | None:
    """The tool on $PATH, as hived itself finds it (shutil.which), or None."""
    return shutil.which(name)


def _run(argv: list[str], timeout: float = CMD_TIMEOUT) -> tuple[int | None, str, str]:
    """(exit status or None, stdout, stderr); never raises, never outlives `timeout`."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              close_fds=True)
    except subprocess.TimeoutExpired:
        return None, "", f"{argv[0]} did not finish within {timeout:g} s"
    except OSError as exc:
        return None, "", f"cannot run {argv[0]}: {exc.strerror or exc}"
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _version(path: str, pattern: str = r"version\s+v?(\S+)") -> str | None:
    rc, out, err = _run([path, "--version"])
    if rc is None:
        return None
    text = out + "\n" + err
    m = re.search(pattern, text, re.IGNORECASE)
    return m.group(1) if m else (_first_line(text)[:80] or None)


def _install(*packages: str) -> str:
    return f"apt-get install {' '.join(packages)}"


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts() -> list[tuple[str, str, set[str], set[str]]]:
    """(mount point, fstype, mount options, super options) of every cgroup mount."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, rfields = left.split(), right.split()
            if len(fields) < 6 or len(rfields) < 3 or not rfields[0].startswith("cgroup"):
                continue
            mounts.append((_unescape_mount(fields[4]), rfields[0], set(fields[5].split(",")),
                           set(rfields[2].split(","))))
    return mounts


def _try_mkdir(directory: Path) -> str | None:
    """Make and remove a scratch cgroup under `directory`: None if that works, else why."""
    probe = directory / f"hived-doctor-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup in {directory}: {exc.strerror or exc}"
    try:
        probe.rmdir()
    except OSError as exc:
        return f"created {probe} but cannot remove it: {exc.strerror or exc} (remove it: `rmdir {probe}`)"
    return None


# ---- the network child ----------------------------------------------------------------

# Runs as `python -c NET_CHILD JSON`: new anonymous netns first, then everything else in it.
NET_CHILD = r"""
import ctypes, fcntl, json, os, struct, subprocess, sys
args = json.loads(sys.argv[1])
ip, tc, timeout = args["ip"], args["tc"], args["timeout"]
out = {"netns": False, "netns_error": None, "tap": None, "tap_error": None,
       "tc": {}, "tc_errors": {}, "wireguard": None, "wireguard_error": None}

def done():
    print(json.dumps(out), flush=True)
    sys.exit(0)

libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
    out["netns_error"] = "unshare(CLONE_NEWNET): " + os.strerror(ctypes.get_errno())
    done()
out["netns"] = True

try:  # a tap in this namespace; not persistent: it goes when the fd closes
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"hvdoctap0", 0x0002 | 0x1000))  # TUNSETIFF
    finally:
        os.close(fd)
    out["tap"] = True
except OSError as exc:
    out["tap"], out["tap_error"] = False, "TUNSETIFF (tap): " + (exc.strerror or str(exc))

def run(*argv):
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "`%s` did not finish within %g s" % (" ".join(argv), timeout)
    except OSError as exc:
        return "cannot run %s: %s" % (argv[0], exc.strerror or exc)
    if p.returncode == 0:
        return None
    lines = [ln.strip() for ln in p.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return "`%s`: %s" % (" ".join(argv[1:]), lines[0] if lines else "exit status %d" % p.returncode)

def record(name, err):
    out["tc"][name] = err is None
    if err:
        out["tc_errors"][name] = err
    return err is None

if ip:
    veth = run(ip, "link", "add", "hvdoc0", "type", "veth", "peer", "name", "hvdoc1")
    if veth is None:
        run(ip, "link", "set", "hvdoc0", "up")
    else:
        out["veth_error"] = veth
    record("ifb", run(ip, "link", "add", "hvdocifb0", "type", "ifb"))
    err = run(ip, "link", "add", "hvdocwg0", "type", "wireguard")
    out["wireguard"], out["wireguard_error"] = err is None, err
    if tc and veth is None:
        dev = ("dev", "hvdoc0")
        if record("tbf", run(tc, "qdisc", "add", *dev, "root", "tbf",
                             "rate", "10mbit", "burst", "32kbit", "latency", "50ms")):
            run(tc, "qdisc", "del", *dev, "root")
        err = run(tc, "qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "10")
        if err is None:
            err = run(tc, "class", "add", *dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10mbit")
            run(tc, "qdisc", "del", *dev, "root")
        record("htb", err)
        if record("ingress", run(tc, "qdisc", "add", *dev, "handle", "ffff:", "ingress")):
            flt = (tc, "filter", "add", *dev, "parent", "ffff:", "protocol", "all")
            match = ("u32", "match", "u32", "0", "0")
            record("u32", run(*flt, "prio", "1", *match, "flowid", ":1"))
            if out["tc"].get("u32") and out["tc"].get("ifb"):
                record("mirred", run(*flt, "prio", "2", *match,
                                     "action", "mirred", "egress", "redirect", "dev", "hvdocifb0"))
            if out["tc"].get("u32"):
                record("police", run(*flt, "prio", "3", *match,
                                     "action", "police", "rate", "1mbit", "burst", "10k", "drop"))
            run(tc, "qdisc", "del", *dev, "handle", "ffff:", "ingress")
    for name in ("hvdoc0", "hvdocifb0", "hvdocwg0"):  # tidy; the namespace dies with us anyway
        run(ip, "link", "del", name)
done()
"""


def _net_child(ip: str | None, tc: str | None) -> dict:
    """Run NET_CHILD, bounded by NET_CHILD_TIMEOUT (its whole process group is SIGKILLed)."""
    per_cmd = max(1.0, NET_CHILD_TIMEOUT / 4)
    argv = [sys.executable, "-c", NET_CHILD, json.dumps({"ip": ip, "tc": tc, "timeout": per_cmd})]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    except OSError as exc:
        return {"child_error": f"cannot start {sys.executable}: {exc.strerror or exc}"}
    try:
        out, err = proc.communicate(timeout=NET_CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            pass
        try:
            proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        return {"child_error": f"the network check child did not finish within {NET_CHILD_TIMEOUT:g} s"}
    try:
        return json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return {"child_error": f"the network check child failed (exit status {proc.returncode}): "
                               f"{tail[0][:200]}"}


# ---- the checks --------------------------------------------------------------------------


class _Doctor:
    def __init__(self) -> None:
        self.problems: list[dict] = []
        self.warnings: list[dict] = []
        self._lock = threading.Lock()

    def problem(self, check: str, message: str, fix: str) -> None:
        with self._lock:
            self.problems.append({"check": check, "message": message, "fix": fix})

    def warn(self, check: str, message: str, fix: str) -> None:
        with self._lock:
            self.warnings.append({"check": check, "message": message, "fix": fix})

    # Each check returns {top-level key: value}.

    def check_kvm(self) -> dict:
        from hived import kvm

        # Fresh, not the per-boot cache: the doctor looks at the host as it is now. A longer
        # budget than the default, so a busy host is not mistaken for a hanging KVM.
        p = kvm.probe(timeout=KVM_TIMEOUT)
        section = {
            "present": p.present,
            "device": p.device,
            "api_version": p.api_version,
            "guest_runs": p.guest_runs,
            "reason": p.reason,
            "guest_mips": p.guest_mips,
            "timed_out": p.timed_out,
            "elapsed_ms": p.elapsed_ms,
        }
        forced = os.environ.get(kvm.ACCEL_ENV, "").strip()
        source = kvm.ACCEL_ENV if forced else "probe"
        try:
            accel = kvm.accelerator()  # what the box will use: the per-boot cache, or the override
        except ValueError as exc:
            env = kvm.ACCEL_ENV
            self.problem("accelerator", str(exc), f"set {env}=kvm or {env}=tcg, or unset it: `unset {env}`")
            accel = None
        if accel == "kvm" and not p.guest_runs:
            if forced:
                self.problem("accelerator", f"{kvm.ACCEL_ENV}={forced} but KVM cannot run guests here "
                             f"({p.reason}): QEMU with -accel kvm would hang",
                             f"unset {kvm.ACCEL_ENV} (the probe then picks tcg): `unset {kvm.ACCEL_ENV}`")
            else:
                self.problem("accelerator", f"the cached KVM probe in {kvm.CACHE_FILE} says guests run, "
                             f"a fresh probe says they do not ({p.reason})",
                             f"remove the stale cache: `rm {kvm.CACHE_FILE}`")
        elif accel == "tcg" and p.guest_runs and not forced:
            self.warn("accelerator", f"KVM runs guests, but the cached probe in {kvm.CACHE_FILE} picks tcg",
                      f"remove the stale cache: `rm {kvm.CACHE_FILE}`")
        if accel == "tcg":
            why = "/dev/kvm does not exist" if not p.present else p.reason
            if forced:
                why = f"{kvm.ACCEL_ENV}={forced}"
            self.warn("kvm", f"cells run under TCG (emulation, several times slower than KVM): {why}",
                      f"unset {kvm.ACCEL_ENV} to let the probe decide" if forced else TCG_FIX)
        return {"kvm": section, "accelerator": accel, "accelerator_source": source}

    def check_cgroup(self) -> dict:
        from hived.box import cgroups

        root = CGROUP_ROOT
        version = cgroups.detect(root)
        controllers: dict[str, bool] = {}
        errors: dict[str, str] = {}
        section = {"version": version or None, "root": str(root), "controllers": controllers,
                   "errors": errors}
        if version == 1:
            mounts = _cgroup_mounts()
            for c in CGROUP_V1:
                d = root / c
                real = os.path.realpath(d)
                mounted = any(mp == real and fstype == "cgroup" and c in sopts
                              for mp, fstype, _, sopts in mounts)
                if not mounted:
                    errors[c] = f"no cgroup v1 {c} hierarchy mounted at {d}"
                elif any(mp == real and "ro" in mopts for mp, _, mopts, _ in mounts):
                    errors[c] = f"{d} is mounted read-only"
                else:
                    err = _try_mkdir(d)
                    if err:
                        errors[c] = err
                controllers[c] = c not in errors
        elif version == 2:
            available = set((root / "cgroup.controllers").read_text().split())
            section["subtree_control"] = (root / "cgroup.subtree_control").read_text().split()
            writable = _try_mkdir(root)
            for c in CGROUP_V2:
                if c not in available:
                    errors[c] = f"{c} is not in {root}/cgroup.controllers"
                elif writable:
                    errors[c] = writable
                controllers[c] = c not in errors
        else:
            self.problem("cgroup", f"no usable cgroup hierarchy at {root}: neither v2 with controllers "
                         "nor v1 with cpuset and memory mounted",
                         "boot with cgroup v2 (kernel command line systemd.unified_cgroup_hierarchy=1) or "
                         f"mount the v1 controllers: `for c in {' '.join(CGROUP_V1)}; do mkdir -p {root}/$c "
                         f"&& mount -t cgroup -o $c cgroup {root}/$c; done`")
            return {"cgroup": section}
        for c in CGROUP_V1 if version == 1 else CGROUP_V2:
            if controllers[c]:
                continue
            if version == 1:
                d = root / c
                if "mounted" in errors[c] or "no cgroup" in errors[c]:
                    fix = f"`mkdir -p {d} && mount -t cgroup -o {c} cgroup {d}`"
                else:
                    fix = f"run hived as root with {d} mounted read-write: `mount -o remount,rw {d}`"
            else:
                fix = (f"enable it in the parent: `echo +{c} > {root}/cgroup.subtree_control` "
                       "(under systemd: Delegate=yes in the unit)")
            report = self.problem if c in CGROUP_REQUIRED else self.warn
            use = "cell limits need it" if c in CGROUP_REQUIRED else "that cell limit is not enforced"
            report("cgroup", f"cgroup v{version} controller {c} is not usable ({errors[c]}): {use}", fix)
        return {"cgroup": section}

    def check_network(self) -> dict:
        ip, tc = _which("ip"), _which("tc")
        child = _net_child(ip, tc)
        child_error = child.get("child_error")
        netns = {"ok": bool(child.get("netns")), "method": "unshare(CLONE_NEWNET) in a child process",
                 "error": child_error or child.get("netns_error")}
        if not netns["ok"]:
            self.problem("netns", f"cannot create a network namespace: {netns['error']}",
                         "run hived as root (it needs CAP_SYS_ADMIN; in a container: --privileged) "
                         "on a kernel with CONFIG_NET_NS=y")

        tun = {"ok": False, "path": TUN_PATH, "tap": child.get("tap"), "error": None}
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            tun["error"] = f"cannot open {TUN_PATH}: {exc.strerror or exc}"
        else:
            os.close(fd)
            tun["ok"] = True
        if not tun["ok"]:
            self.problem("tun", tun["error"],
                         "`modprobe tun`; if the node is missing: `mkdir -p /dev/net && "
                         "mknod /dev/net/tun c 10 200 && chmod 600 /dev/net/tun` (as root)")
        elif tun["tap"] is False:
            tun["ok"] = False
            tun["error"] = child.get("tap_error")
            self.problem("tun", f"{TUN_PATH} opens but a tap cannot be made: {tun['error']}",
                         "run hived as root (it needs CAP_NET_ADMIN) on a kernel with CONFIG_TUN")

        results: dict = child.get("tc", {})
        tc_errors: dict = dict(child.get("tc_errors", {}))
        section: dict = {"ok": False, "tc": tc, "ip": ip, "qdiscs": {}, "filters": {}, "actions": {},
                         "ifb": results.get("ifb"), "errors": tc_errors,
                         "not_needed": sorted(TC_NOT_NEEDED)}
        for name, (group, _) in {**TC_NEEDED, **TC_NOT_NEEDED}.items():
            if group:
                section[group][name] = results.get(name)  # None: not tried
        if not netns["ok"]:
            self.warn("tc", "tc not tested: no network namespace to test it in", "fix netns first")
        elif ip is None or tc is None:
            missing = " and ".join(n for n, p in (("ip", ip), ("tc", tc)) if p is None)
            self.warn("tc", f"{missing} not found on PATH: cells get no network bandwidth limits",
                      _install("iproute2"))
        elif child.get("veth_error"):
            self.warn("tc", f"cannot make a veth pair to test tc on: {child['veth_error']}",
                      "`modprobe veth` (kernel CONFIG_VETH)")
        else:
            bad = [n for n in TC_NEEDED if not results.get(n)]
            for name in bad:
                module = TC_NEEDED[name][1]
                why = tc_errors.get(name) or "not tested (an earlier step failed)"
                self.warn("tc", f"tc {name} does not work ({why}): cells' bandwidth limits need it",
                          f"`modprobe {module}` (a Debian linux-image-* kernel ships it)")
            section["ok"] = not bad

        wg_go, wg = _which("wireguard-go"), _which("wg")
        kernel = child.get("wireguard")
        used = "kernel" if kernel else ("wireguard-go" if wg_go else None)
        wireguard = {"kernel": kernel, "kernel_error": child.get("wireguard_error"),
                     "kernel_module_loaded": os.path.isdir("/sys/module/wireguard"),
                     "wireguard_go": wg_go, "wireguard_go_version": _version(wg_go) if wg_go else None,
                     "wg": wg, "used": used}
        if used is None:
            self.warn("wireguard", "no WireGuard: no kernel module and no wireguard-go on PATH "
                      "(needed for Secure Compute cells)",
                      _install("--no-install-recommends", "wireguard-go", "wireguard-tools"))
        return {"netns": netns, "tun": tun, "tc": section, "wireguard": wireguard}

    def check_qemu(self) -> dict:
        path = _which(QEMU)
        section: dict = {"path": path, "version": None, "microvm": None, "accels": None}
        if path is None:
            self.problem("qemu", f"{QEMU} not found on PATH: cells cannot boot", _install(PACKAGES[QEMU]))
            return {"qemu": section}
        section["version"] = _version(path)
        rc, out, err = _run([path, "-machine", "help"])
        if rc == 0:
            section["microvm"] = bool(re.search(r"^microvm\s", out, re.MULTILINE))
        rc2, out2, _ = _run([path, "-accel", "help"])
        if rc2 == 0:
            section["accels"] = [ln.strip() for ln in out2.splitlines()[1:] if ln.strip()]
        if section["version"] is None or rc != 0:
            self.problem("qemu", f"{path} does not run: {_first_line(err) or 'no output'}",
                         f"reinstall it: `apt-get install --reinstall {PACKAGES[QEMU]}`")
        elif not section["microvm"]:
            self.problem("qemu", f"{path} (version {section['version']}) has no microvm machine type",
                         f"{_install(PACKAGES[QEMU])} (Debian 12 or newer)")
        return {"qemu": section}

    def check_crun(self) -> dict:
        path = _which("crun")
        if path is None:
            self.warn("crun", "crun not found on PATH (the OCI runtime for build containers)",
                      _install("crun"))
        return {"crun": {"path": path, "version": _version(path) if path else None}}

    def check_firecracker(self) -> dict:
        path = _which("firecracker")
        if path is None:
            self.warn("firecracker", "firecracker not found on PATH (optional: cells use QEMU microvm)",
                      "download a release from https://github.com/firecracker-microvm/firecracker/releases "
                      "and install it as /usr/local/bin/firecracker (it is not packaged in Debian)")
        version = _version(path, r"firecracker\s+v?(\S+)") if path else None
        return {"firecracker": {"path": path, "version": version}}

    def check_tools(self) -> dict:
        tools = {name: _which(name) for name in (*REQUIRED_TOOLS, *OPTIONAL_TOOLS)}
        for name, path in tools.items():
            if path is None:
                report = self.problem if name in REQUIRED_TOOLS else self.warn
                report(f"tools.{name}", f"{name} not found on PATH ({TOOL_USE[name]})",
                       _install(PACKAGES[name]))
        return {"tools": tools}

    def check_image(self) -> dict:
        from hived import image

        found = image.find_image()
        if found is None:
            root = image.default_dest()
            current = root / "current"
            stale = f"; {current} is from other hived code" if current.exists() else ""
            self.warn("image", f"no cell image for the current hived code in {root}{stale}",
                      "run `hived image build`")
        return {"image": str(found) if found is not None else None}

    def check_native(self) -> dict:
        from hived import native

        st = native.status()
        in_use = {}
        for compiled in native.TWINS:
            try:
                mod = native.load(compiled)
                in_use[compiled] = "cython" if mod.__name__ == compiled else "python"
            except ImportError:
                in_use[compiled] = None
        section = {"compiled": st["compiled"], "modules": st["modules"], "in_use": in_use,
                   "pure_python_forced": st["pure_python_forced"]}
        if not st["compiled"]:
            missing = ", ".join(m for m, ok in st["modules"].items() if not ok)
            self.problem("native", f"native modules not compiled: {missing} (slow pure-Python twins are "
                         "used; without hived._kvm the KVM probe cannot run)",
                         "rebuild them from the hived source tree: `pip install -e .` "
                         f"(needs a C compiler: `{_install('build-essential')}`)")
        if st["pure_python_forced"]:
            self.warn("native", "HIVED_PUREPYTHON is set: the pure-Python twins are used (slower)",
                      "unset it: `unset HIVED_PUREPYTHON`")
        return {"native": section}


# (check name, top-level keys it fills, method)
CHECKS = (
    ("kvm", ("kvm", "accelerator", "accelerator_source"), _Doctor.check_kvm),
    ("cgroup", ("cgroup",), _Doctor.check_cgroup),
    ("network", ("netns", "tun", "tc", "wireguard"), _Doctor.check_network),
    ("qemu", ("qemu",), _Doctor.check_qemu),
    ("firecracker", ("firecracker",), _Doctor.check_firecracker),
    ("crun", ("crun",), _Doctor.check_crun),
    ("tools", ("tools",), _Doctor.check_tools),
    ("image", ("image",), _Doctor.check_image),
    ("native", ("native",), _Doctor.check_native),
)
ORDER = ("kvm", "accelerator", "cgroup", "netns", "tun", "tc", "wireguard", "qemu", "firecracker", "crun",
         "tools", "image", "native")


def _order(entry: dict) -> int:
    head = entry["check"].split(".")[0]
    return ORDER.index(head) if head in ORDER else len(ORDER)


def run_checks(deadline: float = DEADLINE) -> dict:
    """Run every check concurrently (each in a daemon thread); never raises."""
    started = time.monotonic()
    doc = _Doctor()
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}

    def runner(name, method):
        t0 = time.monotonic()
        try:
            results[name] = method(doc)
        except Exception as exc:  # a check must never take the doctor down
            errors[name] = f"{type(exc).__name__}: {exc}"
        timings[name] = round((time.monotonic() - t0) * 1000.0, 1)

    # The modules the checks import, imported here first, one thread: two check threads
    # importing in crossed order trip Python's import deadlock detection, which hands one
    # of them a partially initialised module ("partially initialized module 'typing' has
    # no attribute 'ClassVar'", seen in `make demo` on a loaded machine). A module that
    # fails to import fails again in its check, which reports it.
    for module in ("hived.kvm", "hived.box.cgroups", "hived.image", "hived.native"):
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    threads = []
    for name, _, method in CHECKS:
        t = threading.Thread(target=runner, args=(name, method), name=f"doctor-{name}", daemon=True)
        t.start()
        threads.append((name, t))
    for name, t in threads:
        t.join(max(0.0, deadline - (time.monotonic() - started)))
        if t.is_alive():
            errors[name] = f"did not finish within {deadline:g} s"

    report: dict = {}
    for name, keys, _ in CHECKS:
        got = results.get(name)
        if got is None and name not in errors:
            errors[name] = "produced no result"
        for key in keys:
            report[key] = got.get(key) if got else None
        if name in errors:
            doc.problem(name, f"the {name} check failed: {errors[name]}",
                        f"run `python3 -m hived doctor --json` and report the output with this message "
                        f"as a hived bug; meanwhile check {name} by hand")
    with doc._lock:
        report["problems"] = sorted(doc.problems, key=_order)
        report["warnings"] = sorted(doc.warnings, key=_order)
    report["ok"] = not report["problems"]
    report["timings_ms"] = dict(timings)
    report["elapsed_ms"] = round((time.monotonic() - started) * 1000.0, 1)
    return report


# ---- human output ----------------------------------------------------------------------------

OK, FAIL, WARN = "✓", "✗", "!"


def _mark(report: dict, check: str) -> str:
    def hits(entries):
        return any(e.get("check") == check or str(e.get("check", "")).startswith(check + ".")
                   for e in entries or [])

    if hits(report.get("problems")):
        return FAIL
    if hits(report.get("warnings")):
        return WARN
    return OK


def _g(section, key, default=None):
    return section.get(key, default) if isinstance(section, dict) else default


def _summaries(r: dict) -> list[tuple[str, str]]:
    kvm = r.get("kvm")
    if not isinstance(kvm, dict):
        kvm_line = "not checked"
    elif not kvm.get("present"):
        kvm_line = f"{kvm.get('device')} absent"
    else:
        runs = "guests run" if kvm.get("guest_runs") else f"not usable for guests: {kvm.get('reason')}"
        api = f" (API {kvm['api_version']})" if kvm.get("api_version") is not None else ""
        kvm_line = f"{kvm.get('device')} present{api}; {runs}"
    accel = r.get("accelerator") or "undecided"
    source = r.get("accelerator_source")

    cg = r.get("cgroup")
    if isinstance(cg, dict) and cg.get("version"):
        ctl = _g(cg, "controllers", {})
        usable = " ".join(c for c, ok in ctl.items() if ok) or "none"
        unusable = [c for c, ok in ctl.items() if not ok]
        cg_line = f"v{cg['version']} at {cg.get('root')}: {usable}" + (
            f" (not usable: {' '.join(unusable)})" if unusable else "")
    else:
        cg_line = "no usable hierarchy"

    netns = r.get("netns")
    netns_line = "can create network namespaces" if _g(netns, "ok") else f"no: {_g(netns, 'error')}"
    tun = r.get("tun")
    tun_line = f"{TUN_PATH} opens, taps work" if _g(tun, "ok") else f"no: {_g(tun, 'error')}"

    tc = r.get("tc")
    if isinstance(tc, dict):
        tried = {**tc.get("qdiscs", {}), **tc.get("filters", {}), **tc.get("actions", {}),
                 "ifb": tc.get("ifb")}
        works = " ".join(n for n, ok in tried.items() if ok) or "nothing"
        fails = [n for n, ok in tried.items() if ok is False]
        tc_line = f"works: {works}" + (f"; does not: {' '.join(fails)}" if fails else "")
        if any(n in tc.get("not_needed", []) for n in fails):
            tc_line += " (police is not needed: guest->host goes through ifb + tbf)"
    else:
        tc_line = "not checked"

    wg = r.get("wireguard")
    if _g(wg, "used") == "kernel":
        wg_line = "kernel module"
    elif _g(wg, "used") == "wireguard-go":
        wg_line = f"wireguard-go {_g(wg, 'wireguard_go')} (no kernel module)"
    else:
        wg_line = "none"

    def binary(name):
        s = r.get(name)
        if not _g(s, "path"):
            return "not found"
        return f"{s['path']} {s.get('version') or '(version unknown)'}"

    tools = r.get("tools") if isinstance(r.get("tools"), dict) else {}
    missing = [n for n, p in tools.items() if not p]
    tools_line = ("all found" if not missing else f"missing: {' '.join(missing)}") if tools else "not checked"

    nat = r.get("native")
    if isinstance(nat, dict):
        uses = ", ".join(f"{m.split('.')[-1].lstrip('_')}={u}" for m, u in nat.get("in_use", {}).items())
        nat_line = ("compiled" if nat.get("compiled") else "NOT compiled") + f"; in use: {uses}"
    else:
        nat_line = "not checked"

    return [
        ("kvm", kvm_line),
        ("accelerator", f"{accel} ({'from the KVM probe' if source == 'probe' else f'set by {source}'})"),
        ("cgroup", cg_line),
        ("netns", netns_line),
        ("tun", tun_line),
        ("tc", tc_line),
        ("wireguard", wg_line),
        ("qemu", binary("qemu")),
        ("firecracker", binary("firecracker")),
        ("crun", binary("crun")),
        ("tools", tools_line),
        ("image", r.get("image") or "not built"),
        ("native", nat_line),
    ]


def render(report: dict) -> str:
    """Human text: one line per check (✓ fine, ! warning, ✗ problem), then problems and warnings."""
    lines = [f"{_mark(report, name)} {name:<12} {text}" for name, text in _summaries(report)]
    for title, key, mark in (("Problems", "problems", FAIL), ("Warnings", "warnings", WARN)):
        entries = report.get(key) or []
        if entries:
            lines += ["", f"{title}:"]
            for e in entries:
                lines.append(f"{mark} {e['check']}: {e['message']}")
                lines.append(f"    fix: {e['fix']}")
    n_p, n_w = len(report.get("problems") or []), len(report.get("warnings") or [])
    verdict = "ready" if report.get("ok") else "NOT ready"
    lines += ["", f"hived doctor: {verdict} ({n_p} problem(s), {n_w} warning(s), "
                  f"{report.get('elapsed_ms', 0):.0f} ms)"]
    return "\n".join(lines)

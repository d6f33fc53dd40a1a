"""Can this host's /dev/kvm really run guests?  Pick the accelerator: kvm or tcg.

/dev/kvm existing, opening, and answering KVM_GET_API_VERSION proves little: a
paravirtualised KVM (PVM) answers all of that like hardware KVM, yet an
ordinary guest crawls through KVM's instruction emulator (~2 M instructions/s)
and `qemu -enable-kvm` looks hung.  So the native probe (hived._kvm, built
from _native/kvm_probe_src.c) runs a tiny guest: a real-mode OUT+HLT, then a
64-bit loop whose speed must be native.

The probe runs in a child process (``python -m hived.kvm --child DEVICE``)
that is SIGKILLed if it does not answer in time, so even a kernel that blocks
uninterruptibly in KVM_RUN cannot hang the caller.  Results are cached per
boot in /run/hived/kvm-probe.json.

Standard library only at import time (the guest imports the hived package);
hived._kvm is imported lazily.

    python -m hived.kvm            # probe /dev/kvm, print JSON
    python -m hived.kvm --device D --timeout S
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

DEFAULT_DEVICE = "/dev/kvm"
DEFAULT_TIMEOUT = 2.0
ACCEL_ENV = "HIVED_ACCEL"
ACCELERATORS = ("kvm", "tcg")
CACHE_FILE = "/run/hived/kvm-probe.json"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
NATIVE_MODULE = "hived._kvm"
NOT_COMPILED_REASON = "native module hived._kvm is not compiled: reinstall with `pip install .`"
_CHILD_NO_ANSWER = "probe child did not answer within"
_CHILD_FAILED = "probe child failed"


@dataclass
class KvmProbe:
    present: bool
    device: str
    api_version: int | None
    extensions: dict[str, bool]
    guest_runs: bool
    reason: str
    elapsed_ms: float
    # Details from the native probe (defaults when it did not get that far).
    errno: int | None = None
    exit_reasons: list[str] = field(default_factory=list)
    timed_out: bool = False
    guest_mips: float | None = None  # 64-bit guest speed, million instructions/s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KvmProbe":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- native module ------------------------------------------------------


_native_state: dict[str, object] = {}


def _native():
    """The compiled hived._kvm module, or None (the import error is remembered)."""
    if "module" not in _native_state:
        try:
            from hived import _kvm  # lazy: keeps import of hived.kvm stdlib-only
        except ImportError as exc:
            _native_state["module"] = None
            _native_state["error"] = str(exc)
        else:
            _native_state["module"] = _kvm
    return _native_state["module"]


def native_compiled() -> bool:
    """True if hived._kvm is built and importable."""
    return _native() is not None


def _no_guest(device: str, started: float, reason: str, timed_out: bool = False) -> KvmProbe:
    """The probe's answer when no guest ran, and why."""
    return KvmProbe(present=os.path.exists(device), device=device, api_version=None, extensions={},
                    guest_runs=False, reason=reason, elapsed_ms=_ms_since(started), timed_out=timed_out)


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000.0, 1)


def native_probe(device: str = DEFAULT_DEVICE, timeout_ms: int = 1000) -> dict:
    """Run the C probe in this process and return its result as a KvmProbe dict.

    Bounded by timeout_ms through a SIGALRM timer on the calling thread (the
    previous SIGALRM handler is restored), but a kernel that blocks
    uninterruptibly would still hang this process: prefer probe(), which
    runs this in a child.
    """
    started = time.monotonic()
    mod = _native()
    if mod is None:
        return _no_guest(device, started, NOT_COMPILED_REASON).to_dict()
    ffi, lib = mod.ffi, mod.lib
    res = ffi.new("struct hived_kvm_result *")
    lib.hived_kvm_probe(os.fsencode(device), int(timeout_ms), res)
    extensions = {  # only those actually asked (-1: the device was never queried)
        ffi.string(lib.hived_kvm_ext_name(i)).decode(): res.ext[i] > 0
        for i in range(res.n_ext)
        if res.ext[i] >= 0
    }
    exits = [ffi.string(lib.hived_kvm_exit_name(res.exits[i])).decode() for i in range(res.n_exits)]
    return KvmProbe(
        present=bool(res.present),
        device=device,
        api_version=res.api_version if res.api_version >= 0 else None,
        extensions=extensions,
        guest_runs=bool(res.guest_runs),
        reason=ffi.string(res.reason).decode("utf-8", "replace"),
        elapsed_ms=round(res.elapsed_ms, 1),
        errno=res.err or None,
        exit_reasons=exits,
        timed_out=bool(res.timed_out),
        guest_mips=round(res.guest_mips, 2) if res.guest_mips > 0 else None,
    ).to_dict()


# ---- probe in a child process --------------------------------------------


def _native_timeout_ms(timeout: float) -> int:
    """The child's own KVM deadline: half the budget, leaving the rest for
    interpreter start-up, so the child usually reports *what* timed out."""
    return max(1, int(timeout * 1000 / 2))


def _child_command(device: str, timeout_ms: int) -> list[str]:
    return [sys.executable, "-m", "hived.kvm", "--child", device, "--timeout-ms", str(timeout_ms)]


def _child_env() -> dict[str, str]:
    """The environment for the child: make sure it imports this very package."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    return env


def probe(device: str = DEFAULT_DEVICE, timeout: float = DEFAULT_TIMEOUT) -> KvmProbe:
    """Probe `device` by running a tiny guest, in a child process bounded by `timeout` s."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    started = time.monotonic()
    if not native_compiled():
        return _no_guest(device, started, NOT_COMPILED_REASON)

    def failed(reason: str, timed_out: bool = False) -> KvmProbe:
        return _no_guest(device, started, reason, timed_out)

    cmd = _child_command(device, _native_timeout_ms(timeout))
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(),
            close_fds=True,
        )
    except OSError as exc:
        return failed(f"{_CHILD_FAILED}: cannot start {cmd[0]}: {exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        try:
            proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel (D state): abandon it rather than hang too
        return failed(f"{_CHILD_NO_ANSWER} {timeout:g} s (killed it)", timed_out=True)

    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        data = json.loads(lines[-1])
        result = KvmProbe.from_dict(data)
    except (IndexError, ValueError, TypeError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return failed(f"{_CHILD_FAILED} (exit status {proc.returncode}): {tail[0][:200]}")
    result.elapsed_ms = _ms_since(started)
    return result


# ---- per-boot cache ---------------------------------------------------------


def _boot_id() -> str | None:
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _read_cache(boot_id: str) -> dict:
    """{device: probe dict} for this boot, or {}."""
    try:
        with open(CACHE_FILE, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            if st.st_uid not in (0, os.geteuid()):
                return {}  # written by someone we should not trust
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("boot_id") != boot_id:
        return {}
    probes = data.get("probes")
    return probes if isinstance(probes, dict) else {}


def _write_cache(boot_id: str, probes: dict) -> None:
    """Atomically replace the cache; silently do nothing if it can't be written."""
    directory = os.path.dirname(CACHE_FILE)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kvm-probe.", dir=directory)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"boot_id": boot_id, "probes": probes}, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, CACHE_FILE)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _cacheable(p: KvmProbe, timeout: float) -> bool:
    if p.reason == NOT_COMPILED_REASON or p.reason.startswith(_CHILD_FAILED):
        return False  # a packaging or start-up fault, not a fact about this boot's KVM
    if p.reason.startswith(_CHILD_NO_ANSWER):
        return timeout >= DEFAULT_TIMEOUT  # a short budget proves nothing about the host
    return True


def cached_probe(device: str = DEFAULT_DEVICE, timeout: float = DEFAULT_TIMEOUT) -> KvmProbe:
    """probe(device), at most once per boot (cache keyed by boot_id + device)."""
    boot_id = _boot_id()
    if boot_id is None:
        return probe(device, timeout)
    hit = _read_cache(boot_id).get(device)
    if isinstance(hit, dict):
        try:
            return KvmProbe.from_dict(hit)
        except TypeError:
            pass  # stale layout: probe again
    result = probe(device, timeout)
    if _cacheable(result, timeout):
        probes = _read_cache(boot_id)  # re-read: another device may have been added
        probes[device] = result.to_dict()
        _write_cache(boot_id, probes)
    return result


def accelerator(device: str = DEFAULT_DEVICE) -> str:
    """Return "kvm" if a guest really runs on `device`, else "tcg".

    HIVED_ACCEL=kvm|tcg overrides the probe (empty or unset: probe).
    """
    forced = os.environ.get(ACCEL_ENV, "").strip()
    if forced:
        if forced.lower() not in ACCELERATORS:
            allowed = " or ".join(ACCELERATORS)
            raise ValueError(f"{ACCEL_ENV}={forced!r} is not valid: use {allowed} (or unset it)")
        return forced.lower()
    return "kvm" if cached_probe(device).guest_runs else "tcg"


# ---- command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse  # only for the command line

    parser = argparse.ArgumentParser(prog="python -m hived.kvm", description=__doc__.split("\n")[0])
    parser.add_argument("--child", metavar="DEVICE", help=argparse.SUPPRESS)
    parser.add_argument("--timeout-ms", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=DEFAULT_DEVICE)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    parser.add_argument("--cached", action="store_true", help="use the per-boot cache")
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(native_probe(args.child, args.timeout_ms)), flush=True)
        return 0
    get = cached_probe if args.cached else probe
    print(json.dumps(get(args.device, args.timeout).to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

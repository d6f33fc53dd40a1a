"""The KVM probe, against the real /dev/kvm of this machine.

Honest on any host: the expected accelerator follows the probe's own verdict.
What is checked about that verdict:
  * a guest that "runs" must have run natively (fast enough), and
  * a host whose CPU has neither vmx nor svm (e.g. a paravirtualised KVM,
    as on the development machines) must NOT be reported as able to run guests.
hived._kvm must be compiled (native.compiled is required): its absence fails
these tests, it does not skip them.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from hived import kvm

DEVICE = "/dev/kvm"
TIMEOUT = 2.0
SLACK = 1.5  # seconds on top of the timeout: kill, reap, interpreter noise

needs_kvm = pytest.mark.skipif(
    not os.path.exists(DEVICE), reason=f"{DEVICE} is absent on this machine"
)


def _cpu_has_hw_virt() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return True  # unknown: make no claim
    return bool(flags & {"vmx", "svm"})


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Never read or write the real /run/hived cache, and no override from outside."""
    monkeypatch.setattr(kvm, "CACHE_FILE", str(tmp_path / "run" / "kvm-probe.json"))
    monkeypatch.delenv(kvm.ACCEL_ENV, raising=False)


@pytest.fixture(scope="module")
def real_probe():
    if not os.path.exists(DEVICE):
        pytest.skip(f"{DEVICE} is absent on this machine")
    assert kvm.native_compiled(), kvm.NOT_COMPILED_REASON
    t0 = time.monotonic()
    p = kvm.probe(DEVICE, timeout=TIMEOUT)
    wall = time.monotonic() - t0
    print(f"probe of {DEVICE} took {wall:.3f} s: {json.dumps(p.to_dict())}")
    return p, wall


def test_native_module_is_compiled():
    assert kvm.native_compiled(), kvm.NOT_COMPILED_REASON
    from hived import _kvm

    assert _kvm.lib.KVM_API_VERSION == 12
    assert _kvm.ffi.string(_kvm.lib.hived_kvm_exit_name(2)) == b"KVM_EXIT_IO"
    assert _kvm.ffi.string(_kvm.lib.hived_kvm_exit_name(5)) == b"KVM_EXIT_HLT"
    names = {
        _kvm.ffi.string(_kvm.lib.hived_kvm_ext_name(i)).decode()
        for i in range(_kvm.lib.hived_kvm_n_ext())
    }
    assert {"KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
            "KVM_CAP_IRQCHIP", "KVM_CAP_HLT"} <= names


@needs_kvm
def test_real_device_answers_in_time(real_probe):
    p, wall = real_probe
    assert p.present is True
    assert p.device == DEVICE
    assert p.api_version == 12
    assert p.extensions.get("KVM_CAP_USER_MEMORY") is True
    assert wall < TIMEOUT + SLACK, f"probe took {wall:.2f} s"
    assert p.elapsed_ms < (TIMEOUT + SLACK) * 1000
    assert p.reason


@needs_kvm
def test_real_device_verdict_is_consistent(real_probe):
    p, _ = real_probe
    if p.guest_runs:
        assert p.reason.startswith("guest ran")
        assert p.exit_reasons == ["KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_IO", "KVM_EXIT_HLT"]
        assert p.guest_mips is not None and p.guest_mips >= 20
        assert p.timed_out is False
    else:
        # says what failed: a KVM ioctl, an exit, the speed, or the deadline
        assert any(
            word in p.reason
            for word in ("KVM_", "exit reason", "instr/s", "timed out", "did not answer")
        ), p.reason


@needs_kvm
def test_no_hardware_virtualisation_means_no_guest(real_probe):
    """A KVM without vmx/svm (paravirtualised) must not pass for a usable one."""
    p, _ = real_probe
    if _cpu_has_hw_virt():
        pytest.skip("CPU has vmx/svm: no paravirtualised-KVM expectation here")
    assert p.guest_runs is False, p.reason
    assert "emulated" in p.reason or "timed out" in p.reason or "never" in p.reason, p.reason


@needs_kvm
def test_accelerator_follows_probe(real_probe):
    p, _ = real_probe
    assert kvm.accelerator(DEVICE) == ("kvm" if p.guest_runs else "tcg")


def test_nonexistent_device():
    assert kvm.native_compiled(), kvm.NOT_COMPILED_REASON
    path = "/nonexistent/hived-test-kvm"
    p = kvm.probe(path, timeout=TIMEOUT)
    assert p.present is False
    assert p.guest_runs is False
    assert path in p.reason
    assert "ENOENT" in p.reason
    assert p.errno == 2
    assert kvm.accelerator(path) == "tcg"


def test_native_probe_in_process_nonexistent_device():
    """The C function itself, in this process: no device, nothing to hang on."""
    import signal

    before = signal.getsignal(signal.SIGALRM)
    d = kvm.native_probe("/nonexistent/kvm", 100)
    assert d["present"] is False and d["guest_runs"] is False
    assert "/nonexistent/kvm" in d["reason"]
    assert d["extensions"] == {}
    assert signal.getsignal(signal.SIGALRM) == before


@needs_kvm
def test_native_probe_in_process_restores_sigalrm():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    d = kvm.native_probe(DEVICE, 500)
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert d["present"] is True and d["api_version"] == 12
    assert signal.getsignal(signal.SIGALRM) == before


@needs_kvm
def test_tiny_timeout_returns_promptly():
    assert kvm.native_compiled(), kvm.NOT_COMPILED_REASON
    t0 = time.monotonic()
    p = kvm.probe(DEVICE, timeout=0.05)
    wall = time.monotonic() - t0
    assert wall < 0.05 + SLACK, f"took {wall:.2f} s"
    assert p.reason
    if not p.guest_runs:
        assert p.timed_out or "did not answer" in p.reason or "timed out" in p.reason \
            or "emulated" in p.reason, p.reason


@needs_kvm
def test_native_deadline_interrupts_kvm_run():
    """A 1 ms native deadline stops whatever the vCPU is doing, with a reason."""
    t0 = time.monotonic()
    d = kvm.native_probe(DEVICE, 1)
    assert time.monotonic() - t0 < SLACK
    if not d["guest_runs"]:
        assert d["reason"]


def test_hung_child_is_killed(monkeypatch):
    """A child that never answers (like a kernel stuck in KVM_RUN) is SIGKILLed."""
    assert kvm.native_compiled(), kvm.NOT_COMPILED_REASON
    monkeypatch.setattr(
        kvm, "_child_command",
        lambda device, ms: [sys.executable, "-c", "import time; time.sleep(60)"],
    )
    t0 = time.monotonic()
    p = kvm.probe(DEVICE, timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert p.guest_runs is False
    assert p.timed_out is True
    assert p.reason == "probe child did not answer within 0.5 s (killed it)"


def test_broken_child_is_reported(monkeypatch):
    monkeypatch.setattr(
        kvm, "_child_command",
        lambda device, ms: [sys.executable, "-c", "import sys; sys.exit('boom')"],
    )
    p = kvm.probe(DEVICE, timeout=TIMEOUT)
    assert p.guest_runs is False
    assert p.reason.startswith("probe child failed") and "boom" in p.reason


def test_child_mode_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "hived.kvm", "--child", "/nonexistent/kvm", "--timeout-ms", "100"],
        capture_output=True, text=True, timeout=30, env=kvm._child_env(), check=True,
    ).stdout
    d = json.loads(out)
    assert d["present"] is False and d["device"] == "/nonexistent/kvm"


def test_not_compiled_fallback(monkeypatch):
    monkeypatch.setattr(kvm, "native_compiled", lambda: False)
    p = kvm.probe(DEVICE)
    assert p.guest_runs is False
    assert p.present is os.path.exists(DEVICE)
    assert p.reason == kvm.NOT_COMPILED_REASON


@pytest.mark.parametrize("value", ["kvm", "tcg"])
def test_accel_override(monkeypatch, value):
    def no_probe(*a, **k):
        raise AssertionError("HIVED_ACCEL must short-circuit the probe")

    monkeypatch.setattr(kvm, "probe", no_probe)
    monkeypatch.setenv("HIVED_ACCEL", value)
    assert kvm.accelerator() == value


@pytest.mark.parametrize("value", ["qemu", "KVM!", "hvf"])
def test_accel_override_bad_value(monkeypatch, value):
    monkeypatch.setenv("HIVED_ACCEL", value)
    with pytest.raises(ValueError) as e:
        kvm.accelerator()
    assert "HIVED_ACCEL" in str(e.value)
    assert "kvm" in str(e.value) and "tcg" in str(e.value)


def test_cache_is_per_boot_and_device(monkeypatch):
    calls = []

    def fake_probe(device, timeout=kvm.DEFAULT_TIMEOUT):
        calls.append(device)
        return kvm.KvmProbe(True, device, 12, {}, device == "/dev/a", "fake", 1.0)

    monkeypatch.setattr(kvm, "probe", fake_probe)
    monkeypatch.setattr(kvm, "_boot_id", lambda: "boot-1")
    assert kvm.cached_probe("/dev/a").guest_runs is True
    assert kvm.cached_probe("/dev/b").guest_runs is False
    assert kvm.cached_probe("/dev/a").guest_runs is True
    assert kvm.accelerator("/dev/b") == "tcg"
    assert calls == ["/dev/a", "/dev/b"]
    with open(kvm.CACHE_FILE, encoding="utf-8") as f:
        data = json.load(f)
    assert data["boot_id"] == "boot-1" and set(data["probes"]) == {"/dev/a", "/dev/b"}

    monkeypatch.setattr(kvm, "_boot_id", lambda: "boot-2")  # rebooted: probe again
    kvm.cached_probe("/dev/a")
    assert calls == ["/dev/a", "/dev/b", "/dev/a"]


def test_cache_skips_not_compiled(monkeypatch):
    monkeypatch.setattr(kvm, "native_compiled", lambda: False)
    kvm.cached_probe(DEVICE)
    assert not os.path.exists(kvm.CACHE_FILE)


def test_unwritable_cache_is_not_an_error(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(kvm, "CACHE_FILE", str(blocker / "kvm-probe.json"))
    monkeypatch.setattr(
        kvm, "probe", lambda device, timeout=2.0: kvm.KvmProbe(False, device, None, {}, False,
                                                               "fake", 0.0)
    )
    assert kvm.cached_probe("/dev/x").reason == "fake"


def test_import_is_stdlib_only():
    code = (
        "import sys, hived.kvm; "
        "bad = sorted(m for m in sys.modules if m.startswith(('hived._kvm', 'cffi', '_cffi')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=kvm._child_env(), timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr

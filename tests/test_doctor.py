"""`hived doctor`: run for real on this host, as a subprocess; no mocks of the host."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)

DOCTOR_TIMEOUT = 60  # the doctor bounds itself far below this; this only guards the test


def _env(**overrides) -> dict:
    env = dict(os.environ)
    for key in ("HIVED_ACCEL", "HIVED_PUREPYTHON"):
        env.pop(key, None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(overrides)
    return env


def doctor(*args: str, python: str = sys.executable, **env) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "hived", "doctor", *args], capture_output=True, text=True,
                          timeout=DOCTOR_TIMEOUT, env=_env(**env), cwd=ROOT)


def doctor_json(**env) -> tuple[dict, subprocess.CompletedProcess]:
    proc = doctor("--json", **env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout), proc


@pytest.fixture(scope="module")
def report() -> dict:
    r, proc = doctor_json()
    assert proc.returncode == (0 if r["ok"] else 1)
    return r


def _is_path_or_none(value) -> bool:
    return value is None or (isinstance(value, str) and os.path.isabs(value))


def test_report_keys_and_types(report):
    kvm = report["kvm"]
    assert isinstance(kvm["present"], bool)
    assert isinstance(kvm["guest_runs"], bool)
    assert isinstance(kvm["reason"], str) and kvm["reason"]
    assert kvm["api_version"] is None or isinstance(kvm["api_version"], int)
    assert report["accelerator"] in ("kvm", "tcg")
    assert report["accelerator_source"] == "probe"

    cg = report["cgroup"]
    assert cg["version"] in (1, 2)
    assert isinstance(cg["controllers"], dict)
    assert all(isinstance(v, bool) for v in cg["controllers"].values())
    assert {"cpuset", "cpu", "memory", "pids"} <= set(cg["controllers"])
    assert ("blkio" if cg["version"] == 1 else "io") in cg["controllers"]

    for key in ("netns", "tun", "tc"):
        assert isinstance(report[key]["ok"], bool), key
    assert isinstance(report["tc"]["qdiscs"], dict)
    wg = report["wireguard"]
    assert wg["used"] in ("kernel", "wireguard-go", None)
    assert wg["kernel"] in (True, False, None)

    assert _is_path_or_none(report["qemu"]["path"])
    assert _is_path_or_none(report["firecracker"]["path"])
    assert _is_path_or_none(report["crun"]["path"])
    for tool in ("debootstrap", "mke2fs", "mkfs.erofs", "cpio", "busybox"):
        assert _is_path_or_none(report["tools"][tool]), tool
    assert report["image"] is None or os.path.isdir(report["image"])

    native = report["native"]
    assert isinstance(native["compiled"], bool)
    assert all(isinstance(v, bool) for v in native["modules"].values())
    assert native["pure_python_forced"] is False
    assert set(native["in_use"]) == {"hived._framing", "hived._tokenbucket"}

    assert isinstance(report["ok"], bool)
    for key in ("problems", "warnings"):
        for entry in report[key]:
            assert set(entry) == {"check", "message", "fix"}, entry
            assert all(isinstance(v, str) and v for v in entry.values()), entry
    assert report["ok"] == (not report["problems"])


def test_accelerator_follows_the_kvm_probe(report):
    assert report["accelerator"] == ("kvm" if report["kvm"]["guest_runs"] else "tcg")
    if not report["kvm"]["guest_runs"]:
        assert report["kvm"]["reason"]


def test_cgroup_version_matches_the_host(report):
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    if controllers.exists() and controllers.read_text().split():
        expected = 2
    elif (root / "memory").is_dir() and (root / "cpuset").is_dir():
        expected = 1
    else:
        pytest.fail("this host has no usable cgroup hierarchy at all")
    assert report["cgroup"]["version"] == expected
    if expected == 1:
        mounted = {c for c in ("cpuset", "cpu", "memory", "pids", "blkio") if (root / c).is_dir()}
        usable = {c for c, ok in report["cgroup"]["controllers"].items() if ok}
        assert usable <= mounted


def test_each_tool_path_is_what_path_finds(report):
    import shutil

    for tool, path in report["tools"].items():
        assert path == shutil.which(tool), tool
    assert report["qemu"]["path"] == shutil.which("qemu-system-x86_64")


def test_required_failures_are_problems(report):
    checks = {p["check"] for p in report["problems"]}
    if report["qemu"]["path"] is None:
        assert "qemu" in checks
    if not report["netns"]["ok"]:
        assert "netns" in checks
    if not report["tun"]["ok"]:
        assert "tun" in checks
    if not report["native"]["compiled"]:
        assert "native" in checks
    if report["tools"]["mke2fs"] is None:
        assert "tools.mke2fs" in checks
    if report["firecracker"]["path"] is None:  # optional: a warning, never a problem
        assert "firecracker" not in checks
        assert "firecracker" in {w["check"] for w in report["warnings"]}
    if report["image"] is None:
        assert any(w["check"] == "image" and "hived image build" in w["fix"] for w in report["warnings"])


def test_native_compiled_and_in_use(report):
    assert report["native"]["compiled"] is True  # built by `pip install -e .`
    assert all(report["native"]["modules"].values())
    assert set(report["native"]["in_use"].values()) == {"cython"}


def test_pure_python_forced():
    r, _ = doctor_json(HIVED_PUREPYTHON="1")
    native = r["native"]
    assert native["pure_python_forced"] is True
    assert native["compiled"] is True  # still built; just not used
    assert set(native["in_use"].values()) == {"python"}
    assert any(w["check"] == "native" and "HIVED_PUREPYTHON" in w["fix"] for w in r["warnings"])


def test_accelerator_override_is_reported():
    r, _ = doctor_json(HIVED_ACCEL="tcg")
    assert r["accelerator"] == "tcg"
    assert r["accelerator_source"] == "HIVED_ACCEL"
    r, proc = doctor_json(HIVED_ACCEL="bogus")
    assert r["accelerator"] is None
    assert proc.returncode == 1
    assert any(p["check"] == "accelerator" and "HIVED_ACCEL" in p["message"] for p in r["problems"])


@pytest.fixture(scope="module")
def no_qemu_path(tmp_path_factory) -> tuple[str, str]:
    """A PATH holding only a symlink to this Python (so no qemu, no tools)."""
    d = tmp_path_factory.mktemp("bare-path")
    python = d / "python3"
    python.symlink_to(os.path.realpath(sys.executable))
    return str(d), str(python)


def test_missing_qemu_is_a_problem_with_the_debian_package(no_qemu_path):
    path, python = no_qemu_path
    proc = doctor("--json", python=python, PATH=path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    r = json.loads(proc.stdout)
    assert r["ok"] is False
    assert r["qemu"]["path"] is None
    qemu = [p for p in r["problems"] if p["check"] == "qemu"]
    assert qemu, r["problems"]
    assert "qemu-system-x86_64" in qemu[0]["message"]
    assert "apt-get install qemu-system-x86" in qemu[0]["fix"]
    # mke2fs is required too, and is not on that PATH either.
    assert any(p["check"] == "tools.mke2fs" and "e2fsprogs" in p["fix"] for p in r["problems"])


def test_human_output_has_markers_and_fixes(no_qemu_path):
    path, python = no_qemu_path
    proc = doctor(python=python, PATH=path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    out = proc.stdout
    assert "✗ qemu" in out
    assert "fix: apt-get install qemu-system-x86" in out
    assert "fix: apt-get install e2fsprogs" in out
    assert "Problems:" in out and "NOT ready" in out


def test_human_output_on_this_host(report):
    proc = doctor()
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("kvm", "accelerator", "cgroup", "netns", "tun", "tc", "wireguard", "qemu",
                 "firecracker", "crun", "tools", "image", "native"):
        assert any(ln[:1] in "✓✗!" and ln[2:].split()[0] == name for ln in lines), name
    for w in report["warnings"]:
        assert f"fix: {w['fix']}" in proc.stdout


def _ip(*args: str) -> set[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=True).stdout
    return {ln.split()[0] if args[0] == "netns" else ln.split(":")[1].strip().split("@")[0]
            for ln in out.splitlines() if ln.strip()}


def test_no_leftover_netns_or_interfaces():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    before_ns, before_links = _ip("netns", "list"), _ip("-o", "link")
    r, _ = doctor_json()
    assert r["netns"]["ok"], r["netns"]
    after_ns, after_links = _ip("netns", "list"), _ip("-o", "link")
    # Other tests may run concurrently on this host: everything the doctor makes is
    # named hvdoc*, so check those first (clear message), then the whole sets.
    assert not {n for n in after_ns | after_links if n.startswith("hvdoc")}
    assert after_ns == before_ns
    assert after_links == before_links


def test_no_leftover_cgroups():
    r, _ = doctor_json()
    root = Path("/sys/fs/cgroup")
    dirs = [root / c for c in r["cgroup"]["controllers"]] if r["cgroup"]["version"] == 1 else [root]
    for d in dirs:
        if d.is_dir():
            assert not [p.name for p in d.iterdir() if p.name.startswith("hived-doctor-")], d


def test_a_crashing_check_becomes_a_problem(monkeypatch):
    """The one in-process test: a check that raises must not take the doctor down."""
    from hived import doctor as doc

    def boom(self):
        raise RuntimeError("simulated crash")

    checks = tuple((n, k, boom if n == "image" else m) for n, k, m in doc.CHECKS)
    monkeypatch.setattr(doc, "CHECKS", checks)
    r = doc.run_checks()
    assert r["image"] is None
    assert r["ok"] is False
    crash = [p for p in r["problems"] if p["check"] == "image"]
    assert crash and "simulated crash" in crash[0]["message"]
    text = doc.render(r)
    assert "✗ image" in text and "simulated crash" in text
    json.dumps(r)  # stays serialisable


def test_doctor_is_fast():
    r, _ = doctor_json()
    assert r["elapsed_ms"] < 10_000, r["timings_ms"]

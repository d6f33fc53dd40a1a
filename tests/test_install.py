"""`make install` / `make uninstall` for real, into a temporary tree (every directory moved
with PREFIX, BINDIR, CONFDIR, UNITDIR): a venv with the package and its native modules,
the command, the units (verified by systemd itself) and the example configs."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_systemd_units import verify_unit

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted(p.name for p in (ROOT / "systemd").glob("*.service"))
EXAMPLES = sorted(p.name for p in (ROOT / "systemd").glob("*.example"))


def _make(target: str, dirs: dict, timeout: int = 540) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make not installed (Debian package make)")
    args = [f"{k}={v}" for k, v in dirs.items()]
    proc = subprocess.run(["make", "-s", target, f"PYTHON={sys.executable}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _snapshot(dirs: dict) -> dict:
    """What install put in place: file contents (hash) and the command's link target."""
    snap = {"link": os.readlink(Path(dirs["BINDIR"]) / "hived")}
    for d in ("UNITDIR", "CONFDIR"):
        for p in sorted(Path(dirs[d]).iterdir()):
            snap[f"{d}/{p.name}"] = (hashlib.sha256(p.read_bytes()).hexdigest(), oct(p.stat().st_mode))
    return snap


@pytest.fixture
def dirs(tmp_path):
    d = {"PREFIX": tmp_path / "opt" / "hived", "BINDIR": tmp_path / "bin", "CONFDIR": tmp_path / "etc" / "hived",
         "UNITDIR": tmp_path / "units"}
    yield {k: str(v) for k, v in d.items()}
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_install_twice_then_uninstall(dirs):
    _make("install", dirs)
    prefix, hived = Path(dirs["PREFIX"]), Path(dirs["BINDIR"]) / "hived"
    assert hived.is_symlink() and os.readlink(hived) == f"{prefix}/bin/hived"
    assert (prefix / "pyvenv.cfg").exists()
    assert sorted(p.name for p in Path(dirs["UNITDIR"]).iterdir()) == UNITS
    assert sorted(p.name for p in Path(dirs["CONFDIR"]).iterdir()) == EXAMPLES

    # Not an editable install: the package and its native modules live in the venv.
    probe = ("import hived, hived._framing, hived._tokenbucket, hived._kvm; "
             "print(hived.__file__)")
    where = subprocess.run([prefix / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=60,
                           cwd=prefix)   # not the checkout: `-c` puts the cwd first on sys.path
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(prefix)), where.stdout

    # The installed units as they are: ExecStart is the installed command, the configs
    # are CONFDIR's, and systemd accepts them.
    for name in UNITS:
        unit = Path(dirs["UNITDIR"]) / name
        text = unit.read_text()
        assert f"ExecStart={hived} " in text, name
        assert f"--config {dirs['CONFDIR']}/" in text, name
        verify_unit(unit)

    # The command runs (doctor exits 1 when the host lacks something, never with a traceback).
    doctor = subprocess.run([hived, "doctor", "--json"], capture_output=True, text=True, timeout=300, cwd=prefix)
    assert doctor.returncode in (0, 1), doctor.stderr
    assert "Traceback" not in doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["native"] and "accelerator" in report, report

    before = _snapshot(dirs)
    _make("install", dirs)   # idempotent: the same files again
    assert _snapshot(dirs) == before

    operators = Path(dirs["CONFDIR"]) / "box.toml"
    operators.write_text("# the operator's own config\n")
    _make("uninstall", dirs)
    assert not hived.exists() and not hived.is_symlink()
    assert not prefix.exists()
    assert list(Path(dirs["UNITDIR"]).iterdir()) == []
    assert sorted(p.name for p in Path(dirs["CONFDIR"]).iterdir()) == ["box.toml"], "the operator's config stays"
    _make("uninstall", dirs)   # twice is fine too
    assert operators.exists()


def test_uninstall_leaves_a_foreign_command(dirs):
    """A `hived` in BINDIR that is not a link into PREFIX is someone else's: left alone."""
    bindir = Path(dirs["BINDIR"])
    bindir.mkdir(parents=True)
    foreign = bindir / "hived"
    foreign.write_text("#!/bin/sh\n")
    Path(dirs["PREFIX"]).mkdir(parents=True)   # not a venv made by install: kept as well
    _make("uninstall", dirs)
    assert foreign.read_text() == "#!/bin/sh\n"
    assert Path(dirs["PREFIX"]).is_dir()

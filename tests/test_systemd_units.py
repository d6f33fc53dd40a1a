"""systemd/*.service, the example configs and hived/sdnotify.py, for real."""

import configparser
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

from hived import sdnotify
from hived.box import config as box_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "hived-box.service"
EXAMPLE = ROOT / "systemd" / "box.toml.example"
UNITS = sorted((ROOT / "systemd").glob("*.service"))
# The daemons whose unit runs them sandboxed (the box cannot be: see its unit's comments).
HARDENED = ("hived-control.service", "hived-router.service", "hived-connector.service")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _parse_unit(path: Path) -> configparser.ConfigParser:
    # systemd units are ini-like: repeated keys are allowed, case matters, no interpolation.
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                       empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(path.read_text())
    return parser


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    return _parse_unit(UNIT)


def test_every_daemon_has_a_unit():
    names = {u.name for u in UNITS}
    assert {"hived-box.service", *HARDENED} <= names, names


def test_unit_service_settings(unit):
    svc = unit["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert svc["KillMode"] == "process"  # cells outlive a restart or a crash of the daemon
    assert svc["Delegate"] == "yes"
    assert svc["DelegateSubgroup"] == "daemon"  # hived/box/placement.py: DAEMON_LEAF
    assert "ExecStop" not in svc or svc["ExecStop"].strip()
    assert int(svc["TimeoutStopSec"]) > 0
    assert int(svc["LimitNOFILE"]) >= 4096
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_watchdog_is_pinged_often_enough(unit):
    """The daemon pings every WatchdogSec/2 (sdnotify.watchdog_interval): keep that >= 1 s."""
    assert int(unit["Service"]["WatchdogSec"]) >= 2


def _exec_start(unit) -> list[str]:
    return shlex.split(unit["Service"]["ExecStart"])


def test_exec_start_is_a_hived_subcommand(unit):
    argv = _exec_start(unit)
    assert argv[0] == "/usr/local/bin/hived"
    assert argv[1:] == ["box", "--config", "/etc/hived/box.toml"]
    cmd = [sys.executable, "-m", "hived", argv[1], "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout


def test_exec_start_arguments_parse(unit, tmp_path):
    """The exact ExecStart arguments get past the argument parser (to the config loading)."""
    argv = _exec_start(unit)[1:]
    missing = tmp_path / "absent.toml"
    argv[argv.index("--config") + 1] = str(missing)
    proc = subprocess.run([sys.executable, "-m", "hived", *argv], capture_output=True, text=True,
                          timeout=60, env=_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "usage:" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_exec_start_of_every_unit(path, tmp_path):
    """Each unit's ExecStart is /usr/local/bin/hived SUBCOMMAND --config /etc/hived/X.toml,
    and those arguments get past the argument parser to the config loading."""
    argv = shlex.split(_parse_unit(path)["Service"]["ExecStart"])
    assert argv[0] == "/usr/local/bin/hived"
    assert argv[2] == "--config" and argv[3].startswith("/etc/hived/") and argv[3].endswith(".toml"), argv
    assert (ROOT / "systemd" / (Path(argv[3]).name + ".example")).exists(), f"no example for {argv[3]}"
    missing = tmp_path / "absent.toml"
    proc = subprocess.run([sys.executable, "-m", "hived", argv[1], "--config", str(missing)], capture_output=True,
                          text=True, timeout=60, env=_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "usage:" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(missing) in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", HARDENED)
def test_hardening(name):
    svc = _parse_unit(ROOT / "systemd" / name)["Service"]
    assert svc["ProtectSystem"] == "strict"
    assert svc["ProtectHome"] == "yes"
    assert svc["PrivateTmp"] == "yes"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["RestrictSUIDSGID"] == "yes"
    # The capabilities each one keeps are named, never the full set.
    caps = svc["CapabilityBoundingSet"].split()
    assert caps and "CAP_SYS_ADMIN" not in caps, caps


def test_box_unit_leaf_is_where_placement_looks():
    from hived.box import placement

    assert _parse_unit(UNIT)["Service"]["DelegateSubgroup"] == placement.DAEMON_LEAF


def test_box_unit_says_why_cells_outlive_it():
    """KillMode=process and the cgroup placement are explained where an operator reads them."""
    text = UNIT.read_text()
    for words in ("KillMode=process", "restart", "ExecStop=", "DelegateSubgroup=", "systemd < 254",
                  "hived/box/placement.py", "cells/<cell id>", "hived/<box name>", "cgroup_parent"):
        assert words in text, words


def test_verify_still_catches_an_unknown_key_next_to_a_newer_one(tmp_path):
    copy = tmp_path / "hived-box.service"
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/hived ", "ExecStart=/bin/true ")
    copy.write_text(text.replace("DelegateSubgroup=daemon\n", "DelegateSubgroup=daemon\nNoSuchKey=1\n"))
    with pytest.raises(AssertionError):
        verify_unit(copy)


def test_box_unit_says_which_root_powers_and_why():
    text = UNIT.read_text()
    for power in ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "/dev/kvm", "/run/netns"):
        assert power in text, power


# unit keys the shipped units use that an older systemd does not know: key -> first version
NEWER_KEYS = {"DelegateSubgroup": 254}


def _systemd_version() -> int:
    proc = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=30)
    m = re.match(r"systemd (\d+)", proc.stdout)
    return int(m.group(1)) if m else 0


def verify_unit(path: Path) -> None:
    """systemd's own parser on a unit file: no unknown keys, no bad values, an executable
    ExecStart. `verify` exits 0 on unknown keys and bad values (it only warns): every line
    naming the file is a failure. It parses offline: systemd need not run this machine."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60,
                          cwd=path.parent)
    mine = [ln for ln in (proc.stdout + proc.stderr).splitlines() if path.name in ln]
    # keys newer than this machine's systemd, which ignores them (the unit says what then)
    mine = [ln for ln in mine if not any(f"Unknown key '{key}'" in ln or f"Unknown key name '{key}'" in ln
                                         for key, since in NEWER_KEYS.items() if _systemd_version() < since)]
    assert proc.returncode == 0, proc.stderr
    assert not mine, mine


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(path, tmp_path):
    """Each shipped unit, ExecStart pointed at a real file (`make install` puts the real
    command in place: tests/test_install.py verifies the installed units as they are)."""
    copy = tmp_path / path.name
    text = path.read_text()
    for key in ("ExecStart", "ExecStop"):
        text = text.replace(f"{key}=/usr/local/bin/hived ", f"{key}=/bin/true ")
    copy.write_text(text)
    verify_unit(copy)


def test_verify_catches_a_bad_unit(tmp_path):
    """The check above can fail: an unknown key and a bad value are caught."""
    copy = tmp_path / "hived-router.service"
    text = (ROOT / "systemd" / copy.name).read_text().replace("ExecStart=/usr/local/bin/hived ", "ExecStart=/bin/true ")
    copy.write_text(text.replace("[Service]\n", "[Service]\nProtectSystem=sometimes\nNoSuchKey=1\n"))
    with pytest.raises(AssertionError):
        verify_unit(copy)


def test_example_config_parses():
    data = tomllib.loads(EXAMPLE.read_text())
    cfg = box_config.parse(data, str(EXAMPLE))
    assert cfg.shapes, "the example needs at least one shape"
    assert cfg.accelerator == ""
    assert str(cfg.state_dir).startswith("/var/lib/hived")


def test_other_example_configs_parse():
    from hived.connector.config import ConnectorConfig
    from hived.control.config import load as load_hive
    from hived.router import load as load_router

    hive = load_hive(ROOT / "systemd" / "hive.toml.example")
    assert str(hive.state_dir).startswith("/var/lib/hived/control/"), "hived-control.service writes only there"
    assert load_router(ROOT / "systemd" / "router.toml.example").hives
    table = tomllib.loads((ROOT / "systemd" / "connector.toml.example").read_text())["connector"]
    assert table.pop("token_file") == "/etc/hived/connector.token"
    assert table.pop("ca_file") == "/etc/hived/tls/ca.pem"   # files that must exist: checked at load
    assert ConnectorConfig.from_table({**table, "token": "t" * 32}).network == "acme-private"


def test_example_documents_every_key():
    """Every key parse() knows appears in the example, set or commented out."""
    text = EXAMPLE.read_text()
    try:
        box_config.parse({"box": {"no_such_key": 1}, "shapes": {"s": {}}}, "probe")
    except box_config.ConfigError as exc:
        known = re.search(r"known: ([^)]*)\)", str(exc)).group(1).split(", ")
    else:
        pytest.fail("parse() accepted an unknown key")
    for key in [*known, *box_config.SHAPE_INTS]:
        assert re.search(rf"^#?\s*{re.escape(key)}\s*=", text, re.MULTILINE), key


def test_box_unit_stop_ends_builds_but_a_restart_keeps_them():
    """ExecStop= is `hived box stop --unless-restarting %n`: systemd runs it on a stop and on a
    restart (and after a crash); only a stop may end the builds."""
    unit = (ROOT / "systemd" / "hived-box.service").read_text()
    [stop] = [ln for ln in unit.splitlines() if ln.startswith("ExecStop=")]
    argv = shlex.split(stop.split("=", 1)[1])
    assert argv[1:3] == ["box", "stop"] and argv[argv.index("--unless-restarting") + 1] == "%n"
    assert "KillMode=process" in unit


def test_pending_job_tells_a_restart_from_a_stop():
    from hived.sdnotify import pending_job

    jobs = ("1432 hived-box.service restart running\n"
            "1433 hived-control.service stop waiting\n")
    assert pending_job(jobs, "hived-box.service") == "restart"
    assert pending_job(jobs, "hived-control.service") == "stop"
    assert pending_job(jobs, "hived-router.service") == ""
    assert pending_job("", "hived-box.service") == ""


# ---- hived/sdnotify.py ------------------------------------------------------------------


def _dgram_server(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_path_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with _dgram_server(str(path)) as server:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1") is True
        assert server.recv(4096) == b"READY=1"
        state = "READY=1\nSTATUS=serving; 1 warm"  # what the box daemon sends
        assert sdnotify.notify(state) is True
        assert server.recv(4096) == state.encode()


def test_notify_abstract_socket(monkeypatch):
    name = f"hived-test-{uuid.uuid4().hex}"
    with _dgram_server("\0" + name) as server:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1") is True
        assert server.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # WatchdogSec=30
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None


def test_notify_comes_from_the_calling_process(tmp_path):
    """NotifyAccess=main: systemd accepts a datagram only if its sender pid is the daemon's.
    notify() sends from the calling process itself (no systemd-notify helper): check the
    kernel-attested sender pid (SCM_CREDENTIALS) of a child that notifies."""
    path = tmp_path / "notify.sock"
    with _dgram_server(str(path)) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        env = _env()
        env["NOTIFY_SOCKET"] = str(path)
        code = "from hived import sdnotify; assert sdnotify.notify('READY=1')"
        child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path)
        assert child.wait(timeout=60) == 0
        data, ancdata, _, _ = server.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"READY=1"
    creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds, ancdata
    pid, _uid, _gid = struct.unpack("iII", creds[0][:12])
    assert pid == child.pid

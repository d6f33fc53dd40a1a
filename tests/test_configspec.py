"""Config tables declared as data (hived/configspec.py), and the two daemons' tables built on it."""

import pytest

from hived.box.config import ConfigError as BoxConfigError
from hived.box.config import parse as parse_box
from hived.configspec import REQUIRED, Key, address, boolean, choice, integer, number, read_table, sha256s, string
from hived.control.config import ConfigError as ControlConfigError
from hived.control.config import parse as parse_control

KEYS = {"name": Key(REQUIRED, string(), "what it is called"), "n": Key(2, integer(1)),
        "t": Key(1.5, number(0.1)), "on": Key(False, boolean()), "mode": Key("a", choice("a", "b")),
        "at": Key(("127.0.0.1", 80), address()), "hashes": Key((), sha256s())}


def test_defaults_fill_and_values_parse():
    got = read_table({"name": "x", "t": 2, "at": "[::1]:8080", "hashes": ["0" * 64]}, KEYS, "f.toml: t", ValueError)
    assert got == {"name": "x", "n": 2, "t": 2.0, "on": False, "mode": "a", "at": ("::1", 8080),
                   "hashes": ("0" * 64,)}


@pytest.mark.parametrize("raw, message", [
    ({}, "f.toml: t.name: missing (what it is called)"),
    ({"name": "x", "extra": 1}, "f.toml: t.extra: unknown key (known: at, hashes, mode, n, name, on, t)"),
    ({"name": "x", "n": 0}, "f.toml: t.n: expected an integer >= 1, got 0"),
    ({"name": "x", "n": True}, "f.toml: t.n: expected an integer >= 1, got True"),
    ({"name": "x", "t": "1"}, "f.toml: t.t: expected a number >= 0.1, got '1'"),
    ({"name": "x", "on": "yes"}, "f.toml: t.on: expected true or false, got 'yes'"),
    ({"name": "x", "mode": "c"}, 'f.toml: t.mode: expected "a" or "b", got \'c\''),
    ({"name": "x", "at": "nohost"}, 'f.toml: t.at: expected "HOST:PORT", got \'nohost\''),
    ({"name": "x", "at": "h:99999"}, "f.toml: t.at: port '99999' is not a number 0..65535"),
    ({"name": "x", "hashes": ["abc"]}, "f.toml: t.hashes: 'abc'... is not a SHA-256 in lower-case hex"),
    ("not a table", "f.toml: t: expected a table"),
])
def test_bad_values_name_the_key_and_what_was_expected(raw, message):
    with pytest.raises(ValueError) as e:
        read_table(raw, KEYS, "f.toml: t", ValueError)
    assert str(e.value).startswith(message)


def test_box_and_control_tables_use_it():
    with pytest.raises(BoxConfigError, match=r"b.toml: box.boot_timeout_s: expected a number >= 0.1, got 'x'"):
        parse_box({"box": {"boot_timeout_s": "x"}, "shapes": {"s": {}}}, "b.toml")
    with pytest.raises(BoxConfigError, match=r'b.toml: box.accelerator: expected "kvm", "tcg" or absent'):
        parse_box({"box": {"accelerator": "xen"}, "shapes": {"s": {}}}, "b.toml")
    box = parse_box({"box": {"name": "b1", "state_dir": "/tmp/s"}, "shapes": {"s": {}}}, "b.toml")
    assert (box.name, str(box.state_dir), box.boot_timeout_s, box.repo_protocols) == \
        ("b1", "/tmp/s", 120.0, ("https", "ssh", "git"))
    with pytest.raises(ControlConfigError, match=r"h.toml: hive.synchronous: expected \"full\" or \"normal\""):
        parse_control({"hive": {"name": "eu1", "synchronous": "x"}, "shapes": {"s": {}}}, "h.toml")
    hive = parse_control({"hive": {"name": "eu1", "api_listen": "0.0.0.0:9000"}, "shapes": {"s": {}}}, "h.toml")
    assert (hive.api_host, hive.api_port, hive.box_port, str(hive.state_dir)) == \
        ("0.0.0.0", 9000, 7070, "/var/lib/hived/control/eu1")

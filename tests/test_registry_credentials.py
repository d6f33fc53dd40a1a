"""Registry credentials for build image pulls, for real: Debian's docker-registry with htpasswd
auth on loopback, a box daemon, and the hive's control plane.

Per customer from the box's config; per customer from the hive's config, sent with the
assignment (never stored); and the password never in logs, the box's status, state or cache
files, the control plane's store, or any process's argv or environment.
"""

import asyncio
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

import pytest
from ports import free_port
from test_control_api import TOKENS, sha
from test_control_e2e import api_call, wait_build
from test_oci_support import Layer, make_image, need_registry, push, running_registry

from hived.box.builds import BadInput, resolve_inputs
from hived.control.config import parse as parse_hive
from hived.control.server import ControlPlane
from hived.oci.credentials import CredentialsError, parse, pick
from hived.oci.registry import Credentials

from boxharness import BoxHarness, find_image

PASSWORD = "pw-" + secrets.token_urlsafe(18)   # what must never leak
USER = "puller"


def test_the_most_specific_entry_wins_and_assignment_beats_config(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    creds = parse([{"registry": "r:5000", "username": "any", "password": "a"},
                   {"registry": "r:5000", "username": "team", "password": "t", "repository": "team/*"},
                   {"registry": "r:5000", "username": "acme", "password_file": str(pw), "customer": "acme"}], "t")
    assert pick(creds, "r:5000", "other/x", "zed").username == "any"
    assert pick(creds, "r:5000", "team/x", "zed").username == "team"
    assert pick(creds, "r:5000", "team/x", "acme") == Credentials("acme", "from-file")
    assert pick(creds, "elsewhere", "team/x", "acme") is None
    assigned = {"registry": "r:5000", "username": "job", "password": "j"}
    assert pick(creds, "r:5000", "team/x", "acme", assigned).username == "job"
    assert PASSWORD not in repr(Credentials(USER, PASSWORD)) and "from-file" not in repr(creds)
    with pytest.raises(CredentialsError, match=r"registry_credentials\[0\]\.password_file"):
        parse([{"registry": "r", "username": "u", "password_file": str(tmp_path / "missing")}], "t")
    with pytest.raises(CredentialsError, match="needs password_file"):
        parse([{"registry": "r", "username": "u"}], "t")


def _busybox_image(marker: bytes):
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static not installed (apt-get install busybox-static)")
    layer = Layer().dir("bin").file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in ("sh", "cat"):
        layer.symlink(f"bin/{applet}", "busybox")
    layer.dir("etc").file("etc/marker", marker)
    return make_image([layer.bytes()], config_extra={"Env": ["PATH=/bin"], "Entrypoint": None, "Cmd": None,
                                                      "User": "", "WorkingDir": ""})


def _leaks(paths: list[Path]) -> list[str]:
    """Every file under paths, and every process's argv and environment, holding the password."""
    needle = PASSWORD.encode()
    found = []
    for root in paths:
        # os.walk, not rglob: the image cache removes its work directories in the background,
        # and a directory gone between listing and entering it is no leak
        files = [root] if root.is_file() else [Path(d) / f for d, _, names in os.walk(root) for f in names]
        for p in files:
            try:
                if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                    found.append(str(p))
            except OSError:
                pass
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            for what in ("cmdline", "environ"):
                try:
                    if needle in (proc / what).read_bytes():
                        found.append(f"/proc/{proc.name}/{what}")
                except OSError:
                    pass
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    need_registry()
    find_image()
    tmp = tmp_path_factory.mktemp("creds")
    (tmp / "reg").mkdir()
    with running_registry(tmp / "reg", users={USER: PASSWORD}) as registry:
        refs = {}
        for name in ("boxcfg", "assigned"):
            refs[name] = f"{registry.host}/private/{name}:1"
            asyncio.run(push(refs[name], _busybox_image(f"private {name}\n".encode()), Credentials(USER, PASSWORD)))
        yield tmp, registry, refs


def test_box_config_credentials_per_customer_and_nothing_leaks(world, caplog):
    tmp, registry, refs = world
    pw = tmp / "registry.pass"
    pw.write_text(PASSWORD + "\n")
    os.chmod(pw, 0o600)
    caplog.set_level(logging.DEBUG)
    box = BoxHarness({"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 0}},
                     box={"network": False, "oci_dir": str(tmp / "oci1"), "oci_insecure": [registry.host]},
                     tables={"registry_credentials": [{"registry": registry.host, "customer": "acme",
                                                       "username": USER, "password_file": str(pw)}]})
    try:
        box.start(wait_ready=False)
        d = box.daemon
        with pytest.raises(BadInput, match=r"private/boxcfg.*(401|unauthori|denied|credential)"):
            box.call(resolve_inputs(d, {"image": refs["boxcfg"]}, {"customer": "other"}))
        rec = {"customer": "acme"}
        inputs = box.call(resolve_inputs(d, {"image": refs["boxcfg"]}, rec))
        assert inputs.image.path.is_file() and rec["image_digest"] == inputs.image.digest
        status = json.dumps(box.call(_status(d)))
        assert PASSWORD not in status and PASSWORD not in caplog.text
        assert _leaks([tmp / "oci1", box.tmp]) == []
    finally:
        box.stop()


async def _status(d):
    return d.status()


@pytest.mark.vm
def test_hive_credentials_go_with_the_assignment_only(world, caplog):
    """The hive's customer credentials reach the box in build.assign; the build runs in the
    private image; the password is in no store, log, file, argv or environment."""
    if os.geteuid() != 0:
        pytest.skip("needs root: cells get cgroups")
    tmp, registry, refs = world
    caplog.set_level(logging.DEBUG)
    pw = tmp / "hive-registry.pass"
    pw.write_text(PASSWORD + "\n")
    api_port, box_port, box_token = free_port(), free_port(), secrets.token_urlsafe(24)
    cp = ControlPlane(parse_hive({
        "hive": {"name": "creds", "state_dir": str(tmp / "hive"), "api_listen": f"127.0.0.1:{api_port}",
                 "box_listen": f"127.0.0.1:{box_port}", "heartbeat_s": 0.5, "box_lost_s": 8.0},
        "shapes": {"small": {}},
        "customers": {"acme": {"api_tokens_sha256": [sha(TOKENS["acme"])],
                               "registry_credentials": [{"registry": registry.host, "username": USER,
                                                         "password_file": str(pw)}]}},
        "boxes": {"box-c": {"token_sha256": sha(box_token)}},
    }, "test"))
    box = BoxHarness({"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 1}},
                     box={"network": False, "oci_dir": str(tmp / "oci2"), "oci_insecure": [registry.host]},
                     tables={"control": {"address": f"127.0.0.1:{box_port}", "token": box_token, "box_id": "box-c"}})
    try:
        box.start(wait_ready=False)
        box.call(cp.start())
        status, b = api_call(api_port, "POST", "/v1/builds", {
            "shape": "small", "argv": ["cat", "/etc/marker"], "options": {"image": refs["assigned"]}})
        assert status in (200, 201, 202), b
        done = wait_build(api_port, b["id"], ("succeeded", "failed"), timeout=400)
        assert done["state"] == "succeeded", done
        status, log = api_call(api_port, "GET", f"/v1/builds/{b['id']}/logs")
        assert b"private assigned" in (log if isinstance(log, bytes) else json.dumps(log).encode())
        assert PASSWORD not in caplog.text
        assert _leaks([tmp / "hive", tmp / "oci2", box.tmp]) == []
    finally:
        try:
            box.call(cp.stop())
        finally:
            box.stop()


def test_a_cached_private_image_is_not_served_to_a_customer_without_access(tmp_path):
    """Two customers with their own credentials on one box, a registry with token auth and a
    repository ACL (the real docker-registry; the token service of test_oci_support): what
    acme pulled is cached, yet zed (valid credentials, no access to acme's repository) and
    an anonymous build get it neither by tag nor by digest; acme's next builds use the cache
    (within AUTH_TTL_S without asking the registry, after it with one manifest GET); a
    public image pulled anonymously is served to everyone without asking the registry."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (Debian package openssl)")
    need_registry()
    find_image()
    from test_oci_support import TokenServer

    users = {"pusher": "push-" + secrets.token_hex(8), "acme-bot": PASSWORD, "zed-bot": "zed-" + secrets.token_hex(8)}
    acl = {"acme-bot": ["acme/*", "pub/*"], "zed-bot": ["zed/*", "pub/*"]}
    (tmp_path / "reg").mkdir()
    with TokenServer(tmp_path, users, acl=acl, public=("pub/*",)) as tokens, \
            running_registry(tmp_path / "reg", token_auth=tokens) as registry:
        private, public = f"{registry.host}/acme/app:1", f"{registry.host}/pub/base:1"
        images = {private: _busybox_image(b"acme's secret\n"), public: _busybox_image(b"public\n")}
        for ref, image in images.items():
            asyncio.run(push(ref, image, Credentials("pusher", users["pusher"])))
        creds = [{"registry": registry.host, "customer": c, "username": f"{c}-bot", "password": users[f"{c}-bot"]}
                 for c in ("acme", "zed")]
        box = BoxHarness({"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 256, "pool_target": 0}},
                         box={"network": False, "oci_dir": str(tmp_path / "oci"), "oci_insecure": [registry.host]},
                         tables={"registry_credentials": creds})
        try:
            box.start(wait_ready=False)
            d = box.daemon

            def build(customer: str, ref: str):
                return box.call(resolve_inputs(d, {"image": ref}, {"customer": customer}))

            first = build("acme", private)
            assert first.image.digest == images[private].digest
            by_digest = f"{registry.host}/acme/app@{first.image.digest}"
            for customer, ref, why in (("zed", private, "refused 'zed-bot' access to acme/app"),
                                       ("zed", by_digest, "refused 'zed-bot' access to acme/app"),
                                       ("nobody", private, "token service wants credentials"),
                                       ("nobody", by_digest, "token service wants credentials")):
                with pytest.raises(BadInput, match=why):
                    build(customer, ref)
            asked = len(tokens.requests)
            again = build("acme", private)  # within AUTH_TTL_S: the cache, no registry
            assert again.image.path == first.image.path and len(tokens.requests) == asked
            d.images._authorised.clear()   # as after AUTH_TTL_S: the registry is asked once
            again = build("acme", by_digest)
            assert again.image.path == first.image.path and len(tokens.requests) == asked + 1
            # public: pulled without credentials, then anyone's (tag or digest) with no registry
            pub = build("nobody", public)
            asked = len(tokens.requests)
            for customer in ("zed", "acme", "nobody"):
                for ref in (public, f"{registry.host}/pub/base@{pub.image.digest}"):
                    assert build(customer, ref).image.path == pub.image.path
            assert len(tokens.requests) == asked
            assert _leaks([tmp_path / "oci", box.tmp]) == []
        finally:
            box.stop()

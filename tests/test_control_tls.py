"""The box link over TLS with the hive CA made by `hived control init` (real TLS on real
sockets). The box is simulated (real protocol, no cells): this is about the link's auth."""

import asyncio
import ssl
import subprocess
import sys

import pytest
from test_control_api import Hive, hive_config, run

from hived.control import tls
from hived.control.simbox import SimBox
from hived.protocol.channel import ChannelClosed


@pytest.fixture
def tls_dir(tmp_path):
    d = tmp_path / "tls"
    tls.init(d, "t1", hosts=["127.0.0.1"], boxes=["box-a", "box-b"])
    return d


def test_init_writes_ca_server_and_box_certs_with_private_keys_private(tls_dir):
    names = sorted(p.name for p in tls_dir.iterdir())
    assert names == ["box-box-a.key", "box-box-a.pem", "box-box-b.key", "box-box-b.pem", "ca.key", "ca.pem",
                     "server.key", "server.pem"]
    assert all((p.stat().st_mode & 0o077) == 0 for p in tls_dir.glob("*.key"))
    before = (tls_dir / "ca.pem").read_bytes()
    tls.init(tls_dir, "t1", boxes=["box-c"])  # again: the CA is kept, new box certs are added
    assert (tls_dir / "ca.pem").read_bytes() == before and (tls_dir / "box-box-c.pem").exists()


def test_boxes_connect_over_tls_and_certificates_must_match(tmp_path, tls_dir):
    async def main():
        async with Hive(hive_config(tmp_path, tls_dir=str(tls_dir))) as h:
            port = h.cp.box_port
            # Token only, verifying the control plane against the hive CA.
            ctx = tls.client_context(tls_dir / "ca.pem")
            box = await SimBox("127.0.0.1", port, "box-a", "box-a-token", ssl=ctx,
                               server_hostname="127.0.0.1").connect()
            assert box.registered["hive"] == "t1"
            await box.close()
            # With its own certificate.
            ctx = tls.client_context(tls_dir / "ca.pem", tls_dir / "box-box-a.pem", tls_dir / "box-box-a.key")
            box = await SimBox("127.0.0.1", port, "box-a", "box-a-token", ssl=ctx,
                               server_hostname="127.0.0.1").connect()
            await box.close()
            # Box b's certificate cannot register as box a, even with a's token.
            ctx = tls.client_context(tls_dir / "ca.pem", tls_dir / "box-box-b.pem", tls_dir / "box-box-b.key")
            with pytest.raises(ConnectionError, match="certificate presented is for box 'box-b', not 'box-a"):
                await SimBox("127.0.0.1", port, "box-a", "box-a-token", ssl=ctx,
                             server_hostname="127.0.0.1").connect()
            # A box that does not trust the hive CA does not talk to an impostor (or to us).
            with pytest.raises(ssl.SSLCertVerificationError):
                await SimBox("127.0.0.1", port, "box-a", "box-a-token", ssl=ssl.create_default_context(),
                             server_hostname="127.0.0.1").connect()
            # Plain TCP to a TLS port gets nowhere.
            with pytest.raises((ConnectionError, ChannelClosed, TimeoutError)):
                await asyncio.wait_for(SimBox("127.0.0.1", port, "box-a", "box-a-token").connect(), 3)
    run(main)


def test_require_box_certs(tmp_path, tls_dir):
    async def main():
        async with Hive(hive_config(tmp_path, tls_dir=str(tls_dir), require_box_certs=True)) as h:
            ctx = tls.client_context(tls_dir / "ca.pem")
            with pytest.raises(ConnectionError, match="presented no certificate and this hive requires one"):
                await SimBox("127.0.0.1", h.cp.box_port, "box-a", "box-a-token", ssl=ctx,
                             server_hostname="127.0.0.1").connect()
    run(main)


def test_cli_init_and_tokens(tmp_path):
    cfg = tmp_path / "hive.toml"
    cfg.write_text(f'[hive]\nname = "c1"\nstate_dir = "{tmp_path}/state"\ntls_dir = "tls"\n[shapes.small]\n')
    out = subprocess.run([sys.executable, "-m", "hived", "control", "init", "--config", str(cfg), "--box", "b1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tls" / "box-b1.pem").exists() and "wrote" in out.stdout
    out = subprocess.run([sys.executable, "-m", "hived", "control", "add-box", "--config", str(cfg), "b1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.split("token ")[1].split()[0]
    from hived.control.server import token_hash
    from hived.control.store import SQLiteStore

    store = SQLiteStore(tmp_path / "state" / "c1.db", "c1")
    assert store.get_box("b1").token_hash == token_hash(token)
    store.close()
    out = subprocess.run([sys.executable, "-m", "hived", "control", "--config", str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr

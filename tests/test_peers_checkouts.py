"""Checkouts from peers, for real: a control plane (TLS), box A (`hived box --config`, its own
process, holding checkout images) and box B (a BoxDaemon in this process with a warm cell),
`git daemon` as the origin.

Builds go through the hive's HTTP API: B asks the origin which commit the revision names
(with the build's credentials: the origin decides access), asks the control plane for holders
(it vouches only for a build B holds, of that repository: a ticket per holder), gets a git
bundle from A over the peer link, lets git verify it and builds the checkout image itself. A
wrong byte in A's bundle fails that transfer (counted as bad content) and the origin serves
the commit; a forged ticket, or one made for another box, is refused by A; A killed in the
middle of a transfer: the build still starts (from the origin) and nothing half-written is
used.
"""

import asyncio
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from test_control_api import TOKENS, sha
from test_control_e2e import api_call, wait_build
from test_peers import TwoBoxes, metric, scrape
from test_repos_support import GitDaemon, TestRepo

from hived.repos.cache import RepoCache

from boxharness import find_image

pytestmark = [pytest.mark.root, pytest.mark.vm]

BOX_TOKENS = {"box-a": secrets.token_urlsafe(24), "box-b": secrets.token_urlsafe(24)}
SERVE_BYTES_S = 4 << 20  # A serves at most this: a transfer takes seconds, long enough to kill A in
PAYLOAD_MB = 10          # incompressible history every bundle carries


class Hive(TwoBoxes):
    def __init__(self, tmp: Path, url: str, other_url: str) -> None:
        super().__init__(tmp, BOX_TOKENS, box_lost_s=8.0, customers={
            "acme": {"api_tokens_sha256": [sha(TOKENS["acme"])]},
            "other": {"api_tokens_sha256": [sha(TOKENS["other"])]}},
            # the hive gives this repository to customer "other": acme's builds get no peer for it
            repos={"other/proj": {"customer": "other", "secret": "s" * 16, "command": ["true"], "shape": "small",
                                  "url": other_url}})
        self.url = url
        self.a_repos = tmp / "a" / "repos"

    def start_a(self) -> None:
        self.spawn_a(SERVE_BYTES_S, f'repos_dir = "{self.a_repos}"')

    def start_b(self) -> None:
        super().start_b(1, repos_dir=str(self.tmp / "b" / "repos"))

    def a_holds(self, commit: str, bundle: bool = False, url: str = "") -> str:
        """A's checkout image of commit (made here, as A's own builds would), and its repository
        key; bundle=True also makes the bundle A will serve. Waits until the index lists A."""
        url = url or self.url
        cache = RepoCache(self.a_repos)
        try:
            asyncio.run(cache.checkout_image(url, commit))
            if bundle:
                asyncio.run(cache.bundle(url, commit))
        finally:
            cache.close()
        from hived.repos.url import parse_url

        key = parse_url(url)[0].key
        self.wait_for(f"A holding {commit} in the index",
                      lambda: "box-a" in self.cp.holdings.by_key.get(f"checkout:{key}@{commit}", ()))
        return key

    def build(self, rev: str, argv=("cat", "VERSION"), url: str = "") -> dict:
        status, b = api_call(self.api_port, "POST", "/v1/builds", {
            "shape": "small", "argv": list(argv), "options": {"repo": url or self.url, "rev": rev}})
        assert status in (200, 201, 202), b
        return b

    def finished(self, build_id: str) -> tuple[dict, bytes]:
        done = wait_build(self.api_port, build_id, ("succeeded", "failed"), timeout=400)
        _, log = api_call(self.api_port, "GET", f"/v1/builds/{build_id}/logs")
        return done, log if isinstance(log, bytes) else str(log).encode()

    def a_served(self) -> float:
        try:
            return metric(scrape(self.a_metrics_port), "hived_peer_served_bytes_total")
        except OSError:
            return 0.0


@pytest.fixture(scope="module")
def hive(tmp_path_factory):
    find_image()
    tmp = tmp_path_factory.mktemp("pco")
    origin = TestRepo(tmp / "git" / "proj")
    origin.commit({"VERSION": "v0\n", "payload": os.urandom(PAYLOAD_MB << 20)}, "history")
    other = TestRepo(tmp / "git" / "other")
    other.commit({"VERSION": "other's\n"}, "theirs")
    with GitDaemon(tmp / "git") as daemon:
        env = Hive(tmp, daemon.url("proj"), daemon.url("other"))
        env.origin, env.other, env.other_url = origin, other, daemon.url("other")
        try:
            env.start_a()
            env.start_b()
            env.wait_for("both boxes registered with their ticket keys",
                         lambda: all(env.cp.links.get(b) is not None and env.cp.links[b].ticket_key
                                     for b in BOX_TOKENS), timeout=60)
            yield env
        finally:
            env.stop()


def _b_mirror_clean(env) -> None:
    """B's mirror holds no quarantine ref and its cache no peer work dir: nothing half-written."""
    repos = env.tmp / "b" / "repos"
    for mirror in (repos / "mirrors").glob("*.git"):
        refs = subprocess.run(["git", f"--git-dir={mirror}", "for-each-ref", "refs/hived/peer/"],
                              capture_output=True, text=True, check=True).stdout
        assert refs == "", refs
    assert not [p.name for p in (repos / "tmp").iterdir() if p.name.startswith("peer-")]


def test_a_checkout_comes_from_a_peer_verified_and_the_build_runs_in_it(hive):
    env = hive
    c1 = env.origin.commit({"VERSION": "v1\n"}, "v1")
    env.a_holds(c1)
    served0, ok0 = env.a_served(), env.b_metric("hived_peer_fetches_total", '{result="ok"}')
    done, log = env.finished(env.build("main")["id"])  # a branch: the origin names the commit
    assert done["state"] == "succeeded", done
    assert b"v1" in log
    d = env.b.daemon
    assert d.repos.stats["peer_fetches"] == 1 and env.b_metric("hived_peer_fetches_total", '{result="ok"}') == ok0 + 1
    assert env.a_served() - served0 >= PAYLOAD_MB << 20  # the history came from A, not from the origin
    mirror = next((env.tmp / "b" / "repos" / "mirrors").glob("*.git"))
    kept = subprocess.run(["git", f"--git-dir={mirror}", "rev-parse", f"refs/hived/commits/{c1}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert kept == c1
    _b_mirror_clean(env)
    # B serves it from now on too (its next report)
    key = env.a_holds(c1)
    env.wait_for("B in the index", lambda: "box-b" in env.cp.holdings.by_key.get(f"checkout:{key}@{c1}", ()))


def test_a_wrong_byte_fails_that_transfer_is_counted_and_the_origin_serves(hive):
    env = hive
    c2 = env.origin.commit({"VERSION": "v2\n"}, "v2")
    env.a_holds(c2, bundle=True)
    bundle = env.a_repos / "bundles" / c2 / "repo.bundle"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01  # bit rot on the holder's disk, or a lying holder
    os.chmod(bundle, 0o644)
    bundle.write_bytes(bytes(data))
    bad0 = env.b_metric("hived_peer_fetches_total", '{result="bad_digest"}')
    fetches0 = env.b.daemon.repos.stats["fetches"]
    done, log = env.finished(env.build(c2)["id"])  # a commit id
    assert done["state"] == "succeeded", done
    assert b"v2" in log
    assert env.b_metric("hived_peer_fetches_total", '{result="bad_digest"}') == bad0 + 1
    assert env.b.daemon.repos.stats["fetches"] > fetches0  # the origin served it
    _b_mirror_clean(env)


def test_only_tickets_of_the_control_plane_for_this_box_are_served(hive, caplog):
    from hived import tickets
    from hived.box.peers import PeerFailed, PeerSource

    env = hive
    c1 = env.origin.head("main~1")  # the first test's commit: A holds it
    key = env.a_holds(c1)
    d = env.b.daemon
    refused0 = metric(scrape(env.a_metrics_port), "hived_peer_refused_total")
    a_key = env.cp.links["box-a"].ticket_key
    expires = int(time.time()) + 60

    def fetch(ticket: bytes, exp: int = expires) -> None:
        async def go():
            source = PeerSource(d.peers, {"box_id": "box-a", "addr": f"127.0.0.1:{env.a_peer_port}",
                                          "ticket": ticket, "expires": exp})
            try:
                await source.fetch_checkout(key, c1, env.tmp / "stolen.bundle", 1 << 30)
            finally:
                await source.close()

        env.b.call(go())

    with pytest.raises(PeerFailed, match="not_allowed: the ticket is not the control plane's"):
        fetch(secrets.token_bytes(32))  # forged
    with pytest.raises(PeerFailed, match="not_allowed: the ticket is not the control plane's"):
        fetch(tickets.checkout_ticket(a_key, "box-x", "box-a", key, c1, expires))  # another box's (B is box-b)
    with pytest.raises(PeerFailed, match="not_allowed: the ticket has expired"):
        fetch(tickets.checkout_ticket(a_key, "box-b", "box-a", key, c1, expires - 120), expires - 120)
    assert not (env.tmp / "stolen.bundle").exists()
    assert metric(scrape(env.a_metrics_port), "hived_peer_refused_total") == refused0 + 3
    # the control plane vouches only for a build B holds: none here, so no holders
    assert env.b.call(d.peers.checkout_sources("no-such-build", 1, key, c1)) == []
    # nor for a repository the hive's config gives another customer, even for a build B holds:
    # acme's build of other's repository starts (the origin serves it: it is public) without a peer
    theirs = env.other.head()
    env.a_holds(theirs, url=env.other_url)
    peer0 = d.repos.stats["peer_fetches"]
    done, log = env.finished(env.build(theirs, url=env.other_url)["id"])
    assert done["state"] == "succeeded" and b"other's" in log, done
    assert d.repos.stats["peer_fetches"] == peer0
    assert "is customer other's (the hive's repos config)" in caplog.text  # refused by the control plane
    # and the right ticket works (what the control plane would hand out)
    fetch(tickets.checkout_ticket(a_key, "box-b", "box-a", key, c1, expires))
    assert (env.tmp / "stolen.bundle").stat().st_size > PAYLOAD_MB << 20
    (env.tmp / "stolen.bundle").unlink()


def test_a_holder_killed_mid_transfer_the_origin_serves_and_nothing_half_written_is_used(hive):
    env = hive
    c3 = env.origin.commit({"VERSION": "v3\n"}, "v3")
    env.a_holds(c3, bundle=True)
    failed0 = env.b_metric("hived_peer_fetches_total", '{result="failed"}')
    served0 = env.a_served()
    b = env.build(c3)
    env.wait_for("A serving", lambda: env.a_served() - served0 >= 2 << 20, timeout=120)
    env.kill_a()
    done, log = env.finished(b["id"])
    assert done["state"] == "succeeded", done
    assert b"v3" in log
    assert env.b_metric("hived_peer_fetches_total", '{result="failed"}') == failed0 + 1
    _b_mirror_clean(env)
    env.wait_for("A gone from the index", lambda: "box-a" not in env.cp.holdings.boxes, timeout=30)

"""`hived bench peers`: a build image from a neighbour box vs from a registry across the internet.

Two real boxes in one hive on this machine: a control plane and box B (QEMU cells) in this
process, box A (`hived box --config`, its own process, no cells) holding the image. Debian's
docker-registry runs in a network namespace of its own, behind a veth to a second namespace
of ours, shaped with tc tbf (`--mbit`, both ways) and a delay line (`--rtt-ms`; this kernel
has no sch_netem, see delayline.py); no address is added outside those namespaces. The peer
link (127.0.0.1) is not shaped. The image: busybox + `--image-mb` of incompressible layers.

* from_registry_ms: submit (HTTP API) -> build started on B, B pulling from the shaped
  registry (A not running), p50 over `--runs`;
* from_peer_ms: the same with A up: B resolves the manifest at the registry (one request) and
  gets config and layers from A, verified; p50 over `--runs`;
* fallback_ok: A serving at `--fallback-mbit` is SIGKILLed mid-transfer (after 8 MiB, or a third of
  the layers if smaller); the build still starts
  (the registry serves the rest) and B counted the failed peer transfer.
* checkout_from_origin_ms / checkout_from_peer_ms: the same for a build naming a repository
  (`--repo-mb` of incompressible history) at a branch, the git origin (`git daemon`) in the
  registry's namespace behind the same shaped link: from the origin (A not running), then from
  A (B asks the origin which commit, the control plane for holders with tickets, and gets a
  bundle from A, verified by git); B's checkout image and mirror are dropped between runs and
  a warm cell waits before each submit. checkout_pull_* is B's own record of the checkout part.
The image is dropped from B between runs (B keeps no warm cell of the image: image_pool_target
0, so every run boots the image's cell: that boot is in both figures). pull_ms is the image
part alone (B's own record: resolve + fetch + verify + erofs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hived.bench.cache import REGISTRY_BIN, make_image, push
from hived.bench.common import BenchError, machine_info, progress, summary

CUSTOMER = "bench"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip()}")


class ShapedRegistry:
    """docker-registry in netns R, reached from netns C over a veth shaped with tbf both ways,
    through a delay line listening on 127.0.0.1 (it connects from inside C)."""

    def __init__(self, work: Path, mbit: int, rtt_ms: float, users: dict[str, str] | None = None) -> None:
        """users: basic auth (htpasswd) for these users; None: anyone may pull and push."""
        from hived.net.tc import tbf_params

        tag = secrets.token_hex(3)
        self.ns_r, self.ns_c = f"hvbpr{tag}", f"hvbpc{tag}"
        self.veth_r, self.veth_c = f"hvbpr{tag}", f"hvbpc{tag}"
        self.work = work
        self.reg_addr = "10.254.0.2:5000"
        self.tbf = tbf_params(mbit * 1_000_000)
        self.rtt_ms = rtt_ms
        self.proc = self.line = self.git_proc = self.git_line = None
        self.users = users
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"      # what boxes pull from (shaped)
        self.direct = self.reg_addr               # unshaped, from inside ns C only (setup)

    def start(self) -> ShapedRegistry:
        for ns in (self.ns_r, self.ns_c):
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", self.veth_c, "netns", self.ns_c, "type", "veth", "peer", "name", self.veth_r,
             "netns", self.ns_r)
        _run("ip", "-n", self.ns_c, "addr", "add", "10.254.0.1/30", "dev", self.veth_c)
        _run("ip", "-n", self.ns_r, "addr", "add", "10.254.0.2/30", "dev", self.veth_r)
        for ns, dev in ((self.ns_c, self.veth_c), (self.ns_r, self.veth_r)):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        cfg = self.work / "registry.yml"
        auth = ""
        if self.users is not None:
            htpasswd = self.work / "htpasswd"
            htpasswd.write_text("".join(subprocess.run(["htpasswd", "-nbB", u, pw], capture_output=True, text=True,
                                                       check=True).stdout.strip() + "\n"
                                        for u, pw in self.users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: hived-bench\n    path: {htpasswd}\n"
        cfg.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n"
                       f"  filesystem:\n    rootdirectory: {self.work / 'registry'}\nhttp:\n  addr: {self.reg_addr}\n"
                       + auth)
        with open(self.work / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns_r, REGISTRY_BIN, "serve", str(cfg)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            self.line = subprocess.Popen([sys.executable, "-m", "hived.bench.delayline", str(self.port), self.ns_c,
                                          self.reg_addr, str(self.rtt_ms / 2)], stdout=subprocess.PIPE,
                                         stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.line.stdout.readline().strip() != b"ready":
            raise BenchError(f"the delay line did not start (see {self.work / 'registry.log'})")
        self._wait_up()
        return self

    def _wait_up(self) -> None:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 20
        while True:
            try:
                opener.open(f"http://{self.host}/v2/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # 401: up, wants credentials
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"docker-registry did not start (see {self.work / 'registry.log'})") from None
                time.sleep(0.1)

    def serve_git(self, base: Path) -> str:
        """`git daemon` for the repositories under base, in the registry's namespace behind the
        same shaped link (a delay line of its own); the URL boxes fetch proj from."""
        self.git_port = _free_port()
        with open(self.work / "git.log", "ab") as log:
            self.git_proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns_r, "git", "daemon", "--reuseaddr", f"--base-path={base}",
                 "--export-all", "--listen=10.254.0.2", "--port=9418", str(base)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            self.git_line = subprocess.Popen([sys.executable, "-m", "hived.bench.delayline", str(self.git_port),
                                              self.ns_c, "10.254.0.2:9418", str(self.rtt_ms / 2)],
                                             stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        if self.git_line.stdout.readline().strip() != b"ready":
            raise BenchError(f"the git delay line did not start (see {self.work / 'git.log'})")
        return f"git://127.0.0.1:{self.git_port}/proj"

    def shape(self) -> None:
        t = self.tbf
        for ns, dev in ((self.ns_c, self.veth_c), (self.ns_r, self.veth_r)):
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", t["rate"], "burst",
                 str(t["burst"]), "limit", str(t["limit"]))

    def stop(self) -> None:
        for p in (self.line, self.proc, self.git_line, self.git_proc):
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for ns in (self.ns_r, self.ns_c):  # the veth dies with its namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class BoxA:
    """`hived box --config` holding the image, serving its peer link; no cells."""

    def __init__(self, work: Path, control_port: int, token: str, registry_host: str, tls_dir: Path) -> None:
        self.work = work
        self.control_port, self.token, self.registry_host = control_port, token, registry_host
        self.tls_dir = tls_dir
        self.peer_port, self.metrics_port = _free_port(), _free_port()
        self.proc = None

    def start(self, serve_bytes_s: int) -> None:
        from hived import image as cell_image

        found = cell_image.find_image()
        cfg = self.work / "box.toml"
        cfg.write_text(f"""[box]
name = "bpa-{secrets.token_hex(3)}"
state_dir = "{self.work / 'state'}"
image_dir = "{found.parent if found else ''}"
network = false
overcommit = true
reserved_cores = 0
metrics_port = {self.metrics_port}
oci_dir = "{self.work / 'oci'}"
repos_dir = "{self.work / 'repos'}"
oci_insecure = ["{self.registry_host}"]
peer_listen = "127.0.0.1:{self.peer_port}"
peer_serve_bytes_s = {serve_bytes_s}

[shapes.holder]
pool_target = 0

[control]
address = "127.0.0.1:{self.control_port}"
token = "{self.token}"
box_id = "box-a"
ca_file = "{self.tls_dir / 'ca.pem'}"
cert_file = "{self.tls_dir / 'box-box-a.pem'}"
key_file = "{self.tls_dir / 'box-box-a.key'}"
""")
        with open(self.work / "box.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hived", "box", "--config", str(cfg)], stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def served_bytes(self) -> float:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        m = re.search(r"^hived_peer_served_bytes_total ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _metric(box, name: str, labels: str = "") -> float:
    from prometheus_client import generate_latest

    text = generate_latest(box.metrics.registry).decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Hive:
    def __init__(self, work: Path, registry: ShapedRegistry) -> None:
        self.work, self.registry = work, registry
        self.api_token = secrets.token_urlsafe(24)
        self.tokens = {"box-a": secrets.token_urlsafe(24), "box-b": secrets.token_urlsafe(24)}
        self.cp = self.b = None

    async def start(self) -> None:
        import hashlib

        from hived import image as cell_image
        from hived.box.config import parse as parse_box
        from hived.box.daemon import BoxDaemon, CellImage
        from hived.control import tls
        from hived.control.config import parse as parse_hive
        from hived.control.server import ControlPlane
        from hived.kvm import accelerator

        def sha(t: str) -> str:
            return hashlib.sha256(t.encode()).hexdigest()

        # the hive's TLS material: the box links and the peer link (TLS only) use it
        self.tls_dir = self.work / "tls"
        tls.init(self.tls_dir, "bench", boxes=list(self.tokens))
        self.cp = ControlPlane(parse_hive({
            "hive": {"name": "bench", "state_dir": str(self.work / "hive"), "api_listen": "127.0.0.1:0",
                     "box_listen": "127.0.0.1:0", "heartbeat_s": 0.5, "box_lost_s": 10.0,
                     "tls_dir": str(self.tls_dir)},
            "shapes": {"small": {}, "holder": {}},
            "customers": {CUSTOMER: {"api_tokens_sha256": [sha(self.api_token)]}},
            "boxes": {b: {"token_sha256": sha(t)} for b, t in self.tokens.items()},
        }, "bench"))
        await self.cp.start()
        found = cell_image.find_image()
        if found is None:
            raise BenchError("no cell image for this code: run `hived image build`")
        small = (os.cpu_count() or 1) <= 2
        config = parse_box({
            "box": {"name": f"bpb-{secrets.token_hex(3)}", "state_dir": str(self.work / "b" / "state"),
                    "overcommit": small, "reserved_cores": 0 if small else 1, "network": False,
                    "boot_timeout_s": 240, "oci_dir": str(self.work / "b" / "oci"),
                    "repos_dir": str(self.work / "b" / "repos"),
                    "oci_insecure": [self.registry.host], "image_pool_target": 0, "peer_listen": "127.0.0.1:0"},
            "shapes": {"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 512, "pool_target": 1}},
            "control": {"address": f"127.0.0.1:{self.cp.box_port}", "token": self.tokens["box-b"],
                        "box_id": "box-b", "ca_file": str(self.tls_dir / "ca.pem"),
                        "cert_file": str(self.tls_dir / "box-box-b.pem"),
                        "key_file": str(self.tls_dir / "box-box-b.key")}}, "bench")
        self.b = BoxDaemon(config, image=CellImage.at(found), accelerator=accelerator())
        await self.b.start()
        await asyncio.wait_for(self.b.wait_ready(), 300)

    async def stop(self) -> None:
        if self.b is not None:
            await self.b.stop()
        if self.cp is not None:
            await self.cp.stop()

    async def build(self, ref: str, options: dict | None = None) -> dict:
        """Submit through the HTTP API; submit -> started (the control plane's clock), pull_ms
        (checkout_ms for a repository)."""
        import aiohttp

        url = f"http://127.0.0.1:{self.cp.api_port}/v1/builds"
        headers = {"Authorization": f"Bearer {self.api_token}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json={"shape": "small", "argv": ["true"], "options": options or {"image": ref}},
                                 headers=headers) as r:
                body = await r.json()
                if r.status not in (200, 201, 202):
                    raise BenchError(f"submitting the bench build: HTTP {r.status}: {body}")
            build_id = body["id"]
            deadline = time.monotonic() + 600
            while True:
                async with http.get(f"{url}/{build_id}", headers=headers) as r:
                    b = await r.json()
                if b["state"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"bench build {build_id} did not finish in 600 s: {b}")
                await asyncio.sleep(0.1)
        if b["state"] != "succeeded" or not b.get("started_at"):
            raise BenchError(f"bench build {build_id} {b['state']}: {b.get('reason')}: {b.get('message')}")
        rec = self.b.builds.get(build_id, {})
        return {"start_ms": round((b["started_at"] - b["submitted_at"]) * 1000, 1),
                "pull_ms": rec.get("image_ms"), "digest": rec.get("image_digest"),
                "checkout_ms": rec.get("checkout_ms"), "commit": rec.get("commit")}

    async def build_checkout(self, repo: str) -> dict:
        """A build of repo's main once B has a warm cell; then B's checkout and mirror dropped."""
        from hived.repos.errors import InUse, NotCached

        deadline = time.monotonic() + 300
        while not self.b.pools["small"].warm:
            if time.monotonic() > deadline:
                raise BenchError("box B has no warm cell after 300 s")
            await asyncio.sleep(0.1)
        out = await self.build("", {"repo": repo, "rev": "main"})
        deadline = time.monotonic() + 60
        for what, kind in ((out["commit"], "image"), (repo, "mirror")):
            while True:
                try:
                    self.b.repos.remove(what, kind)
                    break
                except NotCached:
                    break
                except InUse:
                    if time.monotonic() > deadline:
                        raise BenchError(f"B's checkout of {what} still in use after 60 s") from None
                    await asyncio.sleep(0.2)
        return out

    async def wait_key(self, key: str, box: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while box not in self.cp.holdings.by_key.get(key, ()):
            if time.monotonic() > deadline:
                raise BenchError(f"box {box} never in the hive's index for {key}")
            await asyncio.sleep(0.1)

    async def drop_image(self, digest: str) -> None:
        """Remove the image from B once no cell holds it (the build's cell is destroyed after it)."""
        from hived.oci.errors import InUse, NotCached

        deadline = time.monotonic() + 60
        while True:
            try:
                self.b.images.remove(digest)
                return
            except NotCached:
                return
            except InUse:
                if time.monotonic() > deadline:
                    raise BenchError(f"{digest} still in use on box B after 60 s") from None
                await asyncio.sleep(0.2)

    async def wait_holder(self, digest: str, box: str, present: bool = True, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (box in self.cp.holdings.by_key.get(f"image:{digest}", ())) != present:
            if time.monotonic() > deadline:
                raise BenchError(f"box {box} {'never' if present else 'still'} in the hive's index for {digest}")
            await asyncio.sleep(0.1)


async def _prepull(cache_dir: Path, ref: str, insecure: str) -> str:
    from hived.oci.cache import ImageCache

    cache = ImageCache(cache_dir, insecure=(insecure,))
    try:
        return (await cache.pull(ref)).digest
    finally:
        cache.close()


def _make_repo(base: Path, mb: float) -> Path:
    """base/proj: a git repository whose history holds `mb` MiB of incompressible files."""
    proj = base / "proj"
    proj.mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@hived", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@hived"}

    def git(*a: str) -> None:
        p = subprocess.run(["git", *a], cwd=proj, env=env, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise BenchError(f"git {' '.join(a)}: {p.stderr.strip()}")

    git("init", "-q", "-b", "main")
    per = max(1, int(mb * (1 << 20)) // 4)
    for i in range(4):  # a few commits, like a history
        (proj / f"data{i}.bin").write_bytes(os.urandom(per))
        (proj / "VERSION").write_text(f"v{i}\n")
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {i}")
    return base


async def _prepare_checkout(repos_dir: Path, url: str) -> str:
    """Box A's checkout image of the repository's main (the cache a build of it leaves); its key."""
    from hived.repos.cache import RepoCache

    cache = RepoCache(repos_dir)
    try:
        image = await cache.checkout_image(url, "main")
        return f"checkout:{cache._parse(url, None)[0].key}@{image.commit}"
    finally:
        cache.close()


async def _measure(work: Path, args, registry: ShapedRegistry, ref: str, digest: str, layer_bytes: int,
                   repo: str, checkout_key: str) -> dict:
    hive = Hive(work, registry)
    a = None
    try:
        await hive.start()
        out: dict = {"registry": [], "peer": [], "checkout_origin": [], "checkout_peer": []}
        for i in range(args.runs):
            progress(f"from the registry {i + 1}/{args.runs} ...")
            out["registry"].append(await hive.build(ref))
            await hive.drop_image(digest)
        for i in range(args.runs):
            progress(f"checkout from the origin {i + 1}/{args.runs} ...")
            out["checkout_origin"].append(await hive.build_checkout(repo))
        a = BoxA(work / "a", hive.cp.box_port, hive.tokens["box-a"], registry.host, hive.tls_dir)
        a.start(args.peer_serve_mib << 20)
        await hive.wait_holder(digest, "box-a")
        for i in range(args.runs):
            progress(f"from a peer {i + 1}/{args.runs} ...")
            out["peer"].append(await hive.build(ref))
            await hive.drop_image(digest)
        await hive.wait_key(checkout_key, "box-a")
        fetched0 = hive.b.repos.stats["peer_fetches"]
        for i in range(args.runs):
            progress(f"checkout from a peer {i + 1}/{args.runs} ...")
            out["checkout_peer"].append(await hive.build_checkout(repo))
        out["checkout_peer_fetches"] = hive.b.repos.stats["peer_fetches"] - fetched0
        progress("fallback: the peer killed mid-transfer ...")
        a.kill()
        await hive.wait_holder(digest, "box-a", present=False)
        # slow enough that the transfer lasts >= 4 s, so the kill lands mid-transfer even for a small image
        a.start(max(1 << 20, min(args.fallback_mbit * 1_000_000 // 8, layer_bytes // 4)))
        await hive.wait_holder(digest, "box-a")
        failed0 = _metric(hive.b, "hived_peer_fetches_total", '{result="failed"}')
        served0 = a.served_bytes()
        build = asyncio.ensure_future(hive.build(ref))
        kill_after = min(8 << 20, layer_bytes // 3)
        killed = False
        while not build.done():
            if a.served_bytes() - served0 >= kill_after:
                a.kill()
                killed = True
                break
            await asyncio.sleep(0.02)
        fallback = await build
        failed = _metric(hive.b, "hived_peer_fetches_total", '{result="failed"}') - failed0
        out["fallback"] = {**fallback, "peer_killed": killed, "killed_after_bytes": kill_after,
                           "peer_failures_counted": failed}
        out["fallback_ok"] = killed and failed >= 1 and fallback["digest"] == digest
        out["peer_fetches_ok"] = _metric(hive.b, "hived_peer_fetches_total", '{result="ok"}')
        return out
    finally:
        if a is not None:
            a.kill()
        await hive.stop()


def run(args: argparse.Namespace) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (cells get cgroups; network namespaces; tc)")
    for tool, pkg in ((REGISTRY_BIN, "docker-registry"), ("mkfs.erofs", "erofs-utils"), ("tc", "iproute2"),
                      ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed: apt-get install {pkg}")
    if args.runs < 1 or args.image_mb < 1:
        raise BenchError("--runs and --image-mb must be at least 1")
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="hvbp", dir="/var/tmp"))
    registry = None
    try:
        progress(f"making a {args.image_mb:g} MiB image ...")
        manifest, blobs, mt = make_image(args.image_mb)
        registry = ShapedRegistry(work, args.mbit, args.rtt_ms).start()
        ref = f"{registry.host}/bench/peers:1"
        progress("pushing it (not yet shaped) ...")
        asyncio.run(push(ref, manifest, blobs, mt))
        digest = asyncio.run(_prepull(work / "a" / "oci", ref, registry.host))  # box A's cache
        progress(f"making a repository with {args.repo_mb:g} MiB of history ...")
        repo = registry.serve_git(_make_repo(work / "git", args.repo_mb))
        checkout_key = asyncio.run(_prepare_checkout(work / "a" / "repos", repo))  # box A's repository cache
        registry.shape()
        layer_bytes = sum(len(b) for d, b in blobs.items() if d != json.loads(manifest)["config"]["digest"])
        r = uvloop.run(_measure(work, args, registry, ref, digest, layer_bytes, repo, checkout_key))
        reg = [x["start_ms"] for x in r["registry"]]
        peer = [x["start_ms"] for x in r["peer"]]
        reg_pull = [x["pull_ms"] for x in r["registry"] if x["pull_ms"] is not None]
        peer_pull = [x["pull_ms"] for x in r["peer"] if x["pull_ms"] is not None]
        co = {k: [x["start_ms"] for x in r[f"checkout_{k}"]] for k in ("origin", "peer")}
        co_pull = {k: [x["checkout_ms"] for x in r[f"checkout_{k}"] if x["checkout_ms"] is not None]
                   for k in ("origin", "peer")}
        p50 = {k: summary(v, (50,))["p50"] for k, v in (("reg", reg), ("peer", peer), ("reg_pull", reg_pull),
                                                         ("peer_pull", peer_pull), ("co_origin", co["origin"]),
                                                         ("co_peer", co["peer"]),
                                                         ("co_pull_origin", co_pull["origin"]),
                                                         ("co_pull_peer", co_pull["peer"])) if v}

        def ratio(a: str, b: str):
            return round(p50[a] / p50[b], 2) if a in p50 and b in p50 and p50[b] else None

        return {
            "bench": "peers", "machine": machine_info(),
            "from_registry_ms": p50["reg"], "from_peer_ms": p50["peer"],
            "registry_over_peer": round(p50["reg"] / p50["peer"], 2),
            "pull_from_registry_ms": p50.get("reg_pull"), "pull_from_peer_ms": p50.get("peer_pull"),
            "pull_registry_over_peer": round(p50["reg_pull"] / p50["peer_pull"], 2)
            if "reg_pull" in p50 and "peer_pull" in p50 else None,
            "fallback_ok": r["fallback_ok"],
            "checkout_from_origin_ms": p50.get("co_origin"), "checkout_from_peer_ms": p50.get("co_peer"),
            "checkout_origin_over_peer": ratio("co_origin", "co_peer"),
            "checkout_pull_from_origin_ms": p50.get("co_pull_origin"),
            "checkout_pull_from_peer_ms": p50.get("co_pull_peer"),
            "checkout_pull_origin_over_peer": ratio("co_pull_origin", "co_pull_peer"),
            "checkout_peer_fetches": r["checkout_peer_fetches"],
            "repo_mb": args.repo_mb,
            "from_registry_dist_ms": summary(reg, (50, 95), with_min=True),
            "from_peer_dist_ms": summary(peer, (50, 95), with_min=True),
            "fallback": r["fallback"],
            "image": {"layers_bytes": sum(len(b) for b in blobs.values()), "digest": digest},
            "registry_link": {"mbit": args.mbit, "rtt_ms": args.rtt_ms, "shaping": "tc tbf + delay line"},
            "peer_serve_mib_s": args.peer_serve_mib, "runs": args.runs, "detail": r,
        }
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def render(r: dict) -> str:
    return "\n".join([
        f"image {r['image']['layers_bytes'] / (1 << 20):.0f} MiB; registry at {r['registry_link']['mbit']} Mbit/s, "
        f"{r['registry_link']['rtt_ms']:g} ms RTT; peer link unshaped (serving at most {r['peer_serve_mib_s']} MiB/s)",
        f"submit -> build started: from the registry p50 {r['from_registry_ms']:.0f} ms, from a peer p50 "
        f"{r['from_peer_ms']:.0f} ms (x{r['registry_over_peer']})",
        f"the pull alone: {r['pull_from_registry_ms']} ms vs {r['pull_from_peer_ms']} ms "
        f"(x{r['pull_registry_over_peer']})",
        f"fallback (peer killed mid-transfer, build still started): {'ok' if r['fallback_ok'] else 'FAILED'}",
        f"checkout ({r['repo_mb']:g} MiB of history): submit -> build started from the origin p50 "
        f"{r['checkout_from_origin_ms']} ms, from a peer {r['checkout_from_peer_ms']} ms "
        f"(x{r['checkout_origin_over_peer']}); the checkout alone {r['checkout_pull_from_origin_ms']} ms vs "
        f"{r['checkout_pull_from_peer_ms']} ms (x{r['checkout_pull_origin_over_peer']})",
    ])


def parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--runs", type=int, default=3, help="builds from each source (default %(default)d)")
    p.add_argument("--image-mb", type=float, default=110.0, help="random payload in the image (default 110)")
    p.add_argument("--mbit", type=int, default=100, help="the registry link's rate, Mbit/s (default 100)")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="the registry link's round trip (default 40)")
    p.add_argument("--repo-mb", type=float, default=50.0, help="random history in the repository (default 50)")
    p.add_argument("--peer-serve-mib", type=int, default=200, help="box A's peer serving limit, MiB/s (default 200)")
    p.add_argument("--fallback-mbit", type=int, default=80, help="box A's serving rate in the fallback run, "
                   "so that it is killed mid-transfer (default 80)")
    return p

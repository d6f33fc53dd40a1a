"""`hived bench cache`: time to build start with a build image and a repository, cold vs cached.

One run, on a real box daemon (QEMU cells) with empty caches, against Debian's
docker-registry and `git daemon` on 127.0.0.1:
* image_cold_ms: a build naming an image the box has never seen: submit -> the build's
  process started in its container (pull + verify + erofs, then a cell of the new
  (shape, image) pool boots with the image attached);
* image_warm_ms: the same image again, `--runs` times (cache hit, warm cell of that pool);
* clone_cold_ms: a build naming a repository + branch the box has never seen (mirror fetch,
  checkout, erofs, copy into the cell's source slot; a warm cell was already waiting);
* clone_warm_ms: the same again, `--runs` times (the mirror answers locally, image cached);
* plain_ms: a build with neither, the baseline in the same run.
The image: static busybox + `--image-mb` of incompressible layers; the repository: the
`bench repos` generator at `--repo-mb`. Warm figures are p50/p95 over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from hived.bench import repos as repos_bench
from hived.bench.common import BenchError, progress, summary

REGISTRY_BIN = "/usr/bin/docker-registry"




# -- the test image ------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(files: dict[str, tuple[bytes, int]], links: dict[str, str] = {}) -> bytes:  # noqa: B006
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, (data, mode) in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
        for name, target in links.items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, target, 0o777, 1_700_000_000
            tf.addfile(ti)
    return buf.getvalue()


def make_image(payload_mb: float) -> tuple[bytes, dict[str, bytes], str]:
    """(manifest, blobs by digest, media type): busybox + two random payload layers."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise BenchError("busybox is not installed: apt-get install busybox-static")
    half = int(payload_mb * (1 << 20) / 2)
    tars = [_layer({"bin/busybox": (Path(busybox).read_bytes(), 0o755), "etc/os-release": (b"ID=bench\n", 0o644)},
                   {"bin/sh": "busybox", "bin/true": "busybox", "bin/cat": "busybox"}),
            _layer({"opt/payload1": (os.urandom(half), 0o644)}),
            _layer({"opt/payload2": (os.urandom(half), 0o644)})]
    blobs, layers = {}, []
    for tar in tars:
        blob = gzip.compress(tar, compresslevel=1, mtime=0)
        blobs[_sha(blob)] = blob
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _sha(blob),
                       "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in tars]},
                         "config": {"Env": ["PATH=/bin"]}}).encode()
    blobs[_sha(config)] = config
    mt = "application/vnd.oci.image.manifest.v1+json"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _sha(config), "size": len(config)},
                           "layers": layers}).encode()
    return manifest, blobs, mt


async def push(ref_text: str, manifest: bytes, blobs: dict[str, bytes], media_type: str,
               credentials=None) -> None:
    from hived.oci import reference
    from hived.oci.registry import RegistryClient

    ref = reference.parse(ref_text)
    actions = ("pull", "push")
    async with RegistryClient(credentials, insecure=(ref.api_host,)) as client:
        for digest, data in blobs.items():
            resp = await client.request("POST", ref, f"/v2/{ref.repository}/blobs/uploads/", actions=actions)
            location = resp.headers.get("Location", "")
            resp.release()
            if "://" not in location:
                location = client.base_url(ref) + location
            location += ("&" if "?" in location else "?") + f"digest={digest}"
            resp = await client.request("PUT", ref, location, data=data, actions=actions,
                                        headers={"Content-Type": "application/octet-stream"})
            resp.release()
            if resp.status != 201:
                raise BenchError(f"pushing {digest} to the bench registry: HTTP {resp.status}")
        resp = await client.request("PUT", ref, f"/v2/{ref.repository}/manifests/{ref.reference}", data=manifest,
                                    actions=actions, headers={"Content-Type": media_type})
        resp.release()
        if resp.status != 201:
            raise BenchError(f"pushing the manifest to the bench registry: HTTP {resp.status}")


class Registry:
    """docker-registry on 127.0.0.1:<free port>, storage under `work`."""

    def __init__(self, work: Path, port: int) -> None:
        self.host = f"127.0.0.1:{port}"
        cfg = work / "registry.yml"
        cfg.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n"
                       f"  filesystem:\n    rootdirectory: {work / 'registry'}\nhttp:\n  addr: {self.host}\n")
        with open(work / "registry.log", "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 15
        while True:
            try:
                opener.open(f"http://{self.host}/v2/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"docker-registry did not start (see {work / 'registry.log'})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# -- the box ---------------------------------------------------------------------------------------
async def _start_box(work: Path, registry_host: str):
    from hived import image as cell_image
    from hived.box.config import parse
    from hived.box.daemon import BoxDaemon, CellImage
    from hived.kvm import accelerator

    found = cell_image.find_image()
    if found is None:
        raise BenchError("no cell image for this code: run `hived image build`")
    small = (os.cpu_count() or 1) <= 2
    config = parse({"box": {"name": "bench-cache", "state_dir": str(work / "box"), "overcommit": small,
                            "reserved_cores": 0 if small else 1, "network": False, "boot_timeout_s": 180,
                            "oci_dir": str(work / "oci"), "repos_dir": str(work / "repos"),
                            "oci_insecure": [registry_host], "image_pool_target": 1},
                    "shapes": {"small": {"vcpus": 1, "memory_mib": 384, "scratch_mib": 512, "pool_target": 1}}},
                   "bench")
    box = BoxDaemon(config, image=CellImage.at(found), accelerator=accelerator())
    await box.start()
    await asyncio.wait_for(box.wait_ready(), 300)
    return box


async def _build_start_ms(box, options: dict) -> dict:
    """Submit one build through the box's client socket; submit -> started, and its breakdown."""
    from hived.protocol.channel import connect_unix
    from hived.protocol.session import Session

    ch = await connect_unix(str(box.config.client_socket), Session("client", "bench", {"box"}))
    try:
        await ch.send("build.submit", request_id="r", shape="", customer="bench", argv=["true"], env={},
                      cwd="/work", timeout_s=0, options=options)
        build_id = ""
        while True:
            msg = await ch.recv()
            if msg.name == "build.accepted":
                build_id = msg["build_id"]
            elif msg.name == "exit":
                if msg["code"] != 0:
                    raise BenchError(f"bench build failed: {msg['reason']}: {msg['message']}")
                break
    finally:
        ch.close()
    rec = box.builds[build_id]
    out = {"start_ms": round((rec["started"] - rec["submitted"]) * 1000, 1),
           "warm_start_ms": round(rec["warm_start_ms"], 1)}
    for key in ("image_ms", "checkout_ms", "source_copy_ms"):
        if key in rec:
            out[key] = rec[key]
    return out


async def _pool_full(box, key_prefix: str) -> None:
    while True:
        pools = [p for k, p in box.pools.items() if k.startswith(key_prefix)]
        if pools and all(len(p.warm) >= p.target for p in pools):
            return
        await asyncio.sleep(0.1)


def _dist(values: list[float]) -> dict:
    return summary(values, (50, 95), with_min=True)


async def _measure(work: Path, ref: str, repo_url: str, runs: int, registry_host: str) -> dict:
    box = await _start_box(work, registry_host)
    try:
        r: dict = {}
        plain = []
        for _ in range(runs):
            await _pool_full(box, "small")
            plain.append((await _build_start_ms(box, {}))["start_ms"])
        progress("image, cold ...")
        await _pool_full(box, "small")
        cold = await _build_start_ms(box, {"image": ref})
        r["image_cold"] = cold
        warm = []
        for i in range(runs):
            progress(f"image, cached {i + 1}/{runs} ...")
            await _pool_full(box, "small@")
            warm.append(await _build_start_ms(box, {"image": ref}))
        r["image_warm"] = warm
        progress("repository, cold ...")
        await _pool_full(box, "small")
        r["clone_cold"] = await _build_start_ms(box, {"repo": repo_url, "rev": "main"})
        clones = []
        for i in range(runs):
            progress(f"repository, cached {i + 1}/{runs} ...")
            await _pool_full(box, "small")
            clones.append(await _build_start_ms(box, {"repo": repo_url, "rev": "main"}))
        r["clone_warm"] = clones
        image_warm = [w["start_ms"] for w in warm]
        clone_warm = [w["start_ms"] for w in clones]
        return {
            "image_cold_ms": cold["start_ms"],
            "image_warm_ms": _dist(image_warm)["p50"],
            "image_warm_dist_ms": _dist(image_warm),
            "image_cold_over_warm": round(cold["start_ms"] / _dist(image_warm)["p50"], 1),
            "clone_cold_ms": r["clone_cold"]["start_ms"],
            "clone_warm_ms": _dist(clone_warm)["p50"],
            "clone_warm_dist_ms": _dist(clone_warm),
            "clone_cold_over_warm": round(r["clone_cold"]["start_ms"] / _dist(clone_warm)["p50"], 1),
            "plain_ms": _dist(plain),
            "detail": r,
        }
    finally:
        await box.stop()


def run(args: argparse.Namespace) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (cells get cgroups; images are unpacked with their owners)")
    for tool, pkg in ((REGISTRY_BIN, "docker-registry"), ("git", "git"), ("mkfs.erofs", "erofs-utils")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed: apt-get install {pkg}")
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="hvbc", dir="/tmp"))
    registry = daemon = None
    try:
        registry = Registry(work, repos_bench._free_port())
        ref = f"{registry.host}/bench/busybox:1"
        manifest, blobs, mt = make_image(args.image_mb)
        asyncio.run(push(ref, manifest, blobs, mt))
        base = work / "srv"
        base.mkdir()
        env = repos_bench._env(work)
        info = repos_bench.make_repo(base / "bench.git", args.repo_mb, env)
        daemon = repos_bench._Daemon(base, env)
        url = f"git://127.0.0.1:{daemon.port}/bench.git"
        report = uvloop.run(_measure(work, ref, url, args.runs, registry.host))
        report["image"] = {"layers_bytes": sum(len(b) for d, b in blobs.items()), "layers": 3}
        report["repo"] = {k: info[k] for k in ("pack_bytes", "files") if k in info}
        report["runs"] = args.runs
        return report
    finally:
        for stopper in (daemon, registry):
            if stopper is not None:
                stopper.stop()
        shutil.rmtree(work, ignore_errors=True)


def render(r: dict) -> str:
    return "\n".join([
        f"image ({r['image']['layers_bytes'] / 1e6:.1f} MB of layers): cold {r['image_cold_ms']:.0f} ms to build "
        f"start, cached p50 {r['image_warm_ms']:.0f} ms (x{r['image_cold_over_warm']})",
        f"repository: cold {r['clone_cold_ms']:.0f} ms, cached p50 {r['clone_warm_ms']:.0f} ms "
        f"(x{r['clone_cold_over_warm']})",
        f"plain build start p50 {r['plain_ms']['p50']:.0f} ms",
    ])


def parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--runs", type=int, default=3, help="cached builds of each kind (default %(default)d)")
    p.add_argument("--image-mb", type=float, default=24.0, help="random payload in the image (default 24)")
    p.add_argument("--repo-mb", type=float, default=20.0, help="packed size of the repository (default 20)")
    return p

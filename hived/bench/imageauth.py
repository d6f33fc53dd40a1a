"""`hived bench imageauth`: what authorising a cached build image per build costs.

A cached image is served to a build without asking the registry only when it is known public
in its repository, or the build's credentials resolved it there within AUTH_TTL_S; otherwise
one manifest GET with the build's credentials decides (hived/oci/cache.py). This measures
`ImageCache.pull` of an image already in the cache (the box daemon's call), `--runs` times each:

* public_hit_ms: a public image (pulled without credentials): the cache alone — also what
  every cached tag cost before builds were authorised (the same code path);
* private_memo_ms: a private image, the same credentials within AUTH_TTL_S: the cache alone;
* private_asked_ms: a private image, the registry asked each time (the memo cleared first, as
  after AUTH_TTL_S or for another customer's credentials): one manifest GET with the
  credentials (Basic auth: the cache remembers the registry wants it, so no 401 first) over a
  new connection;
* cold_pull_ms: the first pull of the private image, for scale (one run).

Registries: two Debian docker-registry (one with htpasswd auth, one open) in network namespaces
of their own behind a link shaped like the internet (tc tbf `--mbit`, a delay line of `--rtt-ms`,
hived/bench/peers.py's ShapedRegistry). The image: busybox + `--image-mb` of random layers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from hived.bench.cache import REGISTRY_BIN, make_image, push
from hived.bench.common import BenchError, machine_info, progress, summary


async def _measure(work: Path, args, private_ref: str, public_ref: str, creds, insecure: tuple[str, ...]) -> dict:
    from hived.oci.cache import AUTH_TTL_S, PUBLIC_TTL_S, ImageCache

    cache = ImageCache(work / "oci", insecure=insecure)
    try:
        t0 = time.perf_counter()
        private = await cache.pull(private_ref, creds)
        cold_ms = (time.perf_counter() - t0) * 1000
        public = await cache.pull(public_ref)

        async def timed(ref: str, credentials, before=None) -> list[float]:
            out = []
            for _ in range(args.runs):
                if before is not None:
                    before()
                t = time.perf_counter()
                got = await cache.pull(ref, credentials)
                out.append((time.perf_counter() - t) * 1000)
                if got.path not in (private.path, public.path):
                    raise BenchError(f"{ref}: the cache pulled it again instead of serving it")
            return out

        progress(f"cached, public ({args.runs} runs) ...")
        public_ms = await timed(public_ref, None)
        progress(f"cached, private, same credentials within {AUTH_TTL_S:g} s ({args.runs} runs) ...")
        memo_ms = await timed(private_ref, creds)
        progress(f"cached, private, the registry asked each time ({args.runs} runs) ...")
        asked_ms = await timed(private_ref, creds, before=cache._authorised.clear)
        return {"cold_ms": cold_ms, "public": public_ms, "memo": memo_ms, "asked": asked_ms,
                "auth_ttl_s": AUTH_TTL_S, "public_ttl_s": PUBLIC_TTL_S}
    finally:
        cache.close()


def run(args: argparse.Namespace) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, tc; the cache converts images as root)")
    for tool, pkg in ((REGISTRY_BIN, "docker-registry"), ("mkfs.erofs", "erofs-utils"), ("tc", "iproute2"),
                      ("busybox", "busybox-static"), ("htpasswd", "apache2-utils")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed: apt-get install {pkg}")
    if args.runs < 1 or args.image_mb <= 0 or args.rtt_ms < 0:
        raise BenchError("--runs must be at least 1, --image-mb above 0, --rtt-ms at least 0")
    from hived.bench.peers import ShapedRegistry
    from hived.oci.registry import Credentials

    work = Path(tempfile.mkdtemp(prefix="hvba", dir="/var/tmp"))
    registries = []
    creds = Credentials("bench", secrets.token_urlsafe(18))
    try:
        progress(f"making a {args.image_mb:g} MiB image; two shaped registries ...")
        manifest, blobs, mt = make_image(args.image_mb)
        for users in ({creds.username: creds.password}, None):
            sub = work / ("private" if users else "public")
            sub.mkdir()
            registries.append(ShapedRegistry(sub, args.mbit, args.rtt_ms, users=users).start())
        private, public = registries
        private_ref, public_ref = f"{private.host}/acme/app:1", f"{public.host}/pub/base:1"
        asyncio.run(push(private_ref, manifest, blobs, mt, creds))
        asyncio.run(push(public_ref, manifest, blobs, mt))
        for r in registries:
            r.shape()
        import uvloop

        m = uvloop.run(_measure(work, args, private_ref, public_ref, creds, (private.host, public.host)))
        dist = {k: summary(m[k], (50, 95), digits=3, with_min=True) for k in ("public", "memo", "asked")}
        p50 = {k: d["p50"] for k, d in dist.items()}
        return {
            "bench": "imageauth", "machine": machine_info(),
            "public_hit_ms": p50["public"], "private_memo_ms": p50["memo"], "private_asked_ms": p50["asked"],
            "asked_over_public": round(p50["asked"] / p50["public"], 1) if p50["public"] else None,
            "memo_over_public": round(p50["memo"] / p50["public"], 2) if p50["public"] else None,
            "asked_added_ms": round(p50["asked"] - p50["public"], 3),
            "cold_pull_ms": round(m["cold_ms"], 1),
            "dist_ms": dist, "auth_ttl_s": m["auth_ttl_s"], "public_ttl_s": m["public_ttl_s"],
            "registry_link": {"mbit": args.mbit, "rtt_ms": args.rtt_ms, "shaping": "tc tbf + delay line",
                              "auth": "htpasswd (Basic)"},
            "image": {"layers_bytes": sum(len(b) for b in blobs.values())}, "runs": args.runs,
        }
    finally:
        for r in registries:
            r.stop()
        shutil.rmtree(work, ignore_errors=True)


def render(r: dict) -> str:
    link = r["registry_link"]
    return "\n".join([
        f"a cached build image, {r['runs']} pulls each; registry at {link['mbit']} Mbit/s, {link['rtt_ms']:g} ms RTT",
        f"public (the cache alone, as every cached tag before): p50 {r['public_hit_ms']} ms",
        f"private, same credentials within {r['auth_ttl_s']:g} s: p50 {r['private_memo_ms']} ms "
        f"(x{r['memo_over_public']})",
        f"private, the registry asked: p50 {r['private_asked_ms']} ms (x{r['asked_over_public']}, "
        f"+{r['asked_added_ms']} ms); a cold pull: {r['cold_pull_ms']} ms",
    ])


def parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--runs", type=int, default=30, help="cached pulls of each kind (default %(default)d)")
    p.add_argument("--image-mb", type=float, default=4.0, help="random payload in the image (default 4)")
    p.add_argument("--mbit", type=int, default=100, help="the registry link's rate, Mbit/s (default 100)")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="the registry link's round trip (default 40)")
    return p

"""`hived image build|path` (the cell image) and `hived image pull|ls|rm` (the box's build-image
cache), for operators.

    hived image build [--dest DIR] [--force]
    hived image path [--dest DIR]

    hived image pull REF [--user U --password-stdin] [--cached] [--json]
    hived image ls [--json]
    hived image rm REF|DIGEST...

The cache directory is $HIVED_OCI_DIR or /var/lib/hived/oci (`--cache-dir`). Failures are
one line: `hived image: pull REF failed: <why>; <what to do>`, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from hived.errors import guard
from hived.oci.cache import DEFAULT_ROOT, CachedImage, ImageCache
from hived.oci.errors import OciError
from hived.oci.registry import Credentials

COMMANDS = ("pull", "ls", "rm")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=os.environ.get("HIVED_OCI_DIR", DEFAULT_ROOT),
                        help="cache directory (default $HIVED_OCI_DIR or %(default)s)")
    p = argparse.ArgumentParser(prog="hived image", description="build images cached on this box")
    sub = p.add_subparsers(dest="cmd", required=True)
    pull = sub.add_parser("pull", parents=[common], help="pull an image into the cache (re-resolves its tag)")
    pull.add_argument("ref", metavar="REF", help="e.g. debian:12, registry.example:5000/team/img@sha256:...")
    pull.add_argument("--user", "-u", help="registry user name")
    pull.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    pull.add_argument("--cached", action="store_true", help="use the cached copy of a tag without asking the registry")
    pull.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                      help="talk plain HTTP to this registry (loopback registries always are)")
    pull.add_argument("--json", action="store_true", help="print the image as one JSON object")
    ls = sub.add_parser("ls", parents=[common], help="list cached images, most recently used first")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    rm = sub.add_parser("rm", parents=[common], help="untag (by reference) or remove (by digest) cached images")
    rm.add_argument("refs", nargs="+", metavar="REF")
    return p


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


def render(images: list[CachedImage], usage: int, bound: int) -> str:
    rows = [("REFERENCE", "DIGEST", "SIZE", "LAST USED", "IN USE")]
    for img in images:
        for ref in img.refs or ("<none>",):
            rows.append((ref, img.digest[:19], _mb(img.size), _ago(img.last_used), "yes" if img.in_use else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"{len(images)} images, {_mb(usage)} of {_mb(bound)} used")
    return "\n".join(lines)


def _progress_printer(stream):
    """A pull's progress: a bar on a terminal, plain lines otherwise (hived/termprogress.py)."""
    from hived.termprogress import Transfer

    state: dict = {"bar": None, "done": {}}

    def progress(stage: str, info: dict) -> None:
        if stage == "manifest":
            layers = f"{info['layers']} layer" + ("s" if info["layers"] != 1 else "")
            print(f"{info['digest']}: {layers}, {_mb(info['bytes'])}", file=stream, flush=True)
            state["bar"] = Transfer(info["bytes"], "layers", stream)
        elif stage in ("blob", "blob-done") and state["bar"] is not None:
            before = sum(state["done"].values())
            state["done"][info["digest"]] = info.get("done", info["total"])
            state["bar"].update(sum(state["done"].values()) - before)
        elif stage == "convert":
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            print("converting to a read-only filesystem image", file=stream, flush=True)

    return progress


def main(argv: list[str]) -> int:
    """`hived image build|path` (the cell image) or `hived image pull|ls|rm` (build images)."""
    if argv and argv[0] in COMMANDS:
        return _cache_main(argv)
    return _cell_image_main(argv)


def _cache_main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    target = {"pull": getattr(args, "ref", ""), "rm": " ".join(getattr(args, "refs", []))}.get(args.cmd, "")
    return guard(lambda: _run(args), prog="hived image", what=f"{args.cmd} {target}".strip())


def _cell_image_main(argv: list[str]) -> int:
    from hived import image

    parser = argparse.ArgumentParser(prog="hived image", description="build or locate the cell image")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the cell image (prints its directory)")
    b.add_argument("--dest", help=f"image root (default $HIVED_IMAGE_DIR or {image.DEFAULT_DEST})")
    b.add_argument("--force", action="store_true", help="rebuild even if complete, rerunning debootstrap")
    p = sub.add_parser("path", help="print the image directory for the current code")
    p.add_argument("--dest", help=f"image root (default $HIVED_IMAGE_DIR or {image.DEFAULT_DEST})")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def run() -> int:
        if args.cmd == "build":
            path = image.build_image(args.dest, force=args.force)
        else:
            path = image.find_image(args.dest, required=True)
        print(path)
        return 0

    return guard(run, prog="hived image", what=args.cmd)


def _run(args) -> int:
    if args.cmd == "pull":
        credentials = None
        if args.password_stdin and not args.user:
            raise OciError("--password-stdin needs --user", "give the user name with --user")
        if args.user:
            if not args.password_stdin:
                raise OciError("--user needs --password-stdin", "pipe the password in: ... | hived image pull "
                               "--user U --password-stdin REF")
            password = sys.stdin.readline().rstrip("\r\n")
            credentials = Credentials(args.user, password)
        cache = ImageCache(args.cache_dir, insecure=tuple(args.insecure_registry))
        try:
            t0 = time.monotonic()
            img = asyncio.run(cache.pull(args.ref, credentials, refresh=not args.cached, operator=args.cached,
                                         progress=_progress_printer(sys.stderr)))
            elapsed = time.monotonic() - t0
        finally:
            cache.close()
        if args.json:
            print(json.dumps(img.to_json(), indent=2, sort_keys=True))
        else:
            print(f"{img.digest}  {img.path}  {_mb(img.size)}  ({elapsed:.1f} s)")
        return 0
    cache = ImageCache(args.cache_dir)
    if args.cmd == "ls":
        images = cache.list()
        if args.json:
            print(json.dumps({"images": [i.to_json() for i in images], "bytes": cache.usage(),
                              "max_bytes": cache.max_bytes, "root": str(cache.root)}, indent=2, sort_keys=True))
        else:
            print(render(images, cache.usage(), cache.max_bytes))
        return 0
    for ref in args.refs:
        removed = cache.remove(ref)
        print(f"removed {removed[0]}" if removed else f"untagged {ref}")
    return 0

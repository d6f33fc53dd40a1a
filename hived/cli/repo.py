"""`hived repo get|ls|rm|gc`: the box's repository cache, for operators.

    hived repo get URL [REV] [--refresh] [--bundle] [--user U --password-stdin] [--json]
    hived repo ls [--json]
    hived repo rm COMMIT... [--bundle] | hived repo rm --mirror URL...
    hived repo gc

The cache directory is $HIVED_REPOS_DIR or /var/lib/hived/repos (`--cache-dir`); protocols are
https, ssh and git unless `--allow-protocol` names others (file, http). Failures are one line:
`hived repo: <why>; <what to do>`, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict

from hived.errors import guard
from hived.repos.cache import DEFAULT_ROOT, RepoCache
from hived.repos.errors import RepoError
from hived.repos.url import ALL_PROTOCOLS, DEFAULT_PROTOCOLS, Credentials

COMMANDS = ("get", "ls", "rm", "gc")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=os.environ.get("HIVED_REPOS_DIR", DEFAULT_ROOT),
                        help="cache directory (default $HIVED_REPOS_DIR or %(default)s)")
    common.add_argument("--allow-protocol", action="append", choices=ALL_PROTOCOLS, default=[],
                        help=f"protocols to fetch besides {', '.join(DEFAULT_PROTOCOLS)} (repeatable)")
    p = argparse.ArgumentParser(prog="hived repo", description="git repositories cached on this box")
    sub = p.add_subparsers(dest="cmd", required=True)
    get = sub.add_parser("get", parents=[common], help="resolve REV and make its checkout image (or bundle)")
    get.add_argument("url", metavar="URL")
    get.add_argument("rev", metavar="REV", nargs="?", default="HEAD", help="branch, tag, ref or commit (HEAD)")
    get.add_argument("--refresh", action="store_true", help="fetch even when the mirror has the branch or tag")
    get.add_argument("--bundle", action="store_true", help="a git bundle instead of a checkout image")
    get.add_argument("--user", "-u", help="user name for an https repository")
    get.add_argument("--password-stdin", action="store_true", help="read the password or token from stdin")
    get.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ls = sub.add_parser("ls", parents=[common], help="mirrors, images and bundles, most recently used first")
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", parents=[common], help="remove images (by commit), bundles or mirrors")
    rm.add_argument("names", nargs="+", metavar="COMMIT|URL")
    kind = rm.add_mutually_exclusive_group()
    kind.add_argument("--bundle", action="store_true", help="the names are commits of bundles")
    kind.add_argument("--mirror", action="store_true", help="the names are repository URLs")
    sub.add_parser("gc", parents=[common], help="remove leftovers, then apply the size bound")
    return p


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render(listing: dict, usage: int, bound: int) -> str:
    lines = []
    for kind in ("mirrors", "images", "bundles"):
        for e in listing[kind]:
            what = e.get("url") if kind == "mirrors" else e["name"]
            ago = int(max(0, time.time() - e.get("last_used", 0)))
            lines.append(f"{kind[:-1]:7} {what}  {_mb(int(e.get('size', 0)))}  used {ago}s ago")
    lines.append(f"{len(listing['mirrors'])} mirrors, {len(listing['images'])} images, "
                 f"{len(listing['bundles'])} bundles: {_mb(usage)} of {_mb(bound)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return guard(lambda: _run(args), prog="hived repo")


def _run(args) -> int:
    protocols = tuple(dict.fromkeys([*DEFAULT_PROTOCOLS, *args.allow_protocol]))
    cache = RepoCache(args.cache_dir, protocols=protocols)
    if args.cmd == "get":
        creds = None
        if args.password_stdin:
            creds = Credentials(args.user or "", sys.stdin.readline().rstrip("\n"))
        elif args.user:
            raise RepoError("--user needs --password-stdin", "pipe the password or token in")
        make = cache.bundle if args.bundle else cache.checkout_image
        got = asyncio.run(make(args.url, args.rev, creds, refresh=args.refresh))
        d = {k: str(v) if k == "path" else v for k, v in asdict(got).items()}
        print(json.dumps(d, indent=2) if args.json else f"{got.commit} {got.path} {_mb(got.size)}")
    elif args.cmd == "ls":
        listing = cache.list()
        if args.json:
            print(json.dumps({**listing, "bytes": cache.usage(), "max_bytes": cache.max_bytes}, indent=2))
        else:
            print(render(listing, cache.usage(), cache.max_bytes))
    elif args.cmd == "rm":
        kind = "mirror" if args.mirror else "bundle" if args.bundle else "image"
        for name in args.names:
            cache.remove(name, kind)
    else:
        print(json.dumps(cache.gc()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

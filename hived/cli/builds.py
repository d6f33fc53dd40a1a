"""`hived run` and `hived status`: builds through the hive's API, and what is running."""

import argparse
import json
import os
from pathlib import Path

from hived.errors import UserError


def cmd_run(args) -> int:
    from hived.cli import client

    argv = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not argv:
        raise UserError("nothing to run: give the command after --, e.g. `hived run -- uname -a`")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected NAME=VALUE")
        env[key] = value
    options = {}
    if args.secure:
        options["secure_compute"] = args.secure
    token = ""
    if args.api:
        if args.token_file:
            try:
                token = Path(args.token_file).read_text().strip()
            except OSError as exc:
                raise UserError(f"--token-file {args.token_file}: {exc.strerror}") from None
        else:
            token = os.environ.get("HIVED_API_TOKEN", "").strip()
    elif args.token_file:
        raise UserError("--token-file goes with --api (a `hived up` home has its own token)")
    return client.run(args.home, argv, hive=args.hive, shape=args.shape, customer=args.customer, env=env,
                      cwd=args.cwd, timeout_s=args.timeout, verbose=args.verbose, image=args.image,
                      repo=args.repo, rev=args.rev, options=options, apis=args.api, token=token)


def cmd_status(args) -> int:
    from hived.cli import client

    report = client.status(args.home)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(client.render_status(report))
    return 0


def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="run a build through the API and stream its output; exits with its code")
    r.add_argument("--home", default="/var/lib/hived/up",
                   help="home of the `hived up` to use (its endpoints.json; default %(default)s)")
    r.add_argument("--shape", default="", help="cell shape (default: the customer's first)")
    r.add_argument("--customer", default="", help="customer the build belongs to (default: hived up's own)")
    r.add_argument("--hive", default="", help="send it to this hive's API, not through the router")
    r.add_argument("--api", action="append", default=[], metavar="URL",
                   help="a hive's API instead of --home's; repeat for each of its control plane replicas "
                        "(the next is tried when one fails); the token from --token-file or $HIVED_API_TOKEN")
    r.add_argument("--token-file", default="", metavar="FILE", help="with --api: the customer's API token")
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set an environment variable for the build (repeat for more)")
    r.add_argument("--cwd", default="/work", metavar="DIR",
                   help="directory the build starts in (default %(default)s, the build's home; "
                        "/workspace, the checkout, with --repo)")
    r.add_argument("--timeout", type=float, default=0, help="seconds; 0 for none")
    r.add_argument("--secure", default="", metavar="NETWORK",
                   help="Secure Compute: reach the customer network NETWORK through a WireGuard tunnel (only)")
    r.add_argument("--image", default="", metavar="REF", help="build image (OCI reference) to run in")
    r.add_argument("--repo", default="", metavar="URL", help="git repository to check out (cwd: /workspace)")
    r.add_argument("--rev", default="", help="revision of --repo: commit, branch or tag (default: HEAD)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                   help="the command to run in the cell, after -- (e.g. -- make test); its output streams "
                        "here, stdout and stderr apart, and its exit code is ours")
    r.set_defaults(handler=cmd_run)
    s = sub.add_parser("status", help="the box (cells, pools, builds) and the hive (queue, builds by state)")
    s.add_argument("--home", default="/var/lib/hived/up",
                   help="home of `hived up`, or state directory of `hived box` (default %(default)s)")
    s.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    s.set_defaults(handler=cmd_status)

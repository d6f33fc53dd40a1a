"""The `hived` command: doctor, image, up, box, run, status, bench.

Every command turns expected failures (bad config, missing binary or image, daemon
not running) into one line naming the problem and the fix, and a non-zero exit.
"""

import argparse
import json
import logging
import sys

EXIT_INFRA = 125  # the build could not run (like `docker run`): not the build's own code


class UserError(Exception):
    """An error the user can fix; printed as one line, no traceback."""


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_doctor(args) -> int:
    from hived import doctor

    report = doctor.run_checks()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(doctor.render(report))
    return 0 if report["ok"] else 1


def cmd_image(args, rest) -> int:
    from hived.oci import cli as oci_cli

    if rest and rest[0] in oci_cli.COMMANDS:  # build images cached on this box
        return oci_cli.main(rest)
    from hived import image

    return image.main(rest)


def cmd_repo(args, rest) -> int:
    from hived.repos import cli as repos_cli

    return repos_cli.main(rest)


def cmd_up(args) -> int:
    from hived import up

    return up.up(args.home, pool=args.pool, verbose=args.verbose)


def cmd_box(args) -> int:
    from hived import up
    from hived.box.config import ConfigError, load

    try:
        config = load(args.config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    return up.serve_box(config, home=None, verbose=args.verbose)


def cmd_run(args) -> int:
    from hived import client

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
    return client.run(args.home, argv, hive=args.hive, shape=args.shape, customer=args.customer, env=env,
                      cwd=args.cwd, timeout_s=args.timeout, verbose=args.verbose, image=args.image,
                      repo=args.repo, rev=args.rev, options=options)


def cmd_status(args) -> int:
    from hived import client

    report = client.status(args.home)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(client.render_status(report))
    return 0


def cmd_control(args, rest) -> int:
    from hived.control.cli import main

    return main(rest)


def cmd_router(args) -> int:
    from hived import router

    return router.main(args.config)


def cmd_connector(args) -> int:
    from hived.secure import connector
    from hived.secure.connector_config import ConnectorConfigError

    try:
        return connector.main(args.config, verbose=args.verbose)
    except (ConnectorConfigError, connector.ConnectorError) as exc:
        raise UserError(str(exc)) from None


def cmd_bench(args, rest) -> int:
    from hived import bench

    return bench.main(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hived", description="untrusted, ephemeral builds in microVMs")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the daemons do")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="check this host for what hived needs")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("image", help="the cell image (hived image build) and build images (hived image pull|ls|rm)",
                   add_help=False)
    sub.add_parser("repo", help="git repositories cached on this box (hived repo get|ls|rm|gc)", add_help=False)
    u = sub.add_parser("up", help="a whole hive on this machine (control plane, box, router), "
                       "foreground until SIGTERM")
    u.add_argument("--home", default="/var/lib/hived/up", help="state directory (default %(default)s)")
    u.add_argument("--pool", type=int, default=1, help="warm cells to keep (default %(default)s)")
    b = sub.add_parser("box", help="the box daemon (systemd: hived-box.service)")
    b.add_argument("--config", required=True, help="box config file (TOML)")
    r = sub.add_parser("run", help="run a build through the API and stream its output; exits with its code")
    r.add_argument("--home", default="/var/lib/hived/up", help="where `hived up` runs")
    r.add_argument("--shape", default="", help="cell shape (default: the customer's first)")
    r.add_argument("--customer", default="", help="customer the build belongs to (default: hived up's own)")
    r.add_argument("--hive", default="", help="send it to this hive's API, not through the router")
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    r.add_argument("--cwd", default="/work")
    r.add_argument("--timeout", type=float, default=0, help="seconds; 0 for none")
    r.add_argument("--secure", default="", metavar="NETWORK",
                   help="Secure Compute: reach the customer network NETWORK through a WireGuard tunnel (only)")
    r.add_argument("--image", default="", metavar="REF", help="build image (OCI reference) to run in")
    r.add_argument("--repo", default="", metavar="URL", help="git repository to check out (cwd: /workspace)")
    r.add_argument("--rev", default="", help="revision of --repo: commit, branch or tag (default: HEAD)")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    s = sub.add_parser("status", help="the box (cells, pools, builds) and the hive (queue, builds by state)")
    s.add_argument("--home", default="/var/lib/hived/up")
    s.add_argument("--json", action="store_true")
    sub.add_parser("bench", help="benchmarks (hived bench boot|codec|control --json)", add_help=False)
    sub.add_parser("control", help="the control plane of one hive (hived control --config FILE; "
                   "init, add-box, token)", add_help=False)
    rt = sub.add_parser("router", help="route builds to hives by rules (hived router --config FILE)")
    rt.add_argument("--config", required=True, help="router config file (TOML)")
    cn = sub.add_parser("connector", help="Secure Compute connector: the customer's end of the cells' WireGuard "
                        "tunnels (hived connector --config FILE)")
    cn.add_argument("--config", required=True, help="connector config file (TOML)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    # `image` and `bench` own their sub-parsers: hand them the rest of the line untouched.
    for name, fn in (("image", cmd_image), ("repo", cmd_repo), ("bench", cmd_bench), ("control", cmd_control)):
        if name in argv[:2]:
            i = argv.index(name)
            args = p.parse_args(argv[:i] + [name])
            _logging(args.verbose)
            return _guard(lambda: fn(args, argv[i + 1:]))  # noqa: B023
    args = p.parse_args(argv)
    _logging(args.verbose)
    handlers = {"doctor": cmd_doctor, "up": cmd_up, "box": cmd_box, "run": cmd_run, "status": cmd_status,
                "router": cmd_router, "connector": cmd_connector}
    return _guard(lambda: handlers[args.command](args))


def _guard(fn) -> int:
    try:
        return fn()
    except UserError as exc:
        print(f"hived: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

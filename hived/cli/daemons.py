"""`hived up | box | control | router | connector`: the daemons, in the foreground."""

from hived.errors import UserError


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


def cmd_control(args, rest) -> int:
    from hived.cli.control import main

    return main(rest)


def cmd_router(args) -> int:
    from hived import router

    return router.main(args.config)


def cmd_connector(args) -> int:
    from hived.connector import daemon as connector
    from hived.connector.config import ConnectorConfigError

    try:
        return connector.main(args.config, verbose=args.verbose)
    except (ConnectorConfigError, connector.ConnectorError) as exc:
        raise UserError(str(exc)) from None


def add_parsers(sub) -> None:
    u = sub.add_parser("up", help="a whole hive on this machine (control plane, box, router), "
                       "foreground until SIGTERM")
    u.add_argument("--home", default="/var/lib/hived/up", help="state directory (default %(default)s)")
    u.add_argument("--pool", type=int, default=1, help="warm cells to keep (default %(default)s)")
    u.set_defaults(handler=cmd_up)
    b = sub.add_parser("box", help="the box daemon (systemd: hived-box.service)")
    b.add_argument("--config", required=True, help="box config file (TOML)")
    b.set_defaults(handler=cmd_box)
    rt = sub.add_parser("router", help="route builds to hives by rules (hived router --config FILE)")
    rt.add_argument("--config", required=True, help="router config file (TOML)")
    rt.set_defaults(handler=cmd_router)
    cn = sub.add_parser("connector", help="Secure Compute connector: the customer's end of the cells' WireGuard "
                        "tunnels (hived connector --config FILE)")
    cn.add_argument("--config", required=True, help="connector config file (TOML)")
    cn.set_defaults(handler=cmd_connector)

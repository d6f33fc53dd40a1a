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
    if args.action == "stop":
        return stop_box(config, args.unless_restarting)
    return up.serve_box(config, home=None, verbose=args.verbose)


STOP_WAIT_S = 50.0  # below hived-box.service's TimeoutStopSec


def stop_box(config, unless_restarting: str = "") -> int:
    """`hived box stop`: end the running daemon's builds (with a reason) and its cells, and wait
    until it is gone. A SIGTERM would only restart it: its cells stay for the next daemon.

    With --unless-restarting UNIT (the unit's ExecStop=), do nothing when systemd is restarting
    the unit, or when the daemon died by itself ($MAINPID empty): then the next daemon adopts
    the cells and their builds go on."""
    import json
    import os
    import signal
    import subprocess
    import time

    from hived import sdnotify

    if unless_restarting:
        if not os.environ.get("MAINPID", "").strip():
            print(f"hived box stop: {unless_restarting} has no main process (it died by itself): its cells are "
                  "left to the next daemon")
            return 0
        try:
            jobs = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--plain"], capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise UserError(f"cannot ask systemd whether {unless_restarting} is restarting: {exc}") from None
        job = sdnotify.pending_job(jobs, unless_restarting)
        if job in ("restart", "try-restart", "reload-or-restart", "reload-or-try-restart"):
            print(f"hived box stop: {unless_restarting} is restarting: its cells and builds stay for the next daemon")
            return 0
    pid = os.environ.get("MAINPID", "").strip()
    if not pid:
        try:
            pid = str(json.loads((config.state_dir / "endpoints.json").read_text())["pid"])
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"no box daemon of {config.name} to stop: {config.state_dir / 'endpoints.json'} "
                            f"unreadable ({exc}); is `hived box --config` running?") from None
    try:
        os.kill(int(pid), signal.SIGINT)  # the daemon's stop: builds end with "box stopping", cells go
    except ProcessLookupError:
        print(f"hived box stop: the box daemon (pid {pid}) is not running")
        return 0
    deadline = time.monotonic() + STOP_WAIT_S
    while _running(int(pid)):
        if time.monotonic() > deadline:
            raise UserError(f"the box daemon (pid {pid}) did not stop within {STOP_WAIT_S:g} s")
        time.sleep(0.1)
    print(f"hived box stop: box {config.name} stopped; its builds ended and its cells are gone")
    return 0


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waits for its parent, not for us)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


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
    b = sub.add_parser("box", help="the box daemon (systemd: hived-box.service); SIGTERM restarts it keeping its "
                       "cells, `hived box stop` (or Ctrl-C) ends builds and cells")
    b.add_argument("action", nargs="?", choices=["run", "stop"], default="run",
                   help="run (default): the daemon in the foreground; stop: end the running daemon's builds and "
                        "cells, and wait until it is gone")
    b.add_argument("--config", required=True, help="box config file (TOML)")
    b.add_argument("--unless-restarting", default="", metavar="UNIT",
                   help="with stop (the unit's ExecStop=): do nothing while systemd restarts UNIT, or when the "
                        "daemon died by itself: the next daemon adopts the cells")
    b.set_defaults(handler=cmd_box)
    rt = sub.add_parser("router", help="route builds to hives by rules (hived router --config FILE)")
    rt.add_argument("--config", required=True, help="router config file (TOML)")
    rt.set_defaults(handler=cmd_router)
    cn = sub.add_parser("connector", help="Secure Compute connector: the customer's end of the cells' WireGuard "
                        "tunnels (hived connector --config FILE)")
    cn.add_argument("--config", required=True, help="connector config file (TOML)")
    cn.set_defaults(handler=cmd_connector)

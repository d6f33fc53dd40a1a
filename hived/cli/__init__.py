"""The `hived` command: one parser, a module per command group, one error guard.

    hived doctor | image | repo          this host (hived/cli/host.py, image.py, repo.py)
    hived up | box | control | router | connector
                                         the daemons (hived/cli/daemons.py, control.py)
    hived run | status                   builds through the API (hived/cli/builds.py, client.py)
    hived bench ...                      benchmarks (hived/bench/)

Every command turns expected failures (bad config, missing binary or image, daemon not
running) into one line naming the problem and the fix, and an exit code from the one table
in hived/errors.py. Nothing outside hived/cli imports this package.
"""

import argparse
import logging
import os
import sys

from hived.cli import builds, daemons, host
from hived.errors import guard

# Commands that own their sub-parsers: they get the rest of the line untouched.
PASSTHROUGH = {
    "image": ("the cell image (hived image build) and build images (hived image pull|ls|rm)", host.cmd_image),
    "repo": ("git repositories cached on this box (hived repo get|ls|rm|gc)", host.cmd_repo),
    "bench": ("benchmarks (hived bench codec|boot|control|repos|cache|secure --json)", host.cmd_bench),
    "control": ("the control plane of one hive (hived control --config FILE; init, add-box, token)",
                daemons.cmd_control),
}


def _logging(verbose: bool) -> None:
    # HIVED_LOG (a level name) wins: daemons started by tests and units log where told.
    level = os.environ.get("HIVED_LOG") or (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hived", description="untrusted, ephemeral builds in microVMs")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the daemons do")
    sub = p.add_subparsers(dest="command", required=True)
    host.add_parsers(sub)
    for name, (help_text, _) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    daemons.add_parsers(sub)
    builds.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    for name, (_, fn) in PASSTHROUGH.items():
        if name in argv[:2]:
            i = argv.index(name)
            args = p.parse_args(argv[:i] + [name])
            _logging(args.verbose)
            return guard(lambda: fn(args, argv[i + 1:]))  # noqa: B023
    args = p.parse_args(argv)
    _logging(args.verbose)
    return guard(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

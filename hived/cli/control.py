"""`hived control ...`: the control plane daemon and its few admin commands.

    hived control --config FILE                 serve (one hive; uvloop)
    hived control add-box --config FILE NAME    mint a box token, store its hash, print the token
    hived control token                         print a new API token and the SHA-256 for the config
    hived control init --config FILE [--box NAME ...]   hive CA + server cert (+ box certs) for TLS
"""

import argparse
import hashlib

from hived.errors import UserError


def _load(path: str):
    from hived.control.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def add_box(config_path: str, name: str) -> str:
    from hived.control.config import ConfigError
    from hived.control.server import mint_box_token
    from hived.control.store import StoreError

    cfg = _load(config_path)
    try:
        return mint_box_token(cfg, name)
    except (ValueError, StoreError, ConfigError) as exc:
        raise UserError(str(exc)) from None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hived control", description="the control plane of one hive")
    p.add_argument("--config", help="hive config file (TOML)")
    sub = p.add_subparsers(dest="action")
    a = sub.add_parser("add-box", help="mint a token for a box; prints it once")
    a.add_argument("--config", dest="sub_config", required=True)
    a.add_argument("name")
    sub.add_parser("token", help="print a new API token and its SHA-256 (for api_tokens_sha256)")
    i = sub.add_parser("init", help="make the hive CA, the control plane's certificate and box certificates")
    i.add_argument("--config", dest="sub_config", required=True)
    i.add_argument("--box", action="append", default=[], help="also make a certificate for this box")
    i.add_argument("--host", action="append", default=[],
                   help="name or IP boxes use to reach the control plane")
    args = p.parse_args(argv)
    if args.action == "add-box":
        token = add_box(args.sub_config, args.name)
        print(f"box {args.name}: token {token}\n(put it in the box's [control] token; it is not shown again)")
        return 0
    if args.action == "token":
        from hived.control.server import new_token

        token = new_token()
        print(f"token:  {token}\nsha256: {hashlib.sha256(token.encode()).hexdigest()}")
        return 0
    if args.action == "init":
        from hived.control import tls

        cfg = _load(args.sub_config)
        if cfg.tls_dir is None:
            raise UserError(f"{args.sub_config}: set hive.tls_dir (where the CA and certificates go) first")
        made = tls.init(cfg.tls_dir, cfg.hive, hosts=args.host or [cfg.box_host], boxes=args.box)
        for path in made:
            print(f"wrote {path}")
        return 0
    if not args.config:
        raise UserError("hived control needs --config FILE (the hive's TOML config)")
    from hived.control.server import main as serve

    return serve(args.config)

"""Client side of `hived run` and `hived status`: talk to the box named in endpoints.json."""

import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from hived.cli import EXIT_INFRA, UserError
from hived.protocol.channel import ChannelClosed, connect_unix
from hived.protocol.session import Session


def endpoints(home: str) -> dict:
    path = Path(home) / "endpoints.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no hived running at {home} ({path} missing): start one with "
                        f"`hived up --home {home}`") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


async def _connect(home: str):
    ep = endpoints(home)
    try:
        return await connect_unix(ep["box"], Session("client", f"cli-{os.getpid()}", {"box", "control"}))
    except (OSError, ChannelClosed) as exc:
        raise UserError(f"cannot reach the box at {ep['box']}: {exc} "
                        "(is `hived up` still running?)") from None


def run(home, argv, *, shape="", customer="local", env=None, cwd="/work", timeout_s=0.0,
        verbose=False) -> int:
    import uvloop

    return uvloop.run(_run(home, argv, shape, customer, env or {}, cwd, timeout_s, verbose))


async def _run(home, argv, shape, customer, env, cwd, timeout_s, verbose) -> int:
    ch = await _connect(home)
    build_id = None
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        if build_id:
            ch.send_nowait("cancel", build_id=build_id, reason="interrupted (SIGINT)")

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    try:
        await ch.send("build.submit", request_id=secrets.token_hex(8), shape=shape, customer=customer,
                      argv=list(argv), env=env, cwd=cwd, timeout_s=float(timeout_s))
        while True:
            try:
                msg = await ch.recv()
            except ChannelClosed as exc:
                print(f"hived: lost the box before the build ended: {exc.reason}", file=sys.stderr)
                return EXIT_INFRA
            if msg.name == "build.accepted":
                build_id = msg["build_id"]
                if verbose:
                    print(f"hived: build {build_id} on cell {msg['cell_id']}", file=sys.stderr)
            elif msg.name == "output":
                stream = out if msg["stream"] == 1 else err
                stream.write(msg["data"])
                stream.flush()
            elif msg.name == "error":
                print(f"hived: {msg['code']}: {msg['message']}", file=sys.stderr)
            elif msg.name == "exit":
                return _exit_code(msg, verbose)
    finally:
        ch.close()


def _exit_code(msg, verbose: bool) -> int:
    reason = msg["reason"]
    if reason in ("cell_failed", "no_capacity"):
        print(f"hived: build could not complete ({reason}): {msg['message']}", file=sys.stderr)
        return EXIT_INFRA
    if reason in ("timeout", "cancelled", "output_limit") or verbose:
        print(f"hived: build {reason}: {msg['message']}", file=sys.stderr)
    if msg["signal"]:
        return 128 + msg["signal"]
    return msg["code"] if msg["code"] >= 0 else EXIT_INFRA


def status(home: str) -> dict:
    import uvloop

    async def get():
        ch = await _connect(home)
        try:
            await ch.send("status.get")
            while True:
                msg = await ch.recv()
                if msg.name == "status":
                    return msg["report"]
        except ChannelClosed as exc:
            raise UserError(f"the box closed the connection before answering: {exc.reason}") from None
        finally:
            ch.close()

    return uvloop.run(get())


def render_status(report: dict) -> str:
    lines = [f"box {report['box']} (accelerator {report['accelerator']})"]
    counts = ", ".join(f"{k} {v}" for k, v in report["cells_by_state"].items() if v)
    lines.append(f"cells: {counts or 'none'}")
    for name, pool in report["pools"].items():
        lines.append(f"pool {name}: {pool['warm']}/{pool['target']} warm, {pool['booting']} booting, "
                     f"{pool['waiting_builds']} waiting" +
                     (f", last error: {pool['last_error']}" if pool["last_error"] else ""))
    part = report.get("partition")
    if part:
        owners = ", ".join(f"{core}: {'+'.join(cells) or 'free'}" for core, cells in part["cell_cores"].items())
        mem = part["memory_mib"]
        lines.append(f"partition: box daemon cores {part['box_cores'] or 'none reserved'}; cell cores {owners}")
        lines.append(f"  memory {mem['used']}/{mem['allocatable']} MiB used; overcommit "
                     f"{'allowed' if part['overcommit_allowed'] else 'refused'}"
                     f"{', OVERCOMMITTED now' if part['overcommitted'] else ''}")
    for cell in report["cells"]:
        lines.append(f"  {cell['id']} {cell['shape']} {cell['state']} pid {cell['pid']} cores "
                     f"{','.join(map(str, cell.get('cores', []))) or '-'} boot {cell['boot_s']} s {cell['build']}")
    for b in report["builds"][-10:]:
        lines.append(f"build {b['id']} {b.get('state')} {b.get('reason', '')} cell {b.get('cell', '-')} "
                     f"{' '.join(b.get('argv', []))[:60]}")
    return "\n".join(lines)

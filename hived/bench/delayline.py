"""A delay line for `hived bench peers`: TCP on 127.0.0.1:PORT, relayed to HOST:PORT from inside
a network namespace, every chunk held DELAY_MS in each direction (so a request and its answer
cross one round trip of 2 x DELAY_MS). tc netem would do this in the kernel; this machine kind's
kernel has no sch_netem, while tbf (the rate) works, so the rate stays in tc and only the
propagation delay is here. Reading pauses while more than MAX_IN_FLIGHT bytes are on the line.

    python -m hived.bench.delayline LISTEN_PORT NETNS UPSTREAM_HOST:PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import socket
import sys

MAX_IN_FLIGHT = 8 << 20
CHUNK = 64 << 10


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    line: asyncio.Queue = asyncio.Queue(maxsize=MAX_IN_FLIGHT // CHUNK)

    async def deliver() -> None:
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = loop.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            await line.put((loop.time() + delay, data))
        await line.put((loop.time() + delay, None))
        await sender
    except (ConnectionError, OSError):
        sender.cancel()


async def _serve(listen_port: int, netns: str, upstream: str, delay: float) -> None:
    from hived.net.netns import entered

    host, _, port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()

    async def relay(c_reader, c_writer) -> None:
        with entered(netns):  # a socket belongs to the namespace it was made in
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, int(port)))
            u_reader, u_writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            c_writer.close()
            return
        await asyncio.gather(_pump(c_reader, u_writer, delay), _pump(u_reader, c_writer, delay),
                             return_exceptions=True)
        for w in (u_writer, c_writer):
            w.close()

    server = await asyncio.start_server(relay, "127.0.0.1", listen_port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    listen_port, netns, upstream, delay_ms = argv
    import uvloop

    uvloop.run(_serve(int(listen_port), netns, upstream, float(delay_ms) / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

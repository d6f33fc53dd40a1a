"""A minimal QMP client (QEMU's JSON control socket): greeting, capabilities, execute."""

import asyncio
import json


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def connect(cls, path: str, timeout: float = 5.0) -> "Qmp":
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        qmp = cls(reader, writer)
        greeting = await qmp._read(timeout)
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting!r}")
        await qmp.execute("qmp_capabilities", timeout=timeout)
        return qmp

    async def _read(self, timeout: float) -> dict:
        while True:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
            if not line:
                raise QmpError("QMP socket closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    async def execute(self, command: str, timeout: float = 5.0, **arguments):
        req = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._writer.write(json.dumps(req).encode() + b"\n")
        await self._writer.drain()
        reply = await self._read(timeout)
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self._writer.close()

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # QEMU binds its QMP socket before it listens: a connect in between is refused
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
                break
            except ConnectionRefusedError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.002)
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


class QmpBlocking:
    """QMP over a blocking socket, for a worker thread: it can pass a file descriptor along
    with a command (SCM_RIGHTS, for `getfd`), which asyncio's streams cannot."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        import socket

        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._connect(path, timeout)
            self._file = self._sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _connect(self, path: str, timeout: float) -> None:
        import time

        # QEMU binds its QMP socket before it listens: a connect in between is refused.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(path)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)

    def _read(self) -> dict:
        while True:
            line = self._file.readline()
            if not line:
                raise QmpError("QMP socket closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, *, fd: int = -1, **arguments):
        import socket

        req = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        data = json.dumps(req).encode() + b"\n"
        if fd >= 0:
            socket.send_fds(self._sock, [data], [fd])
        else:
            self._sock.sendall(data)
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

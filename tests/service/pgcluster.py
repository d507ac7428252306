"""A throw-away PostgreSQL cluster a test may stop, restart and start again.

The shared cluster of ``scripts/ci-postgres.sh`` (``STOKER_TEST_PG_URL``) must
stay up for the other tests; fault tests make their own with
:class:`PgCluster`: a fresh directory, a free port on 127.0.0.1 only, trust
authentication on loopback, run as the ``postgres`` user when the tests run as
root.  It is a context manager: leaving it stops the server (``immediate``)
and removes the directory, whatever state the test left it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with ``initdb`` (None: not installed)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")],
    )
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One PostgreSQL server in a temporary directory (see the module docstring)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="stoker-pgfault-", dir="/var/tmp"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/stoker_test"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}: {result.stderr}{result.stdout}"
                f"\n--- server log ---\n{log}"
            )

    def __enter__(self) -> PgCluster:
        try:
            if self._as_postgres:
                shutil.chown(self.root, "postgres", "postgres")
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
            self.start()
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                      "stoker_test")  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _options(self) -> str:
        # Loopback TCP only; the socket in our directory; no fsync (a test cluster).
        return (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c max_connections=100"
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                  "-o", self._options(), "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: clients are disconnected; ``immediate``: as if it crashed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every connection is cut, the server is back a moment later."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-m", mode, "-w",
                  "-t", "60", "-o", self._options(), "restart")  # fmt: skip

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server if it runs and remove its directory (idempotent)."""
        if self.running():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        shutil.rmtree(self.root, ignore_errors=True)


class CuttableProxy:
    """A TCP forwarder on 127.0.0.1 to ``port`` that a test can cut and mend.

    Cut: it stops listening (new connections are refused) and closes every
    connection it carries, as a network partition between one host and the
    database would (the database itself stays up for the other hosts).
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def url(self, cluster: PgCluster) -> str:
        return cluster.url.replace(f":{cluster.port}/", f":{self.port}/")

    async def mend(self) -> None:
        """Listen (again) and forward."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        """Cut, and wait until every connection handler has ended."""
        await self.cut()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()

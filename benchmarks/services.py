"""Services the tests and the soak start for themselves: a private PgBouncer in front of the
registry's PostgreSQL, and a private RabbitMQ virtual host.

A PgBouncer here runs in transaction pooling mode, as most production deployments do: consecutive
transactions of one client connection may reach different server connections, and nothing a
transaction leaves on a server connection (a prepared statement, a session setting) is there for
the next one. ``pool_size`` server connections serve every client; a small pool makes clients
share server connections all the time, which is what breaks session state.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

__all__ = ["PgBouncer", "RabbitVhost", "free_port"]


def free_port() -> int:
    """A TCP port nothing listens on right now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PgBouncer:
    """A private ``pgbouncer`` (transaction pooling) in front of ``database_url``'s server.

    ``url(database_url)`` is the same URL through the bouncer. PgBouncer refuses to run as root:
    as root it runs as the ``postgres`` user (``runuser``)."""

    def __init__(self, database_url: str, pool_size: int = 4, port: int | None = None) -> None:
        self.target = urllib.parse.urlsplit(database_url.replace("+psycopg", ""))
        self.port = port or free_port()
        self.pool_size = pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="cbt-pgbouncer-"))
        self.log = self.dir / "pgbouncer.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("pgbouncer") is not None or Path("/usr/sbin/pgbouncer").exists()

    def url(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the bouncer's."""
        parts = urllib.parse.urlsplit(database_url)
        user = f"{parts.username}@" if parts.username else ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def start(self) -> "PgBouncer":
        host, port = self.target.hostname or "127.0.0.1", self.target.port or 5432
        user = self.target.username or "postgres"
        config = self.dir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={host} port={port} user={user}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 2000\n"
            # what a default install leaves as is: application_name is passed on; nothing else is ignored
            "server_reset_query =\n")
        os.chmod(self.dir, 0o755)
        os.chmod(config, 0o644)
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        argv = [binary, str(config)]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        """Stop and start again on the same port: every client connection is cut."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PgBouncer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RabbitVhost:
    """A virtual host of its own on the local RabbitMQ (created, and deleted with its queues, by
    ``rabbitmqctl``), so a test or the soak can cut every connection to it without touching others."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.name, self.host, self.port = name, host, port

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/{urllib.parse.quote(self.name, safe='')}"

    @staticmethod
    def _ctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True,
                              timeout=60).stdout

    def create(self) -> "RabbitVhost":
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def close_connections(self) -> int:
        """What a broker restart does to its clients (RabbitMQ keeps durable queues and persistent
        messages across one): every connection to the vhost is closed by the server."""
        out = self._ctl("list_connections", "--no-table-headers", "pid", "vhost")
        pids = [line.split("\t")[0] for line in out.splitlines() if line.split("\t")[-1:] == [self.name]]
        for pid in pids:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "closed by the test"],
                           capture_output=True, timeout=60)
        return len(pids)

    def delete(self) -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.name], capture_output=True, timeout=60)

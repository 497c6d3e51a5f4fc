"""A throwaway PostgreSQL server for tests: ``initdb`` in a fresh folder, a Unix socket only, stopped at the end.

The server listens on a Unix socket inside its own 0700 folder (``listen_addresses = ''``, no
TCP port), so parallel test runs on one machine never collide and no other account can reach
it. Authentication is ``trust`` on that socket; the superuser role is :data:`ROLE`.

PostgreSQL refuses to run as root. Run as root (CI containers), the server's files and
processes belong to an unprivileged account instead: ``postgres`` (made by the Debian package)
or else ``nobody``; the test process (root) still connects through the socket. Run as any other
user, the server runs as that user.

The folder is a short ``tempfile.mkdtemp`` path rather than pytest's ``tmp_path``: a Unix socket
path must fit in 107 bytes, and as root pytest's base folder is mode 0700 for root only, so the
unprivileged server could not enter it.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLE = "nas"
PORT = 5432  # names the socket file only (.s.PGSQL.5432 in the private folder); no TCP port is opened
INSTALL_HINT = "install the Debian package postgresql (make test does: apt-get install -y postgresql)"


def find_bindir() -> Path | None:
    """The folder of ``initdb``, ``pg_ctl`` and ``createdb``: on PATH, else the newest ``/usr/lib/postgresql/N/bin``."""
    on_path = shutil.which("initdb")
    if on_path:
        real = Path(on_path).resolve().parent  # e.g. a /usr/local/bin symlink into /usr/lib/postgresql/15/bin
        if all((real / tool).is_file() for tool in ("pg_ctl", "createdb")):
            return real
    found = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if all((d / tool).is_file() for tool in ("initdb", "pg_ctl", "createdb")) and d.parent.name.isdigit():
            found.append((int(d.parent.name), d))
    return max(found)[1] if found else None


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


@dataclass
class PostgresServer:
    """A running throwaway server; :meth:`stop` it (it is idempotent)."""

    root: Path
    bindir: Path
    account: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, db: str) -> str:
        """A plain ``postgresql://`` URL of database ``db`` over the socket, as a user would type it."""
        return f"postgresql://{ROLE}@/{db}?host={self.socket_dir}"

    def run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``bindir/tool args`` as the server's account; raises with the tool's output on failure."""
        kw: dict[str, Any] = {}
        if self.account is not None:
            kw = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.root), "PGHOST": str(self.socket_dir), "PGPORT": str(PORT)}
        r = subprocess.run([str(self.bindir / tool), *args], cwd=self.root, env=env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}\n"
                               f"--- server log\n{log}")
        return r

    def createdb(self, name: str) -> None:
        self.run("createdb", "-h", str(self.socket_dir), "-p", str(PORT), "-U", ROLE, name)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``; SIGKILL the postmaster if that fails; then remove the folder."""
        if self.root.exists() and self.postmaster_pid() is not None:
            try:
                self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                pid = self.postmaster_pid()
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)  # its backends exit when they see the postmaster gone
                    except ProcessLookupError:
                        pass
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and _alive(pid):
                        time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def start_server(bindir: Path) -> PostgresServer:
    """``initdb`` a fresh cluster and start it (socket only, trust auth, superuser :data:`ROLE`).

    On failure the half-made server is stopped and removed before the error propagates.
    """
    account = _server_account()
    root = Path(tempfile.mkdtemp(prefix="nas-pg-"))
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    server = PostgresServer(root, bindir, account)
    try:
        server.run("initdb", "-D", str(server.data), "-U", ROLE, "--auth=trust", "--locale=C", "--encoding=UTF8",
                   "--no-sync", timeout=180)
        with open(server.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"\n# throwaway test server\nlisten_addresses = ''\nunix_socket_directories = '{root}'\n"
                       f"port = {PORT}\nfsync = off\nshared_buffers = 16MB\nmax_connections = 40\n")
        server.run("pg_ctl", "start", "-D", str(server.data), "-l", str(server.log), "-w", "-t", "60", timeout=90)
    except BaseException:
        server.stop()
        raise
    return server

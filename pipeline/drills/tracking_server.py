"""The tracking server of the Kubernetes deployment, on this machine: a real PostgreSQL server (Debian's
``postgresql`` package) and ``mlflow server --app-name basic-auth`` on it, for the drill that a job logs
through authentication without leaking a credential.

PostgreSQL refuses to run as root; as root (CI's case) its processes run as ``nobody`` in a directory that
user owns. Both servers listen on 127.0.0.1 only, on free ports.
"""

from __future__ import annotations

import configparser
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import requests

AS_NOBODY = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<version>/bin`` (None without the package)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class Postgres:
    """A throwaway PostgreSQL server: ``initdb`` into a temp dir, ``pg_ctl start`` on a free port with its
    socket in that dir; superuser ``flava`` with ``password`` over TCP (scram-sha-256)."""

    USER = "flava"

    def __init__(self, password: str):
        self.password = password
        self.port = 0
        self.root: Path | None = None
        self.bin = postgres_bin()

    def __enter__(self) -> Postgres:
        if self.bin is None:
            raise FileNotFoundError(
                "no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql package"
            )
        self.root = Path(tempfile.mkdtemp(prefix="flava-pg-"))  # /tmp: reachable by nobody, unlike pytest's
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if AS_NOBODY:
            shutil.chown(self.root, "nobody")
            shutil.chown(pwfile, "nobody")
        self.port = free_port()
        self._run(
            "initdb", "-D", str(self.root / "data"), "-U", self.USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
        )  # fmt: skip
        pwfile.unlink()
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "start")  # fmt: skip
        return self

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*AS_NOBODY, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )

    def create_database(self, name: str) -> str:
        """A new database; returns its SQLAlchemy URI: the driver named (SQLAlchemy 2.1 defaults to psycopg
        3, the project pins psycopg2), the password percent-encoded."""
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.USER, password=self.password, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return (
            f"postgresql+psycopg2://{self.USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{name}"
        )

    def log(self) -> bytes:
        path = self.root / "server.log"
        return path.read_bytes() if path.is_file() else b""

    def __exit__(self, *exc) -> None:
        if self.root is None:
            return
        if (self.root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class AuthTrackingServer:
    """``mlflow server --app-name basic-auth`` with its runs and its users in PostgreSQL, configured as the
    Kubernetes ``mlflow`` Deployment is: the database URIs, the admin password and the Flask secret key come
    from the environment and a ``basic_auth.ini`` file (Secrets there), never from the command line."""

    ADMIN = "admin"
    START_TIMEOUT_S = 600  # the first start migrates both databases: 1-2 min on 2 busy cores

    def __init__(self, root: Path, backend_uri: str, auth_uri: str, admin_password: str, flask_key: str):
        self.root = Path(root)
        self.backend_uri, self.auth_uri = backend_uri, auth_uri
        self.admin_password, self.flask_key = admin_password, flask_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self.log_path = self.root / "mlflow-server.log"

    def __enter__(self) -> AuthTrackingServer:
        self.root.mkdir(parents=True, exist_ok=True)
        ini = configparser.ConfigParser(interpolation=None)
        ini["mlflow"] = {
            "default_permission": "NO_PERMISSIONS",  # a user sees the experiments it created or was granted
            "database_uri": self.auth_uri.replace("%", "%%"),  # MLflow reads it with % interpolation
            "admin_username": self.ADMIN,
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
            "auth_cache_ttl_seconds": "60",  # PBKDF2 once a minute per user, not on every request
        }
        ini_path = self.root / "basic_auth.ini"
        with os.fdopen(os.open(ini_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            ini.write(f)
        env = {
            **os.environ,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini_path),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_key,
            "MLFLOW_BACKEND_STORE_URI": self.backend_uri,
        }
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        host = f"127.0.0.1:{self.port}"
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--allowed-hosts", f"{host},localhost:{self.port}",
            "--serve-artifacts", "--artifacts-destination", (self.root / "artifacts").as_uri(),
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._proc = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self._proc.returncode}:\n{self.log()[-3000:]!r}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return self
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(
            f"mlflow server not healthy within {self.START_TIMEOUT_S} s:\n{self.log()[-3000:]!r}"
        )

    def create_user(self, username: str, password: str) -> None:
        """A user through the auth app's REST API, as the admin."""
        response = requests.post(
            f"{self.url}/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
            auth=(self.ADMIN, self.admin_password),
            timeout=30,
        )
        response.raise_for_status()

    def log(self) -> bytes:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_bytes()

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, 15)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, 9)
                self._proc.wait()
        self._log.close()

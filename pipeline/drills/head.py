"""A real ``ray start --head`` with token authentication, for ``ray job submit`` tests and drills.

The cluster is its own: free ports, its own temp dir and HOME (so the token Ray writes to
``$HOME/.ray/auth_token`` is not the developer's), started with ``--block`` so that ending that one
process stops exactly the cluster it started (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class RayHead:
    """``with RayHead(home) as head:`` a running head; ``head.env`` is a client environment (token
    auth), ``head.address`` the dashboard that serves ``ray job``. ``extra_env`` reaches every process
    of the cluster (jobs and workers inherit the head's environment, as pods get it from Secrets)."""

    def __init__(self, home: Path, num_cpus: int = 4, extra_env: dict[str, str] | None = None):
        self.home = Path(home)
        self.num_cpus = num_cpus
        self.extra_env = extra_env or {}
        self.temp_dir = ""
        self.env: dict[str, str] = {}
        self.address = ""
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    @property
    def logs_dir(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def ray(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """A ``ray`` CLI call against this cluster (``job`` subcommands get ``--address``)."""
        argv = [str(RAY), *args]
        if args and args[0] == "job":
            argv[3:3] = ["--address", self.address]
        return subprocess.run(argv, env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def job_info(self, submission_id: str) -> dict:
        """The job as Ray's job REST API describes it (``status``: PENDING, RUNNING, STOPPED, SUCCEEDED,
        FAILED; ``driver_exit_code``, ...), with the cluster's token; {} for a job it does not know (yet)."""
        request = urllib.request.Request(
            f"{self.address}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return {}
            raise

    def job_status(self, submission_id: str) -> str:
        return self.job_info(submission_id).get("status", "UNKNOWN")

    def __enter__(self) -> RayHead:
        self.home.mkdir(parents=True, exist_ok=True)
        self.temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix sockets live here
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token", PATH=f"{RAY.parent}{os.pathsep}{env['PATH']}")
        subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        gcs, dashboard, client, node_manager, object_manager, agent_grpc, agent_http, metrics, runtime_env = (
            free_ports(9)
        )
        # this cluster's processes ask this cluster's API server, not whichever Ray started last on the host
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        self.env = env
        self._log = open(self.home / "head.log", "w")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={client}",
                f"--node-manager-port={node_manager}",
                f"--object-manager-port={object_manager}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--dashboard-agent-listen-port={agent_http}",
                f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={runtime_env}",
                "--min-worker-port=0",
                "--max-worker-port=0",
                f"--num-cpus={self.num_cpus}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true",
                "--disable-usage-stats",
            ],
            env={**env, **self.extra_env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while self.ray("job", "list").returncode:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    "ray start --head exited:\n" + (self.home / "head.log").read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray head did not come up in 120 s")
            time.sleep(2)
        return self

    def __exit__(self, *exc) -> None:
        self._proc.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

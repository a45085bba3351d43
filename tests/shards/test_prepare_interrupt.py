"""A real interruption of ``jobs/prepare_data.py``: SIGKILL mid-run, then a rerun that completes.

The job runs in its own process group and starts its own local Ray (no RAY_ADDRESS), with a private
Ray temp dir (RAY_TMPDIR) so that nothing of it lands in, or is confused with, another Ray on the
machine. Every process of the job (driver, GCS, raylet, workers, agents) inherits a marker variable;
after the kill, any process still carrying this test's marker is killed too, and only those.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from raw_fixtures import image_bytes, image_folder_job_argv

from pipeline.config import StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.prepare import PLAN_KEY

ROOT = Path(__file__).resolve().parents[2]
LOCAL = StorageConfig()
N_IMAGES, SHARD_ROWS = 96, 4
N_SHARDS = N_IMAGES // SHARD_ROWS
SHARD = re.compile(r"shard-\d{6}\.parquet")
TEMPORARY = re.compile(r"shard-\d{6}\.parquet\.tmp-[0-9a-f]{8}")
MARKER = "FLAVA_PREPARE_INTERRUPT_TEST"


def _marked_pids(marker: bytes) -> list[int]:
    """Live processes whose environment carries ``marker`` (this test's job, nobody else's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_marked(marker: bytes, timeout: float = 30.0) -> list[str]:
    """SIGKILLs every process of the job until none is left; returns those that had survived."""
    survivors = []
    for pid in _marked_pids(marker):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            survivors.append(f"{pid} {cmdline[:100]}")
    deadline = time.monotonic() + timeout
    while pids := _marked_pids(marker):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of the killed job still alive: {pids}"
        time.sleep(0.2)
    return survivors


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
def test_sigkill_mid_run_leaves_only_complete_shards_and_a_rerun_completes(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    for i in range(N_IMAGES):
        (raw / f"img{i:04d}.png").write_bytes(image_bytes(i, size=(40, 36)))
    # short path: Ray's unix sockets live under it (108-byte limit)
    ray_tmp = tempfile.mkdtemp(prefix="rayint-", dir="/tmp")
    marker = f"{MARKER}={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({"PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, MARKER: marker.split("=", 1)[1]})
    cmd = [
        sys.executable,
        str(ROOT / "jobs/prepare_data.py"),
        *image_folder_job_argv(raw, out, shard_rows=SHARD_ROWS),
        "prepare.row_group_rows=4",
    ]
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    start = time.monotonic()
    try:
        with open(log1, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                deadline = time.monotonic() + 180
                while not any(SHARD.fullmatch(p.name) for p in out.glob("*.parquet")):
                    assert proc.poll() is None, f"the job ended before writing a shard:\n{_tail(log1)}"
                    assert time.monotonic() < deadline, f"no shard after 180 s:\n{_tail(log1)}"
                    time.sleep(0.02)
                print(f"first shard after {time.monotonic() - start:.1f} s")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every child in its group
                proc.wait(timeout=30)
        survivors = _kill_marked(marker.encode())
        print("processes of the job that outlived the process-group kill:", *survivors, sep="\n  ")

        assert not (out / fmt.MANIFEST_NAME).exists(), (
            f"the job finished before the kill; give it more input:\n{_tail(log1)}"
        )
        names = sorted(p.name for p in out.iterdir())
        shards = [n for n in names if SHARD.fullmatch(n)]
        assert [n for n in names if not (SHARD.fullmatch(n) or TEMPORARY.fullmatch(n))] == []
        assert 1 <= len(shards) <= N_SHARDS, names
        for name in shards:
            table = pq.read_table(out / name)  # complete: footer and every row group readable
            assert table.num_rows == SHARD_ROWS, name
            assert PLAN_KEY in pq.read_metadata(out / name).metadata, name
        kept = {n: (out / n).stat().st_mtime_ns for n in shards}
        print(
            f"{len(shards)} of {N_SHARDS} shards complete at the kill, {len(names) - len(shards)} temporaries"
        )
        start = time.monotonic()

        with open(log2, "wb") as log:
            rerun = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=False
            )
        assert rerun.returncode == 0, _tail(log2)
        print(f"rerun completed in {time.monotonic() - start:.1f} s")
        assert f"{N_SHARDS} shards planned in 1 dataset(s); {len(shards)} complete from an earlier run" in (
            log2.read_text(errors="replace")
        )
        manifest = fmt.verify_dataset(str(out), LOCAL)
        assert manifest.rows == N_IMAGES and len(manifest.shards) == N_SHARDS
        assert {n: (out / n).stat().st_mtime_ns for n in shards} == kept  # reused, not rewritten
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [fmt.MANIFEST_NAME] + [fmt.shard_name("shard", i) for i in range(N_SHARDS)]
        )  # stale temporaries removed
        keys = {k for e in manifest.shards for k in fmt.read_shard(str(out), e, LOCAL)["key"].to_pylist()}
        assert keys == {f"img{i:04d}" for i in range(N_IMAGES)}
    finally:
        _kill_marked(marker.encode())
        shutil.rmtree(ray_tmp, ignore_errors=True)

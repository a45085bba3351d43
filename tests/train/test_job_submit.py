"""``ray job submit`` against a real token-auth ``ray start --head`` (``pipeline.drills.head``: its own
ports, temp dir and HOME).

A submitted pretraining job that trains, resumes, exports and is tracked end to end is the ``job_stop``
drill (tests/faults: two submissions of the same run on this session's head, checkpoints on S3, the
commit through the runtime env); here only what a client without the right token gets.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from pipeline.drills.head import RAY

pytestmark = pytest.mark.slow


def job_list(head, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [str(RAY), "job", "list", "--address", head.address]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_the_head_wrote_its_own_token(ray_head):
    assert (ray_head.home / ".ray" / "auth_token").is_file()
    listed = job_list(ray_head, ray_head.env)
    assert listed.returncode == 0, listed.stderr[-2000:]


def test_client_with_a_wrong_token_is_refused(ray_head):
    assert job_list(ray_head, {**ray_head.env, "RAY_AUTH_TOKEN": uuid.uuid4().hex}).returncode != 0

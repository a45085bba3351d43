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


def test_the_head_wrote_its_own_token(ray_head):
    assert (ray_head.home / ".ray" / "auth_token").is_file()
    listed = subprocess.run(
        [str(RAY), "job", "list", "--address", ray_head.address],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]


def test_client_with_a_wrong_token_is_refused(ray_head):
    wrong = {**ray_head.env, "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    result = subprocess.run(
        [str(RAY), "job", "list", "--address", ray_head.address],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0

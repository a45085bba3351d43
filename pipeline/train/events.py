"""Machine-readable events of a run: what drills, tests and tools read (log lines are for people).

Each event is one small JSON object under ``<storage_path>/<run_name>/events/``, named
``<time_ns>-<event>-<random>.json``: one object per event because S3 cannot append to a file and two
writers (the driver and rank 0 of the workers) must never overwrite each other's events. ``read`` returns
them in time order. Fields: ``event``, ``time`` (unix seconds) and the event's own:

  job_start      driver, before any worker: run_name, num_workers, mlflow_run_id
  train_start    rank 0, every (re)start of the worker group: world_size, step it trains from,
                 resumed_from (checkpoint path, or null for a fresh start)
  checkpoint     rank 0, once every rank's part of a checkpoint is uploaded: step, path
  export         rank 0: uri of the transformers-layout model
  job_end        driver: status (FINISHED | FAILED | KILLED), cause (one line, for FAILED)

Writing an event never fails the run: storage that is away is logged and the event is lost.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

DIR = "events"


def record(fs: pafs.FileSystem, run_dir: str, event: str, **fields) -> None:
    now = time.time()
    body = json.dumps({"event": event, "time": now, **fields}, sort_keys=True).encode()
    path = f"{run_dir}/{DIR}/{time.time_ns():020d}-{event}-{uuid.uuid4().hex[:8]}.json"
    try:
        fs.create_dir(f"{run_dir}/{DIR}", recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(body)
    except OSError as e:
        log.warning("event %s not recorded at %s: %s", event, path, e)


def read(fs: pafs.FileSystem, run_dir: str) -> list[dict]:
    """Every event of the run, oldest first (empty before the first)."""
    selector = pafs.FileSelector(f"{run_dir}/{DIR}", allow_not_found=True)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.base_name.endswith(".json"))
    events = []
    for path in paths:
        with fs.open_input_stream(path) as f:
            events.append(json.loads(f.read()))
    return events

"""What an elastic, multi-node run is checked for before it starts: world sizes that split the global
batch, storage that every node can reach, the elastic range handed to Ray Train."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.paths import local_paths
from pipeline.train.launch import InputError, check_storage_reachable, check_world_sizes


def test_min_workers_defaults_to_a_fixed_size_and_must_not_exceed_num_workers():
    assert load_config(None, ["train.num_workers=4"]).train.worker_range == (4, 4)
    assert load_config(None, ["train.num_workers=4", "train.min_workers=2"]).train.worker_range == (2, 4)
    with pytest.raises(ConfigError, match=r"train.min_workers = 5: must be <= train.num_workers=4"):
        load_config(None, ["train.num_workers=4", "train.min_workers=5"])


def test_every_world_size_of_the_range_must_split_the_global_batch():
    check_world_sizes(load_config(None, ["data.batch_size=6", "train.num_workers=4", "train.min_workers=2"]))
    with pytest.raises(InputError) as error:
        check_world_sizes(
            load_config(None, ["data.batch_size=16", "train.num_workers=4", "train.min_workers=2"])
        )
    message = str(error.value)
    assert "global batch of 64 rows" in message and "min_workers=2..train.num_workers=4" in message
    assert "12 data partitions" in message and "a multiple of 3 (15, 18)" in message


def test_local_paths_are_refused_when_nodes_are_on_several_hosts(tmp_path):
    local = load_config(
        None, [f"train.storage_path={tmp_path}/runs", f"data.train={{text: {tmp_path}/text}}", "data.val={}"]
    )
    check_storage_reachable(local, {"10.0.0.1"})  # one host: local disks are shared by every node
    with pytest.raises(InputError) as error:
        check_storage_reachable(local, {"10.0.0.1", "10.0.0.2"})
    message = str(error.value)
    assert "nodes are on 2 hosts" in message and f"train.storage_path={tmp_path}/runs" in message
    assert f"data.train.text={tmp_path}/text" in message and "storage.shared_filesystem=true" in message
    shared = load_config(None, [f"train.storage_path={tmp_path}/runs", "storage.shared_filesystem=true"])
    check_storage_reachable(shared, {"10.0.0.1", "10.0.0.2"})
    remote = load_config(
        None,
        [
            "train.storage_path=s3://b/runs",
            "data.train={text: s3://b/text}",
            "data.val={}",
            "mlflow.tracking_uri=http://mlflow:5000",
        ],
    )
    check_storage_reachable(remote, {"10.0.0.1", "10.0.0.2"})


def test_local_paths_name_every_local_item():
    config = load_config(
        None,
        [
            "data.train={text: /d/text, image: s3://b/image}",
            "data.val={}",
            "train.storage_path=/runs",
            "mlflow.tracking_uri=sqlite:////m/mlflow.db",
        ],
    )
    assert local_paths(config) == {
        "data.train.text": "/d/text",
        "train.storage_path": "/runs",
        "mlflow.tracking_uri": "/m/mlflow.db",
    }

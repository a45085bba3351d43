"""Stopped trials' worker reservations are given back; live and foreign ones are left alone (real Ray)."""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.tune.orphans import ReleaseOrphanedWorkerGroups


@ray.remote(num_cpus=1)
class Holder:
    def ping(self) -> bool:
        return True


def state(pg) -> str:
    return placement_group_table()[pg.id.hex()]["state"]


def test_idle_worker_groups_created_during_the_sweep_are_released(ray_cluster):
    foreign = placement_group([{"CPU": 1.0}])  # existed before the sweep: never touched
    ray.get(foreign.ready())
    janitor = ReleaseOrphanedWorkerGroups({"CPU": 1.0}, workers=1, interval_s=0.0)
    janitor.setup()
    live = placement_group([{"CPU": 1.0}])
    orphan = placement_group([{"CPU": 1.0}])
    other_shape = placement_group([{"CPU": 0.5}])
    ray.get([live.ready(), orphan.ready(), other_shape.ready()])
    holder = Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(live)).remote()
    assert ray.get(holder.ping.remote())
    try:
        janitor.on_step_begin(0, [])
        assert janitor.released == []  # idle once is not enough: a new run places its workers right after
        time.sleep(0.1)
        janitor.on_step_begin(1, [])
        assert janitor.released == [orphan.id.hex()]
        assert state(orphan) == "REMOVED"
        assert state(live) == state(foreign) == state(other_shape) == "CREATED"
    finally:
        ray.kill(holder)
        for pg in (live, other_shape, foreign):
            remove_placement_group(pg)


def test_at_the_end_every_idle_worker_group_of_the_sweep_goes(ray_cluster):
    janitor = ReleaseOrphanedWorkerGroups({"CPU": 1.0}, workers=1)
    janitor.setup()
    orphan = placement_group([{"CPU": 1.0}])
    ray.get(orphan.ready())
    janitor.on_experiment_end([])
    assert state(orphan) == "REMOVED"

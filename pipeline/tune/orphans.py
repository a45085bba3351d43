"""Gives back the workers' resources of Train runs whose trial was stopped.

When ASHA stops a trial, Tune ends the trial's driver, and with it the Train controller, but the Train
worker group's placement group outlives them: Ray Train V2 leaves its removal to a helper that asks the
Ray State API (the dashboard) whether the controller died. Without a reachable dashboard (a local Ray
started without one, several Ray instances on one host) the reservation stays until the job ends, and a
sweep that stops many trials runs out of CPUs for the next ones.

A worker-group placement group is in use for the whole run (its workers hold every bundle), so one that
this sweep created, shaped like its worker groups, and found idle at two checks some seconds apart has
lost its run: it is removed. Placement groups that existed before the sweep are never touched.
"""

from __future__ import annotations

import time

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group


class ReleaseOrphanedWorkerGroups(tune.Callback):
    def __init__(self, worker_bundle: dict[str, float], workers: int, interval_s: float = 10.0):
        self._bundles = [dict(worker_bundle)] * workers
        self._interval_s = interval_s
        self._preexisting: set[str] = set()
        self._idle_before: set[str] = set()
        self._last_check = 0.0
        self.released: list[str] = []

    def setup(self, **info):
        """At the start (and at every resume): what exists now belongs to others."""
        self._preexisting = set(placement_group_table())
        self._idle_before = set()
        self._last_check = time.monotonic()

    def _candidates(self) -> dict[str, bool]:
        """Worker-group-shaped placement groups this sweep created -> whether they are idle now."""
        total, free = ray.cluster_resources(), ray.available_resources()
        found = {}
        for pg_id, pg in placement_group_table().items():
            if pg_id in self._preexisting or pg["state"] != "CREATED":
                continue
            if list(pg["bundles"].values()) != self._bundles:
                continue
            keys = [f"{resource}_group_{pg_id}" for resource in self._bundles[0]]
            found[pg_id] = all(free.get(k, 0) >= total.get(k, 0) for k in keys)
        return found

    def _release(self, pg_ids: set[str]) -> None:
        for pg_id in sorted(pg_ids):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            self.released.append(pg_id)
            print(f"[tune] released the worker reservation of a stopped trial (placement group {pg_id})")

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self._last_check < self._interval_s:
            return
        self._last_check = time.monotonic()
        idle = {pg_id for pg_id, is_idle in self._candidates().items() if is_idle}
        self._release(idle & self._idle_before)
        self._idle_before = idle - set(self.released)

    def on_experiment_end(self, trials, **info):
        """No trial of this sweep runs any more: its remaining worker groups are orphans, released once
        the killed workers have let go of them (a few seconds; bounded)."""
        deadline = time.monotonic() + 30
        while (candidates := self._candidates()) and time.monotonic() < deadline:
            self._release({pg_id for pg_id, is_idle in candidates.items() if is_idle})
            time.sleep(1.0)

"""Resharded resume on a real two-node Ray cluster: a run checkpointed by 2 workers, resumed by 1, then by 2
again, takes the same steps as one process that trains the whole global batch (which never changes size:
the single-process oracle).

Each phase is a ``TorchTrainer`` of the training loop's own parts (``build_sharded``, ``optimizer_step``,
``CheckpointManager`` through ``ray.train.report``), its workers spread over the two nodes. It is fed the
same fixed global batches (not through Ray Data): step s trains global batch s, each rank on its slice
(1/W of the rows), so a world size W of fewer ranks gives each a larger share. The batches make the ranks'
shares unequal where it matters: one rank's half holds an ITM negative (fewer contrastive queries) and
fewer MLM targets, so only losses normalised over all ranks (``model.heads.data_parallel_mean``) give the
same step at every world size. Everything runs in float64, so that AdamW's normalisation cannot blow float
reassociation noise up into lr-sized differences; the tolerances are still far tighter than fp32's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pipeline.config import from_dict, load_config, to_dict
from pipeline.storage import resolve
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.collectives import mean_across_ranks, rank_world
from pipeline.train.loop import Progress, build_sharded, optimizer_step
from tests.model import flava_batches
from tests.model.flava_batches import make_batch, slice_batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_ROWS = 8
STEPS = 6
KINDS = ("image_text", "text", "image")
VOCAB = 64


def global_batch(step: int, spec) -> dict:
    batch = make_batch(KINDS[step % 3], spec, batch_size=GLOBAL_ROWS, seed=step, negatives=(1,))
    if "mlm_labels" in batch:  # the second half of the rows: one MLM target fewer per row
        for row in range(GLOBAL_ROWS // 2, GLOBAL_ROWS):
            position = int((batch["mlm_labels"][row] != -100).nonzero()[0])
            batch["mlm_labels"][row, position] = -100
            batch["input_ids_masked"][row, position] = batch["input_ids"][row, position]
    return batch


def train_phase(loop_config: dict) -> None:
    """One phase: restore the run's newest complete checkpoint, train to ``stop``, checkpoint."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    config = from_dict(loop_config["config"])
    model, optimizer, scheduler = build_sharded(config, VOCAB, torch.device("cpu"))
    progress = Progress()
    fs, run_dir = resolve(loop_config["run_dir"], config.storage)
    manager = CheckpointManager(
        fs,
        run_dir,
        every=10**6,
        model=model,
        optimizer=optimizer,
        parts={"scheduler": scheduler, "progress": progress},
    )
    manager.restore()
    rank, world = rank_world()
    share = GLOBAL_ROWS // world
    losses = {}
    while progress.step < loop_config["stop"]:
        batch = slice_batch(global_batch(progress.step, model.spec), slice(rank * share, (rank + 1) * share))
        step_losses, *_ = optimizer_step(
            model, optimizer, scheduler, iter([batch]), 1, 1.0, model.spec.losses_for(batch["kind"])
        )
        progress.step += 1
        losses[progress.step] = mean_across_ranks({"total": step_losses["total"]}, torch.device("cpu"))[
            "total"
        ]
    manager.save(progress.step, {"losses": json.dumps(losses), "world": world})
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # the params after this phase (a run's last phase leaves its final ones)
        torch.save(full, loop_config["params_file"])


def run_phase(config, storage: Path, name: str, world: int, stop: int) -> dict[int, float]:
    trainer = TorchTrainer(
        train_phase,
        train_loop_config={
            "config": to_dict(config),
            "run_dir": str(storage / name),
            "stop": stop,
            "params_file": str(storage / f"{name}-params.pt"),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"
        ),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage)),
    )
    result = trainer.fit()
    assert result.metrics["world"] == world
    return {int(k): v for k, v in json.loads(result.metrics["losses"]).items()}


def single_process(config) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """The oracle: one process, no sharding, the whole global batch every step (float64, as the workers)."""
    from model import build_flava
    from pipeline.train.loop import model_kwargs
    from pipeline.train.optim import build_optimizer, build_scheduler

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(config.train.seed)
        model = build_flava(config.model.preset, **model_kwargs(config, VOCAB))
        optimizer = build_optimizer(model, config.train)
        scheduler = build_scheduler(optimizer, config.train)
        losses = {}
        for step in range(STEPS):
            batch = global_batch(step, model.spec)
            out, *_ = optimizer_step(
                model, optimizer, scheduler, iter([batch]), 1, 1.0, model.spec.losses_for(batch["kind"])
            )
            losses[step + 1] = out["total"]
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """(losses by step, final params) of a run resized 2 -> 1 -> 2 workers and of one process."""
    storage = tmp_path_factory.mktemp("reshard")
    for module in (sys.modules[__name__], flava_batches):  # the loop and its batches live in the tests
        ray.cloudpickle.register_pickle_by_value(module)
    config = load_config(
        ROOT / "jobs/configs/tiny-test.yaml",
        ["model.overrides={dropout: 0.0}", "train.warmup_steps=1", f"train.steps={STEPS}", "train.lr=0.01"],
    )
    resized: dict[int, float] = {}
    for world, stop in ((2, 2), (1, 4), (2, STEPS)):  # each phase resumes the previous one's checkpoint
        resized.update(run_phase(config, storage, "resized", world=world, stop=stop))
    return {"oracle": single_process(config), "resized": (resized, torch.load(storage / "resized-params.pt"))}


def test_every_step_has_the_same_loss_at_every_world_size(runs):
    straight, resized = runs["oracle"][0], runs["resized"][0]
    assert sorted(straight) == sorted(resized) == list(range(1, STEPS + 1))
    for step in straight:
        assert resized[step] == pytest.approx(straight[step], rel=1e-9, abs=1e-12), step


def test_parameters_after_a_resharded_resume_equal_the_single_process_run(runs):
    straight, resized = runs["oracle"][1], runs["resized"][1]
    assert straight.keys() == resized.keys()
    initial = build_initial()
    moved = 0
    for name, value in straight.items():
        torch.testing.assert_close(
            resized[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved += not torch.equal(value, initial[name])
    assert moved > len(straight) // 2  # the steps really moved the weights being compared


def build_initial() -> dict[str, torch.Tensor]:
    from model import build_flava

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build_flava("tiny", text_vocab_size=VOCAB, max_position_embeddings=128, dropout=0.0)
    finally:
        torch.set_default_dtype(previous)
    return {k: v.detach() for k, v in model.state_dict().items()}

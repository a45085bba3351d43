"""``model.init_encoders``: the paper's joint phase starts from the encoders of unimodal runs.

Each part (``image``, ``text``) names where its encoder's weights come from: an exported model directory
(``<run>/hf_model``, transformers layout, a whole FLAVA or a phase's export), a checkpoint directory of a
run (``<run>/checkpoint_stepNNNNNNNN``, torch.distributed.checkpoint), local or ``s3://``, or ``run:NAME``,
the latest complete checkpoint of run NAME under ``train.storage_path``. Exactly that encoder's tensors are
copied (every one of them, no other, each of this model's shape); the multimodal encoder, projections and
heads keep their random initialisation. A DINO run's checkpoint gives its teacher (as its export does).

The driver resolves ``run:NAME`` to a checkpoint directory and reads every source once before any worker
starts (``resolve``), so a missing path, a model of other dimensions or the wrong modality is an input
error there; workers then load the resolved sources (``load_encoder_``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from model.checkpoint import check_shapes, hf_encoder_state
from pipeline import storage
from pipeline.config import Config
from pipeline.paths import RUN_PREFIX
from pipeline.train import checkpoint as ckpt

DCP_MODEL = "model."  # the model's keys in a run checkpoint (pipeline.train.checkpoint.save)
TEACHER = "dino.teacher_encoder."  # a DINO image phase's teacher, preferred over its student


def resolve_source(source: str, config: Config) -> str:
    """A directory URI: ``run:NAME`` becomes the run's latest complete checkpoint."""
    if not source.startswith(RUN_PREFIX):
        return source
    name = source[len(RUN_PREFIX) :]
    run = storage.join(config.train.storage_path, name)
    fs, path = storage.resolve(run, config.storage)
    found = ckpt.find_latest(fs, path)
    if found is None:
        raise FileNotFoundError(f"run {name!r} has no complete checkpoint under {run}")
    return f"s3://{found.path}" if storage.is_s3(run) else found.path


def encoder_shapes(model: nn.Module, part: str) -> dict[str, torch.Size]:
    """Our keys of ``model``'s ``part`` encoder and their shapes (works on a meta-device model)."""
    prefix = f"{part}_encoder."
    return {k: v.shape for k, v in model.state_dict().items() if k.startswith(prefix)}


def _dcp_encoder_state(local: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    metadata = dcp.FileSystemReader(str(local)).read_metadata().state_dict_metadata
    stored = {k[len(DCP_MODEL) :]: m.size for k, m in metadata.items() if k.startswith(DCP_MODEL)}
    ours = next(iter(expected)).split(".", 1)[0] + "."
    theirs = TEACHER if ours == "image_encoder." and any(k.startswith(TEACHER) for k in stored) else ours
    available = {ours + k[len(theirs) :]: size for k, size in stored.items() if k.startswith(theirs)}
    if not available:
        raise ValueError(f"{local} holds no {ours[:-1]} (no {theirs}* tensors in its model state)")
    missing, unexpected = sorted(set(expected) - set(available)), sorted(set(available) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{local}: the {ours[:-1]} does not fit: missing {missing}, unexpected {unexpected}")
    check_shapes({k: torch.empty(size, device="meta") for k, size in available.items()}, expected, str(local))
    tensors = {theirs + k[len(ours) :]: torch.empty(size) for k, size in available.items()}
    dcp.load({"model": tensors}, checkpoint_id=str(local), no_dist=True)
    return {ours + k[len(theirs) :]: v for k, v in tensors.items()}


def read_encoder(source: str, expected: dict[str, torch.Size], config: Config) -> dict[str, torch.Tensor]:
    """The encoder tensors of a resolved source (an export or a checkpoint dir), checked against
    ``expected`` (``encoder_shapes``); ``FileNotFoundError``/``ValueError`` name what does not fit."""
    local = Path(storage.localize_dir(source, config.storage))
    if (local / "config.json").is_file():
        return hf_encoder_state(local, expected)
    if (local / ".metadata").is_file():
        return _dcp_encoder_state(local, expected)
    raise FileNotFoundError(
        f"{source} is neither an exported model (config.json) nor a run checkpoint (.metadata)"
    )


@torch.no_grad()
def load_encoder_(model: nn.Module, part: str, source: str, config: Config) -> None:
    """Copies the ``part`` encoder's weights from a resolved ``source`` into the (unsharded) model."""
    state = read_encoder(source, encoder_shapes(model, part), config)
    getattr(model, f"{part}_encoder").load_state_dict(
        {k.split(".", 1)[1]: v for k, v in state.items()}, strict=True
    )
    if hasattr(model, "dino"):  # a DINO phase continued from an encoder: its teacher starts there too
        model.dino.copy_student_(model.image_encoder)

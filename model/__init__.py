"""FLAVA in plain PyTorch: encoders, pretraining heads and losses, presets, transformers interop.

Imports neither ray nor pipeline; sharding is applied from outside (``model.sharding.parallelize``).
"""

from model.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from model.config import LOSS_NAMES, FlavaSpec
from model.flava import FlavaForPretraining, FlavaOutput
from model.presets import PRESETS, build_flava

__all__ = [
    "LOSS_NAMES",
    "PRESETS",
    "FlavaForPretraining",
    "FlavaOutput",
    "FlavaSpec",
    "build_flava",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]

"""DINO self-distillation for the image encoder (Caron et al. 2021), the paper's preferred image phase.

A student (the FLAVA image encoder plus a projection head) matches, on every crop, the centred and
sharpened distribution of an EMA teacher on the *other* global crops. The teacher is a frozen copy: it
never receives gradients and moves only by ``ema_update_`` after each optimizer step. The center is an
EMA of the teacher's outputs over every rank's batch (all-reduced), which keeps the teacher from putting
all its mass on one dimension; the low teacher temperature (sharpening) keeps it from going uniform.

Defaults follow the reference (``main_dino.py``): student temperature 0.1, teacher temperature warmed up
linearly 0.04 -> 0.07, center momentum 0.9, teacher momentum 0.996 -> 1 on a cosine, 2 global crops at
scale (0.4, 1) and local crops at (0.05, 0.4), a 3-layer MLP head (hidden 2048, bottleneck 256) and a
weight-normalised last layer with its norm fixed at 1. Differences: ``out_dim`` is a setting (the
reference's 65536 is far more prototypes than a tiny model on a small corpus can spread over), schedules
run in optimizer steps rather than epochs, the last layer is not frozen during the first epoch, there is
no weight-decay or learning-rate schedule of its own (the run's AdamW and cosine apply), and the multi-crop
views carry no colour jitter, blur or solarisation (``pipeline.data.transforms.multi_crop``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.heads import data_parallel_mean
from model.layers import upcast


@dataclass(frozen=True)
class DinoSpec:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0  # 0: no warm-up (the reference warms up over 30 epochs)
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # raised to 1 on a cosine over the run's steps


def teacher_temperature(spec: DinoSpec, step: int) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up steps."""
    if step >= spec.warmup_teacher_temp_steps:
        return spec.teacher_temp
    fraction = step / spec.warmup_teacher_temp_steps
    return spec.warmup_teacher_temp + fraction * (spec.teacher_temp - spec.warmup_teacher_temp)


def teacher_momentum(spec: DinoSpec, step: int, total_steps: int) -> float:
    """Cosine from ``teacher_momentum`` at step 0 to 1 at ``total_steps``."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - spec.teacher_momentum) * (math.cos(math.pi * progress) + 1) / 2


class DinoHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2-normalised, then a bias-free linear layer whose rows are normalised
    (the reference's weight norm with its gain fixed at 1)."""

    def __init__(self, in_dim: int, spec: DinoSpec):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, spec.hidden_dim),
            nn.GELU(),
            nn.Linear(spec.hidden_dim, spec.hidden_dim),
            nn.GELU(),
            nn.Linear(spec.hidden_dim, spec.bottleneck_dim),
        )
        self.last = nn.Linear(spec.bottleneck_dim, spec.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last.weight, dim=-1))


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-entropy of each student crop's distribution against each teacher global crop's centred,
    sharpened one, skipping the pairs of a crop with itself (the first ``len(teacher)`` student crops are
    the global crops, in the same order). The mean over pairs and over every rank's rows."""
    targets = [F.softmax((upcast(t) - center) / teacher_temp, dim=-1) for t in teacher]
    logs = [F.log_softmax(upcast(s) / student_temp, dim=-1) for s in student]
    total, pairs = torch.zeros((), device=center.device), 0
    for iq, q in enumerate(targets):
        for v, log_p in enumerate(logs):
            if v != iq:
                total = total + torch.sum(-q * log_p)
                pairs += 1
    return data_parallel_mean(total, pairs * teacher[0].shape[0])


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float) -> torch.Tensor:
    """EMA of the center towards the mean teacher output over all global crops of every rank's batch."""
    stacked = upcast(torch.cat(teacher))
    total = stacked.sum(dim=0)
    rows = torch.tensor(float(stacked.shape[0]), device=total.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(rows)
    return center * momentum + total / rows * (1 - momentum)


class DinoObjective(nn.Module):
    """The student's head, the teacher (a copy of the image encoder and head) and the center.

    ``student_encoder`` is passed to every call, not held: it belongs to the FLAVA model (so that what
    the phase trains is the FLAVA image encoder), and a module registered twice would be sharded twice.
    """

    def __init__(self, hidden_size: int, spec: DinoSpec, student_encoder: nn.Module):
        super().__init__()
        self.spec = spec
        self.head = DinoHead(hidden_size, spec)
        self.teacher_encoder = copy.deepcopy(student_encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, spec.out_dim))
        self.temperature, self.momentum = spec.teacher_temp, spec.teacher_momentum  # set_progress moves them

    @torch.no_grad()
    def copy_student_(self, student_encoder: nn.Module) -> None:
        """Teacher = student (the reference starts both from the same weights)."""
        self.teacher_encoder.load_state_dict(student_encoder.state_dict())
        self.teacher_head.load_state_dict(self.head.state_dict())

    def pairs(self, student_encoder: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student parameter, its teacher parameter), in the same order."""
        student = [*student_encoder.parameters(), *self.head.parameters()]
        teacher = [*self.teacher_encoder.parameters(), *self.teacher_head.parameters()]
        return list(zip(student, teacher, strict=True))

    @torch.no_grad()
    def ema_update_(self, student_encoder: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, shard by shard under FSDP2 (teacher and
        student are sharded alike, so each rank updates its own shard)."""
        for s, t in self.pairs(student_encoder):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

    def forward(
        self, student_encoder: nn.Module, global_crops: torch.Tensor, local_crops: torch.Tensor | None
    ) -> torch.Tensor:
        """``global_crops`` (G, B, 3, H, W), ``local_crops`` (L, B, 3, h, w) or None: the DINO loss; in
        training mode the center moves too."""
        n_global = global_crops.shape[0]

        def cls(encoder: nn.Module, crops: torch.Tensor) -> torch.Tensor:
            return encoder(crops.flatten(0, 1), interpolate_pos=True)[1][:, 0]

        student = self.head(cls(student_encoder, global_crops)).chunk(n_global)
        if local_crops is not None and local_crops.shape[0]:
            student += self.head(cls(student_encoder, local_crops)).chunk(local_crops.shape[0])
        with torch.no_grad():
            teacher = self.teacher_head(cls(self.teacher_encoder, global_crops)).chunk(n_global)
        loss = dino_loss(list(student), list(teacher), self.center, self.spec.student_temp, self.temperature)
        if self.training:
            self.center.copy_(updated_center(self.center, list(teacher), self.spec.center_momentum))
        return loss

"""Pure numpy transforms from shard rows to the model's batch dict (no ray, no torch).

Two stages, so that the expensive work parallelises in Ray Data and the random work stays reproducible:

- ``prepare_rows`` (deterministic, CPU-heavy; runs in Ray Data tasks): decode images (kept uint8, a
  quarter of the float32 bytes through the object store), tokenise captions, drop bad rows with a reason.
- ``augment_batch`` (random, cheap; runs where the batch is consumed, with an explicit generator):
  normalisation fused with the horizontal flip (switching the MIM targets to the flipped codes) in one
  pass, BEiT block masking, MLM masking, ITM negatives; for a DINO image phase, the multi-crop views
  instead (``multi_crop``). Seeding it per (kind, epoch, batch) makes the stream reproducible and
  checkpointable.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PATCH_SIZE = 16
IGNORE_INDEX = -100
CODEBOOK_SIZE = 8192

# uint8 -> normalised float32 per channel as a lookup table: one gather per value instead of three ops
_NORM_LUT = (
    (np.arange(256, dtype=np.float32)[None, :] / 255.0 - CLIP_MEAN[:, None]) / CLIP_STD[:, None]
).astype(np.float32)

IMAGE_KEYS = ("pixel_values", "bool_masked_pos", "mim_labels")
TEXT_KEYS = ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels")
BATCH_KEYS = {
    "image": IMAGE_KEYS,
    "text": TEXT_KEYS,
    "image_text": IMAGE_KEYS + TEXT_KEYS + ("itm_labels",),
}


class Tokenize(Protocol):
    """What the transforms need from a tokenizer (see pipeline.data.tokenizer.WordPieceTokenizer)."""

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class MultiCrop:
    """DINO's views of an image (Caron et al. 2021): global crops at the canonical size and smaller local
    ones, each a random resized crop of a ``scale`` share of the image's area, maybe mirrored."""

    global_crops: int
    local_crops: int
    global_size: int
    local_size: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]


@dataclass(frozen=True)
class TransformParams:
    """Everything the transforms need, picklable so that it travels to Ray tasks and Train workers."""

    image_size: int
    max_text_length: int
    mlm_probability: float
    mim_mask_ratio: float
    itm_negative_fraction: float
    flip_probability: float
    mask_token_id: int
    special_token_ids: tuple[int, ...]  # never masked, never drawn as random replacements
    text_vocab_size: int
    codebook_size: int = CODEBOOK_SIZE
    multi_crop: MultiCrop | None = None  # image batches become DINO views (no MIM masks or codes)

    @property
    def code_grid(self) -> int:
        return self.image_size // PATCH_SIZE

    @property
    def num_patches(self) -> int:
        return self.code_grid**2


# ---------------------------------------------------------------------------------------------- images


def decode_images(images: list[bytes] | np.ndarray, image_size: int) -> tuple[np.ndarray, list[str | None]]:
    """Decodes to uint8 (n, H, W, 3); rows that fail get a reason (and zeros) instead of raising.

    A wrong size is a failure too: the stored codes belong to the canonical size, so resizing here
    would silently misalign the MIM targets.
    """
    out = np.zeros((len(images), image_size, image_size, 3), dtype=np.uint8)
    reasons: list[str | None] = [None] * len(images)
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.size != (image_size, image_size):
                    reasons[i] = "image_size_mismatch"
                    continue
                out[i] = np.asarray(img.convert("RGB"))
        except Exception:  # PIL raises many types for corrupt bytes; each one is a counted skip
            reasons[i] = "undecodable_image"
    return out, reasons


def normalize(pixels: np.ndarray, mirrored: np.ndarray | None = None) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) normalised with the CLIP mean/std; rows where
    ``mirrored`` is True come out horizontally flipped (in the same pass: no second copy)."""
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    if mirrored is None or not mirrored.any():
        for c in range(3):
            np.take(_NORM_LUT[c], pixels[..., c], out=out[:, c])
        return out
    for i, mirror in enumerate(mirrored):
        image = pixels[i, :, ::-1] if mirror else pixels[i]
        for c in range(3):
            np.take(_NORM_LUT[c], image[..., c], out=out[i, c])
    return out


def flip_images(
    pixels: np.ndarray, codes: np.ndarray, codes_flipped: np.ndarray, probability: float, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalises uint8 (n, H, W, 3) images, horizontally flipping a random subset; flipped rows take
    the codes computed on the flipped image.

    Returns (pixel_values, mim codes, flipped mask). No crop or resize: the codes must stay aligned.
    """
    flipped = rng.random(len(pixels)) < probability
    return normalize(pixels, flipped), np.where(flipped[:, None], codes_flipped, codes), flipped


def crop_box(
    size: int, scale: tuple[float, float], rng, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width) in a square image of ``size`` px:
    an area share drawn from ``scale`` and a log-uniform aspect ratio, 10 tries, else the whole image."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = size * size * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= size and 0 < h <= size:
            return int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w
    return 0, 0, size, size


def resize_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, as torch's ``align_corners=False``) of a (C, H, W) crop to
    (C, size, size). Every output value is a convex mix of input values: the range never grows."""
    top, left, h, w = box

    def axis(start: int, length: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip(start + (np.arange(size) + 0.5) * length / size - 0.5, 0, limit - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, limit - 1), (pos - lo).astype(np.float32)

    y0, y1, wy = axis(top, h, image.shape[1])
    x0, x1, wx = axis(left, w, image.shape[2])
    rows = image[:, y0] * (1 - wy)[None, :, None] + image[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def multi_crop(
    pixel_values: np.ndarray, spec: MultiCrop, flip_probability: float, rng
) -> tuple[np.ndarray, np.ndarray]:
    """(global crops (G, n, C, S, S), local crops (L, n, C, s, s)) of normalised images (n, C, H, W).

    Random resized crops plus horizontal flips; the reference's colour jitter, grey scale, blur and
    solarisation are left out (the demo corpus is synthetic colour fields, where colour is the content).
    """
    n, channels, size, _ = pixel_values.shape
    views = []
    for count, out_size, scale in (
        (spec.global_crops, spec.global_size, spec.global_scale),
        (spec.local_crops, spec.local_size, spec.local_scale),
    ):
        out = np.empty((count, n, channels, out_size, out_size), dtype=np.float32)
        for v in range(count):
            for i in range(n):
                crop = resize_crop(pixel_values[i], crop_box(size, scale, rng), out_size)
                out[v, i] = crop[..., ::-1] if rng.random() < flip_probability else crop
        views.append(out)
    return views[0], views[1]


def min_block_patches(num_patches: int) -> int:
    """BEiT's 16-patch minimum block on 14x14, scaled to the grid."""
    return max(1, round(16 * num_patches / 196))


def sample_blocks(
    grid: int,
    mask_ratio: float,
    rng,
    min_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """BEiT block-wise masking of one (grid, grid) patch grid: (flat bool mask, blocks as top/left/h/w).

    Rectangles of area >= ``min_block`` (less only for the last block, when the remaining budget is
    smaller) and height/width within ``aspect`` are added until round(ratio * N) patches are masked.
    Unlike the reference, a rounded rectangle that breaks a constraint is rejected rather than kept,
    so every block obeys the constraints exactly.
    """
    n = grid * grid
    target = int(round(mask_ratio * n))
    min_block = min_block_patches(n) if min_block is None else min_block
    mask = np.zeros((grid, grid), dtype=bool)
    blocks: list[tuple[int, int, int, int]] = []
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = failures = 0
    while count < target and failures < 20:
        budget = target - count
        lo = min(min_block, budget)
        area = rng.uniform(lo, max(budget, lo) + 1e-9)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(area * ratio)))
        w = int(round(math.sqrt(area / ratio)))
        if 1 <= h <= grid and 1 <= w <= grid and h * w >= lo and aspect[0] <= h / w <= aspect[1]:
            top = int(rng.integers(0, grid - h + 1))
            left = int(rng.integers(0, grid - w + 1))
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[:] = True
                blocks.append((top, left, h, w))
                count += new
                failures = 0
                continue
        failures += 1
    return mask.reshape(-1), blocks


def block_mask(grid: int, mask_ratio: float, rng) -> np.ndarray:
    return sample_blocks(grid, mask_ratio, rng)[0]


def block_masks(batch_size: int, grid: int, mask_ratio: float, rng) -> np.ndarray:
    """Per-sample block masks, (batch, grid*grid) bool."""
    if batch_size == 0:
        return np.zeros((0, grid * grid), dtype=bool)
    return np.stack([block_mask(grid, mask_ratio, rng) for _ in range(batch_size)])


# ------------------------------------------------------------------------------------------------ text


def mlm_mask(
    input_ids: np.ndarray,
    probability: float,
    mask_token_id: int,
    special_token_ids: tuple[int, ...],
    vocab_size: int,
    rng,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: ``probability`` of the non-special tokens; of those 80% [MASK], 10% random, 10% kept.

    Returns (masked ids, labels) with labels = IGNORE_INDEX where not selected. Special and padding
    tokens are never selected and never drawn as replacements.
    """
    specials = np.asarray(special_token_ids)
    candidates = ~np.isin(input_ids, specials)
    selected = candidates & (rng.random(input_ids.shape) < probability)
    labels = np.where(selected, input_ids, IGNORE_INDEX).astype(np.int64)
    action = rng.random(input_ids.shape)
    masked = input_ids.astype(np.int64, copy=True)
    masked[selected & (action < 0.8)] = mask_token_id
    replace = selected & (action >= 0.8) & (action < 0.9)
    pool = np.setdiff1d(np.arange(vocab_size), specials)
    masked[replace] = pool[rng.integers(0, len(pool), size=int(replace.sum()))]
    return masked, labels


def itm_sources(input_ids: np.ndarray, fraction: float, rng) -> np.ndarray:
    """For each pair, the index whose caption it gets: itself, or (for negatives) another sample.

    round(fraction * B) random pairs become negatives; each takes the caption of a random other sample
    whose token ids differ from its own, so a negative never carries its own caption (nor a verbatim
    duplicate of it). Where no such sample exists (all captions equal) the pair stays positive.
    """
    b = len(input_ids)
    sources = np.arange(b)
    if b < 2 or fraction <= 0:
        return sources
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)
    for i in rng.choice(b, size=int(round(fraction * b)), replace=False):
        others = np.flatnonzero(~same[i])
        if len(others):
            sources[i] = others[rng.integers(0, len(others))]
    return sources


# ------------------------------------------------------------------------------------- the two stages


SKIP_REASONS = ("image_size_mismatch", "undecodable_image", "codes_out_of_range", "empty_text")


def prepare_columns(
    kind: str, columns: dict[str, object], params: TransformParams, tokenizer: Tokenize | None
) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """Shard columns -> deterministic per-row arrays for every row, and per row the reason it is unusable
    (None if usable; an unusable row's arrays are zeros).

    ``columns`` holds ``image`` (sequence of bytes), ``dvae_codes``/``dvae_codes_flipped`` (n, N) ints,
    ``text`` (sequence of str), as the kind has them.
    """
    n = len(next(iter(columns.values())))
    reasons: list[str | None] = [None] * n
    out: dict[str, np.ndarray] = {}
    if kind in ("image", "image_text"):
        pixels, decoded = decode_images(columns["image"], params.image_size)
        codes = np.asarray(columns["dvae_codes"])
        codes_flipped = np.asarray(columns["dvae_codes_flipped"])
        bad_codes = ((codes < 0) | (codes >= params.codebook_size)).any(1) | (
            (codes_flipped < 0) | (codes_flipped >= params.codebook_size)
        ).any(1)
        for i, reason in enumerate(decoded):
            reasons[i] = reason or ("codes_out_of_range" if bad_codes[i] else None)
        out["pixels"] = pixels
        out["dvae_codes"] = codes.astype(np.int16, copy=False)
        out["dvae_codes_flipped"] = codes_flipped.astype(np.int16, copy=False)
    if kind in ("text", "image_text"):
        texts = [t if isinstance(t, str) else "" for t in columns["text"]]
        ids, attention = tokenizer.encode(texts)
        # [CLS] [SEP] only: nothing left to learn from (empty or whitespace/control-only caption)
        for i in np.flatnonzero(attention.sum(1) <= 2):
            reasons[i] = reasons[i] or "empty_text"
        out["input_ids"] = ids.astype(np.int32, copy=False)
        out["attention_mask"] = attention.astype(np.int8, copy=False)
    return out, reasons


def prepare_rows(
    kind: str, columns: dict[str, object], params: TransformParams, tokenizer: Tokenize | None
) -> tuple[dict[str, np.ndarray], Counter]:
    """``prepare_columns`` with the unusable rows dropped and counted by reason."""
    out, reasons = prepare_columns(kind, columns, params, tokenizer)
    keep = np.array([r is None for r in reasons], dtype=bool)
    return {k: v[keep] for k, v in out.items()}, Counter(r for r in reasons if r)


def augment_batch(kind: str, rows: dict[str, np.ndarray], params: TransformParams, rng) -> dict:
    """Prepared rows -> the model's batch dict (contract key names, dtypes and fixed shapes).

    For an ITM negative (itm_labels 0) all text fields describe the borrowed caption, so the one
    attention_mask fits both input_ids and input_ids_masked (as in transformers' FlavaForPreTraining);
    contrastive and MMM losses use the positive rows only.
    """
    batch: dict = {"kind": kind}
    if kind == "image" and params.multi_crop is not None:
        batch["global_crops"], batch["local_crops"] = multi_crop(
            normalize(rows["pixels"]), params.multi_crop, params.flip_probability, rng
        )
    elif kind in ("image", "image_text"):
        pixels, codes, _ = flip_images(
            rows["pixels"], rows["dvae_codes"], rows["dvae_codes_flipped"], params.flip_probability, rng
        )
        batch["pixel_values"] = pixels
        batch["bool_masked_pos"] = block_masks(len(pixels), params.code_grid, params.mim_mask_ratio, rng)
        batch["mim_labels"] = codes.astype(np.int64)
    if kind in ("text", "image_text"):
        ids = rows["input_ids"].astype(np.int64)
        attention = rows["attention_mask"].astype(np.int64)
        if kind == "image_text":
            sources = itm_sources(ids, params.itm_negative_fraction, rng)
            ids, attention = ids[sources], attention[sources]
            batch["itm_labels"] = (sources == np.arange(len(sources))).astype(np.int64)
        masked, labels = mlm_mask(
            ids,
            params.mlm_probability,
            params.mask_token_id,
            params.special_token_ids,
            params.text_vocab_size,
            rng,
        )
        batch.update(input_ids=ids, input_ids_masked=masked, attention_mask=attention, mlm_labels=labels)
    return batch


def batch_rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator for one batch, keyed by (seed, ...) so any batch can be regenerated independently."""
    return np.random.default_rng([seed, *stream])

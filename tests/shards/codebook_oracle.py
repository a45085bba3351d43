"""dVAE codes recomputed from a stored image without any of ``pipeline/shards/codebook.py``: PIL decode,
Lanczos downsampling to the codebook's input size and FLAVA's logit-Laplace pixel mapping written out
here, transformers' ``FlavaImageCodebook`` (rebuilt from what the manifest records, or loaded from the
weights the test saved), and the flip done with numpy (cross-checked against PIL's own mirror)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.shards import format as fmt

EPS = 0.1  # FLAVA's logit-Laplace epsilon (transformers: image_processing_flava.LOGIT_LAPLACE_EPS)


def random_init_codebook(identity: fmt.CodebookIdentity, seed: int | None = None):
    """The random-init FlavaImageCodebook the manifest describes (or one of another ``seed``)."""
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    recorded_seed = int(re.fullmatch(r"random-init\((\d+)\)", identity.identity).group(1))
    hidden = int(re.fullmatch(r"flava-image-codebook\(hidden_size=(\d+)\)", identity.name).group(1))
    torch.manual_seed(recorded_seed if seed is None else seed)
    return FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=hidden)).eval()


def saved_codebook(path: Path):
    from transformers import FlavaImageCodebook

    return FlavaImageCodebook.from_pretrained(path).eval()


def oracle_pixels(rgb: np.ndarray, input_size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, s, s) as FlavaImageProcessor prepares codebook pixels: Lanczos resize,
    rescale to [0, 1], map x -> (1 - 2 eps) x + eps. float32 throughout, in that order."""
    small = Image.fromarray(rgb).resize((input_size, input_size), resample=Image.Resampling.LANCZOS)
    x = np.asarray(small, dtype=np.float32) / np.float32(255)
    x = np.float32(1 - 2 * EPS) * x + np.float32(EPS)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def oracle_codes(codebook, rgb: np.ndarray, input_size: int) -> np.ndarray:
    with torch.inference_mode():
        return codebook.get_codebook_indices(oracle_pixels(rgb, input_size))[0].numpy()


def stored_rgb(image: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, PIL's horizontal mirror of them) of a stored image."""
    with Image.open(io.BytesIO(image)) as im:
        rgb = np.asarray(im.convert("RGB"))
        mirrored = np.asarray(im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return rgb, mirrored


def check_rows(codebook, rows: list[dict], input_size: int) -> None:
    """Every row's ``dvae_codes`` and ``dvae_codes_flipped`` are the oracle's codes of its stored image
    and of that image mirrored."""
    for row in rows:
        rgb, mirrored = stored_rgb(row["image"])
        flipped = np.fliplr(rgb)
        np.testing.assert_array_equal(flipped, mirrored)  # numpy's flip is PIL's horizontal mirror
        codes = oracle_codes(codebook, rgb, input_size).reshape(-1)
        np.testing.assert_array_equal(codes, row["dvae_codes"], err_msg=row["key"])
        codes_flipped = oracle_codes(codebook, flipped, input_size).reshape(-1)
        np.testing.assert_array_equal(codes_flipped, row["dvae_codes_flipped"], err_msg=row["key"])

"""dVAE codes (FLAVA's MIM targets) from transformers' ``FlavaImageCodebook``.

The codebook sees exactly the pixels the trainer will decode from the stored bytes: the caller passes
the *encoded* canonical image, which is decoded here, downsampled to ``image_size / 2`` and mapped like
``FlavaImageProcessor`` does for the codebook (rescale to [0, 1], then ``x * (1 - 2 eps) + eps`` with
eps = 0.1, i.e. ``codebook_do_map_pixels``; its codebook mean/std are 0/1, a no-op). A G x G grid of
codes then lines up with the G x G patches of the image the model sees. ``dvae_codes_flipped`` are
the codes of the horizontally flipped decoded image, which is not the flipped grid of codes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.config import PrepareConfig, StorageConfig
from pipeline.shards.format import CodebookIdentity

log = logging.getLogger(__name__)

LOGIT_LAPLACE_EPS = 0.1  # transformers.models.flava.image_processing_flava.LOGIT_LAPLACE_EPS
VOCAB_SIZE = 8192
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def decode_image(data: bytes) -> np.ndarray:
    """Stored bytes -> uint8 (H, W, 3), as the trainer decodes them."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def codebook_pixels(images: np.ndarray | list[np.ndarray], input_size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, s, s) in the codebook's input range.

    Downsampling uses Lanczos, the resample ``FlavaImageProcessor`` uses for codebook inputs.
    """
    out = np.empty((len(images), 3, input_size, input_size), dtype=np.float32)
    for i, image in enumerate(images):
        small = Image.fromarray(image).resize((input_size, input_size), Image.Resampling.LANCZOS)
        out[i] = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return out * (1 - 2 * LOGIT_LAPLACE_EPS) + LOGIT_LAPLACE_EPS


def _weights_sha256(local_dir: str) -> str:
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{local_dir}: no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def codebook_identity(prep: PrepareConfig, storage_cfg: StorageConfig) -> CodebookIdentity:
    """What produced the codes, for the manifest. Warns loudly when no weights were given."""
    if prep.patch_size != 16 or prep.image_size % 16:
        raise ValueError(
            f"prepare.image_size {prep.image_size} / patch_size {prep.patch_size}: the codebook turns "
            "image_size/2 pixels into an (image_size/16)^2 grid, so patch_size must be 16 and image_size "
            "a multiple of 16"
        )
    common = {
        "image_size": prep.image_size,
        "input_size": prep.image_size // 2,
        "code_grid": prep.image_size // prep.patch_size,
        "vocab_size": VOCAB_SIZE,
    }
    if prep.codebook:
        local = storage.localize_dir(prep.codebook, storage_cfg)
        return CodebookIdentity(name=prep.codebook, identity=_weights_sha256(local), **common)
    bar = "!" * 100
    log.warning(
        "\n%s\nNO CODEBOOK WEIGHTS GIVEN (prepare.codebook is empty): dVAE codes come from a RANDOMLY "
        "INITIALISED FlavaImageCodebook\n(seed %d, hidden_size %d). These MIM targets are not FLAVA's; "
        "fine for demos and tests only.\nThe manifest records random-init(%d). For real runs pass "
        "prepare.codebook=<dir or s3:// URI of facebook/flava-image-codebook>.\n%s",
        bar,
        prep.codebook_seed,
        prep.codebook_hidden_size,
        prep.codebook_seed,
        bar,
    )
    return CodebookIdentity(
        name=f"flava-image-codebook(hidden_size={prep.codebook_hidden_size})",
        identity=f"random-init({prep.codebook_seed})",
        **common,
    )


class ImageCodebook:
    """A frozen codebook in eval mode on the best local device; computes codes from encoded images."""

    def __init__(self, prep: PrepareConfig, storage_cfg: StorageConfig, device: str | None = None):
        import torch
        from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if prep.codebook:
            model = FlavaImageCodebook.from_pretrained(storage.localize_dir(prep.codebook, storage_cfg))
        else:
            # every actor builds the same weights: init draws only from the seeded global generator
            torch.manual_seed(prep.codebook_seed)
            model = FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=prep.codebook_hidden_size))
        if model.config.vocab_size != VOCAB_SIZE:
            raise ValueError(
                f"codebook vocab_size {model.config.vocab_size}, FLAVA's MIM head expects {VOCAB_SIZE}"
            )
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.input_size = prep.image_size // 2
        self.grid = prep.image_size // prep.patch_size
        self.batch_size = prep.codebook_batch_size

    def _indices(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                chunk = self.torch.from_numpy(pixels[start : start + self.batch_size]).to(self.device)
                out.append(self.model.get_codebook_indices(chunk).cpu().numpy())
        codes = np.concatenate(out) if out else np.empty((0, self.grid, self.grid), dtype=np.int64)
        if codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(
                f"codebook produced a {codes.shape[1:]} grid, expected {self.grid} x {self.grid}"
            )
        return codes.reshape(len(codes), self.grid * self.grid).astype(np.int16)

    def codes(self, encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(codes, codes of the flipped image), each int16 (B, G*G) row-major."""
        images = [decode_image(b) for b in encoded]
        images += [np.ascontiguousarray(im[:, ::-1]) for im in images]
        codes = self._indices(codebook_pixels(images, self.input_size))
        return codes[: len(encoded)], codes[len(encoded) :]

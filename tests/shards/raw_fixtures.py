"""Builders of small raw sources (good and bad inputs) for the shard tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import PrepareConfig

# bad inputs of a captioned folder and the skip reason each must be counted under
BAD_PAIRS = {
    "corrupt": "corrupt_image",
    "truncated": "corrupt_image",
    "zero": "zero_byte_file",
    "tiny": "image_too_small",
    "latin1": "non_utf8_text",
    "blank": "empty_text",
    "dupe": "duplicate_key",
    "uncaptioned": "missing_caption",
    "ghost": "missing_image",
}


def small_prep(**overrides) -> PrepareConfig:
    """Settings that keep a test run to seconds: 32 px images, a narrow random-init codebook."""
    values = dict(
        image_size=32,
        min_image_size=16,
        shard_rows=8,
        row_group_rows=4,
        codebook_hidden_size=16,
        codebook_batch_size=16,
    )
    values.update(overrides)
    return PrepareConfig(**values)


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A blocky random picture (so that codes differ between images), non-square to exercise cropping."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[: size[1], : size[0]]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def captioned_folder(root: Path, n: int, bad: bool = False, csv: bool = False) -> dict[str, str]:
    """n good pairs (key -> caption), plus one input of every bad class when ``bad``."""
    root.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str | bytes]] = []
    good = {}
    for i in range(n):
        (root / f"img{i:03d}.png").write_bytes(image_bytes(i))
        rows.append((f"img{i:03d}.png", f"picture number {i}"))
        good[f"img{i:03d}"] = f"picture number {i}"
    if bad:
        (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png at all")
        (root / "truncated.png").write_bytes(image_bytes(1000)[:200])
        (root / "zero.jpg").write_bytes(b"")
        (root / "tiny.png").write_bytes(image_bytes(1001, size=(12, 40)))
        for i, name in enumerate(("latin1", "blank", "dupe", "uncaptioned")):
            (root / f"{name}.png").write_bytes(image_bytes(2000 + i))
        rows += [
            ("corrupt.png", "a corrupt file"),
            ("truncated.png", "a truncated file"),
            ("zero.jpg", "an empty file"),
            ("tiny.png", "a tiny picture"),
            ("latin1.png", "caf\xe9".encode("latin-1")),
            ("blank.png", "   "),
            ("dupe.png", "the first of two"),
            ("dupe.png", "the second of two"),
            ("ghost.png", "a caption without a picture"),
        ]
        good["dupe"] = "the first of two"
    with open(root / ("captions.csv" if csv else "captions.jsonl"), "wb") as f:
        if csv:
            f.write(b"file,caption\n")
        for name, caption in rows:
            if isinstance(caption, bytes):  # raw non-UTF-8 bytes, as a broken scraper would write them
                line = (
                    b'"' + name.encode() + b'",'
                    if csv
                    else b'{"file": "' + name.encode() + b'", "caption": "'
                )
                f.write(line + caption + (b"\n" if csv else b'"}\n'))
            elif csv:
                f.write(f'"{name}","{caption}"\n'.encode())
            else:
                f.write((json.dumps({"file": name, "caption": caption}) + "\n").encode())
    return good


def webdataset_tar(path: Path, n: int, start: int = 0) -> dict[str, str]:
    """An img2dataset-style tar: <key>.jpg + <key>.txt + <key>.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    good = {}
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            members = {
                f"{key}.jpg": image_bytes(i, fmt="JPEG"),
                f"{key}.txt": f"caption of sample {i}".encode(),
                f"{key}.json": json.dumps({"key": key, "status": "success"}).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            good[key] = f"caption of sample {i}"
    return good


def text_files(root: Path) -> dict[str, str]:
    """A .txt (one text per line) and a .jsonl (field "text"); key -> text of the good lines."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "lines.txt").write_bytes(b"the first line\r\nthe second line\n\nthe fourth line\n")
    (root / "docs.jsonl").write_bytes(
        b'{"text": "a json document"}\n{"text": "caf\xe9"}\nnot json\n{"text": "another document"}\n'
        b'{"text": "escaped \\udc80 surrogate"}\n'
    )
    return {
        "lines.txt:1": "the first line",
        "lines.txt:2": "the second line",
        "lines.txt:4": "the fourth line",
        "docs.jsonl:1": "a json document",
        "docs.jsonl:4": "another document",
    }


def image_folder_job_argv(raw, out, shard_rows: int = 8) -> list[str]:
    """``jobs/prepare_data.py`` overrides for a small image folder: 32 px, a narrow random codebook."""
    return [
        "prepare.source=image_folder",
        f"prepare.inputs=[{raw}]",
        f"prepare.output={out}",
        "prepare.image_size=32",
        "prepare.min_image_size=16",
        "prepare.codebook_hidden_size=16",
        f"prepare.shard_rows={shard_rows}",
    ]

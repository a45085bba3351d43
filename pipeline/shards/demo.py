"""A deterministic demo corpus (no download) converted through the same path as real data.

Pictures are coloured shapes on a plain background and each caption states what is drawn: colours,
shapes, counts and left/right/top/bottom placement ("two red circles on the left and a blue square on
the right"). Every caption word is grounded in pixels, so even a small model trained for minutes can
beat chance at zero-shot retrieval. Image-only pictures come from the same generator, and text-only
sentences from the same vocabulary, so the three kinds share one world.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.config import Config
from pipeline.shards.prepare import PrepareReport, execute, plan

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
# a group occupies one half of the picture; its objects sit in slots along that half
REGIONS = {"left": (0, 0, 0.5, 1), "right": (0.5, 0, 1, 1), "top": (0, 0, 1, 0.5), "bottom": (0, 0.5, 1, 1)}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
TEMPLATES = ("{}", "a picture of {}", "an image with {}", "a drawing of {}")
RAW_SIZE = 96  # generated pictures are larger than the demo's 64 px, so canonical resizing is exercised


def _one(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def _phrase(count: int, colour: str, shape: str) -> str:
    return _one(colour, shape) if count == 1 else f"{COUNTS[count - 1]} {colour} {shape}s"


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One picture and the caption that describes it."""
    grey = int(rng.integers(225, 256))
    image = Image.new("RGB", (RAW_SIZE, RAW_SIZE), (grey, grey, int(rng.integers(215, 256))))
    draw = ImageDraw.Draw(image)
    first = str(rng.choice(list(REGIONS)))
    regions = [first, OPPOSITE[first]] if rng.random() < 0.6 else [first]
    colours = rng.choice(list(COLOURS), size=len(regions), replace=False)
    phrases = []
    for region, colour in zip(regions, colours, strict=True):
        shape, count = str(rng.choice(SHAPES)), int(rng.integers(1, 4))
        rx0, ry0, rx1, ry1 = (v * RAW_SIZE for v in REGIONS[region])
        vertical = region in ("left", "right")
        slot = ((ry1 - ry0) if vertical else (rx1 - rx0)) / 3
        for i in rng.choice(3, size=count, replace=False):
            side = float(rng.uniform(0.55, 0.8)) * min(slot, (rx1 - rx0) if vertical else (ry1 - ry0))
            cx = (rx0 + rx1) / 2 if vertical else rx0 + (i + 0.5) * slot
            cy = ry0 + (i + 0.5) * slot if vertical else (ry0 + ry1) / 2
            cx, cy = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
            _draw(draw, shape, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), COLOURS[colour])
        phrases.append(f"{_phrase(count, str(colour), shape)} {PLACE[region]}")
    return image, str(rng.choice(TEMPLATES)).format(" and ".join(phrases))


def sentence(rng: np.random.Generator) -> str:
    """A text-only sentence over the same vocabulary (relations the pictures also show)."""
    c1, c2 = rng.choice(list(COLOURS), size=2, replace=False)
    s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
    relation = str(rng.choice(["to the left of", "to the right of", "above", "below"]))
    form = int(rng.integers(0, 3))
    if form == 0:
        return f"the {c1} {s1} is {relation} the {c2} {s2}."
    if form == 1:
        n, where = int(rng.integers(1, 4)), PLACE[str(rng.choice(list(PLACE)))]
        return f"there {'is' if n == 1 else 'are'} {_phrase(n, str(c1), str(s1))} {where}."
    return f"{_one(str(c1), str(s1))} and {_one(str(c2), str(s2))} are drawn on a plain background."


def write_raw(raw: Path, pairs: int, images: int, texts: int, seed: int) -> dict[str, Path]:
    """Writes the raw sources (captioned folder, image folder, text file) once per parameter set."""
    params = {"pairs": pairs, "images": images, "texts": texts, "seed": seed, "size": RAW_SIZE}
    done = raw / "DONE"
    paths = {"image_text": raw / "pairs", "image": raw / "images", "text": raw / "texts.txt"}
    if done.exists() and json.loads(done.read_text()) == params:
        return paths
    shutil.rmtree(raw, ignore_errors=True)
    paths["image_text"].mkdir(parents=True)
    paths["image"].mkdir(parents=True)
    rng_pairs, rng_images, rng_texts = (np.random.default_rng([seed, k]) for k in range(3))
    with open(paths["image_text"] / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(pairs):
            image, caption = scene(rng_pairs)
            image.save(paths["image_text"] / f"pair{i:06d}.png")
            f.write(json.dumps({"file": f"pair{i:06d}.png", "caption": caption}) + "\n")
    for i in range(images):
        scene(rng_images)[0].save(paths["image"] / f"image{i:06d}.png")
    paths["text"].write_text("".join(sentence(rng_texts) + "\n" for _ in range(texts)), encoding="utf-8")
    done.write_text(json.dumps(params))
    return paths


def prepare_demo(config: Config) -> PrepareReport:
    """Generates the raw demo sources and prepares ``<demo.root>/<kind>/{train,val}`` in one Ray run."""
    demo = config.demo
    raw = (
        Path(tempfile.gettempdir()) / f"flava-demo-raw-{demo.seed}"
        if storage.is_s3(demo.root)
        else Path(demo.root).expanduser() / "raw"
    )
    paths = write_raw(raw, demo.pairs, demo.images, demo.texts, demo.seed)
    sources = {"image_text": "captioned_folder", "image": "image_folder", "text": "text"}
    plans = []
    for kind, source in sources.items():
        prep = dataclasses.replace(
            config.prepare,
            source=source,
            inputs=[str(paths[kind])],
            captions="",
            output=storage.join(demo.root, kind),
            val_fraction=demo.val_fraction,
        )
        plans += plan(prep, config.storage)
    return execute(plans, config.prepare, config.storage)

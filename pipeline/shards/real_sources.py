"""The multi-source example: the real corpus of ``../shared/data/real_corpus.py`` (Tux Paint stamps with
captions, Open Clip Art images, WordNet glosses) split by a property into named sources of three kinds,
each then prepared into ``<out>/<source>/{train,val}`` shards.

The splits give sources that differ in domain and quality, as real corpora's do:
  stamps-nature   image_text  animals, plants, food, natural forces
  stamps-symbols  image_text  letters, digits, signs and shapes: little for a caption to describe
  stamps-things   image_text  every other stamp category (town, vehicles, seasonal, household, ...)
  clipart         image       Open Clip Art drawings
  glosses-usage   text        WordNet glosses with quoted usage examples (sentences)
  glosses-plain   text        WordNet glosses without (short definitions)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NATURE = ("animals", "plants", "food", "naturalforces")
SOURCES = {  # name -> (kind, prepare.source)
    "stamps-nature": ("image_text", "captioned_folder"),
    "stamps-symbols": ("image_text", "captioned_folder"),
    "stamps-things": ("image_text", "captioned_folder"),
    "clipart": ("image", "image_folder"),
    "glosses-usage": ("text", "text"),
    "glosses-plain": ("text", "text"),
}


def stamp_source(file_name: str) -> str:
    """The source of a Tux Paint stamp, by its category (the first folder of its path in the package)."""
    category = file_name.split("__", 1)[0]
    if category == "symbols":
        return "stamps-symbols"
    return "stamps-nature" if category in NATURE else "stamps-things"


def gloss_source(gloss: str) -> str:
    return "glosses-usage" if '"' in gloss else "glosses-plain"


def split_real_corpus(corpus: Path, raw: Path, max_images: int, max_texts: int) -> dict[str, Path]:
    """Writes each source's raw input under ``raw`` (a captioned folder, an image folder or a text file)
    and returns the input of each; idempotent (rewrites ``raw``)."""
    shutil.rmtree(raw, ignore_errors=True)
    inputs = {name: raw / name for name in SOURCES}
    for name, (_, source) in SOURCES.items():
        if source != "text":
            inputs[name].mkdir(parents=True)
    captions: dict[str, list[str]] = {name: [] for name, (kind, _) in SOURCES.items() if kind == "image_text"}
    for line in (corpus / "tuxpaint" / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        name = stamp_source(json.loads(line)["file"])
        shutil.copy(corpus / "tuxpaint" / "images" / json.loads(line)["file"], inputs[name])
        captions[name].append(line)
    for name, lines in captions.items():
        (inputs[name] / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for path in sorted((corpus / "openclipart" / "images").glob("*.png"))[:max_images]:
        shutil.copy(path, inputs["clipart"])
    texts: dict[str, list[str]] = {"glosses-usage": [], "glosses-plain": []}
    for gloss in (corpus / "wordnet" / "texts.txt").read_text(encoding="utf-8").splitlines():
        bucket = texts[gloss_source(gloss)]
        if gloss.strip() and len(bucket) < max_texts:
            bucket.append(gloss)
    for name, lines in texts.items():
        inputs[name] = raw / f"{name}.txt"
        inputs[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return inputs

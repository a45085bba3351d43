"""A PNG contact sheet of batches as they leave the pipeline, to check the data by looking at it.

Images are de-normalised; MIM-masked patches are shaded red. Captions show the model's input tokens:
MLM-masked positions in colour ([MASK] red, random replacement orange with the original in brackets,
kept-but-predicted blue). Image-text pairs carry their ITM label (1 = match, 0 = borrowed caption).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import Config
from pipeline.data.tokenizer import WordPieceTokenizer
from pipeline.data.transforms import CLIP_MEAN, CLIP_STD, IGNORE_INDEX

TILE = 160
CAPTION_H = 60
PAD = 8
HEADER_H = 22
COLOURS = {"mask": (200, 0, 0), "random": (230, 120, 0), "kept": (0, 70, 200), "plain": (20, 20, 20)}


def collect_batches(config: Config, tokenizer: WordPieceTokenizer, per_source: int) -> list[dict]:
    """``per_source`` batches of each source with ratio > 0, drawn from the real stream (needs ray.init)."""
    from pipeline.data.datasets import build_train_data
    from pipeline.data.stream import MixedStream

    data = build_train_data(config, tokenizer)
    stream = MixedStream(data.spec, rank=0, world=config.train.num_workers)  # what rank 0 of the run reads
    try:  # by source, not by ratio, so rare sources show up too
        return [stream.next_of(name) for name in data.spec.sources for _ in range(per_source)]
    finally:
        stream.close()


def to_uint8_image(chw: np.ndarray) -> np.ndarray:
    hwc = chw.transpose(1, 2, 0) * CLIP_STD + CLIP_MEAN
    return (np.clip(hwc, 0, 1) * 255).round().astype(np.uint8)


def image_tile(pixel_values: np.ndarray, masked: np.ndarray) -> Image.Image:
    img = Image.fromarray(to_uint8_image(pixel_values)).resize((TILE, TILE), Image.NEAREST).convert("RGBA")
    grid = int(round(len(masked) ** 0.5))
    cell = TILE / grid
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for p in np.flatnonzero(masked):
        r, c = divmod(int(p), grid)
        box = (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1)
        draw.rectangle(box, fill=(255, 0, 0, 110), outline=(255, 0, 0, 200))
    return Image.alpha_composite(img, overlay).convert("RGB")


def caption_words(batch: dict, i: int, tokenizer: WordPieceTokenizer) -> list[tuple[str, str]]:
    """(text, style) per non-pad token of the model's masked input."""
    ids, masked, labels = batch["input_ids"][i], batch["input_ids_masked"][i], batch["mlm_labels"][i]
    words = []
    for pos in np.flatnonzero(batch["attention_mask"][i]):
        shown = tokenizer.decode_tokens([masked[pos]])[0]
        if labels[pos] == IGNORE_INDEX:
            words.append((shown, "plain"))
        elif masked[pos] == tokenizer.mask_id:
            words.append((shown, "mask"))
        elif masked[pos] != ids[pos]:
            words.append((f"{shown}({tokenizer.decode_tokens([ids[pos]])[0]})", "random"))
        else:
            words.append((shown, "kept"))
    return words


def draw_words(draw: ImageDraw.ImageDraw, words, box: tuple[int, int, int, int], font) -> None:
    x0, y0, x1, y1 = box
    x, y = x0, y0
    line_h = font.size + 3
    for text, style in words:
        width = font.getlength(text + " ")
        if x + width > x1 and x > x0:
            x, y = x0, y + line_h
        if y + line_h > y1:
            draw.text((x, y), "...", fill=COLOURS["plain"], font=font)
            return
        draw.text((x, y), text, fill=COLOURS[style], font=font)
        x += width


def render_contact_sheet(batches: list[dict], tokenizer: WordPieceTokenizer, samples: int = 6) -> Image.Image:
    font = ImageFont.load_default(size=11)
    header_font = ImageFont.load_default(size=13)
    cell_w = TILE + PAD
    rows = []
    for index, batch in enumerate(batches):
        kind = batch["kind"]
        n = min(samples, len(batch["attention_mask" if kind == "text" else "pixel_values"]))
        has_image, has_text = kind != "text", kind != "image"
        height = (
            HEADER_H
            + (TILE if has_image else 0)
            + (CAPTION_H if has_text else 0)
            + (18 if kind == "image_text" else 0)
        )
        row = Image.new("RGB", (PAD + n * cell_w, height + PAD), "white")
        draw = ImageDraw.Draw(row)
        extra = ""
        if has_image:
            extra += f"  MIM masked {batch['bool_masked_pos'].mean():.0%}"
        if has_text:
            words = batch["attention_mask"].sum() - 2 * len(batch["attention_mask"])  # less [CLS], [SEP]
            extra += f"  MLM {(batch['mlm_labels'] != IGNORE_INDEX).sum() / max(1, words):.0%} of words"
        draw.text((PAD, 4), f"batch {index}: {kind}{extra}", fill="black", font=header_font)
        for i in range(n):
            x, y = PAD + i * cell_w, HEADER_H
            if has_image:
                row.paste(image_tile(batch["pixel_values"][i], batch["bool_masked_pos"][i]), (x, y))
                y += TILE
            if kind == "image_text":
                match = int(batch["itm_labels"][i]) == 1
                draw.text(
                    (x, y + 2),
                    "ITM 1 match" if match else "ITM 0 negative",
                    font=font,
                    fill=(0, 140, 0) if match else (200, 0, 0),
                )
                y += 18
            if has_text:
                draw_words(
                    draw, caption_words(batch, i, tokenizer), (x, y + 2, x + TILE, y + CAPTION_H), font
                )
        rows.append(row)
    legend = Image.new("RGB", (max(r.width for r in rows), HEADER_H + 4), "white")
    draw = ImageDraw.Draw(legend)
    x = PAD
    for text, style in (
        ("MLM:", "plain"),
        ("[MASK]", "mask"),
        ("random(original)", "random"),
        ("kept", "kept"),
        ("   red patches = MIM-masked", "mask"),
    ):
        draw.text((x, 6), text, fill=COLOURS[style], font=header_font)
        x += header_font.getlength(text + "  ")
    rows.insert(0, legend)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet

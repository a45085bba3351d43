"""Raw-source adapters: list the records of a raw source cheaply on the driver, load them on workers.

Listing reads only directory listings, captions files, tar headers and line offsets, so the driver
holds references (where the bytes are), never the images. The order of the references is a pure
function of the inputs (sorted files, then order inside a file), which is what makes shard assignment
and therefore resuming deterministic. Problems visible while listing (duplicate keys, images without
caption, captions without image, malformed caption rows) become a ``skip`` reason on the reference,
so they are counted exactly like the problems found while decoding.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, replace

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import StorageConfig

SOURCES = {
    "captioned_folder": "image_text",
    "webdataset": "image_text",
    "image_folder": "image",
    "text": "text",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TEXT_EXTENSIONS = (".txt", ".jsonl")

# Skip reasons, as they appear in manifests and summaries.
ZERO_BYTE = "zero_byte_file"
CORRUPT_IMAGE = "corrupt_image"  # undecodable or truncated
IMAGE_TOO_SMALL = "image_too_small"
NON_UTF8_TEXT = "non_utf8_text"
EMPTY_TEXT = "empty_text"
DUPLICATE_KEY = "duplicate_key"
MISSING_CAPTION = "missing_caption"
MISSING_IMAGE = "missing_image"
MALFORMED_RECORD = "malformed_record"  # a captions/jsonl row that is not valid JSON or lacks the field
UNREADABLE = "unreadable_file"  # listed, but reading it failed (vanished, permissions, I/O error)
CORRUPT_ARCHIVE = "corrupt_archive"  # a tar whose remaining members cannot be listed

_FILE_FIELDS = ("file", "file_name", "filename", "image", "path")
_CAPTION_FIELDS = ("caption", "text")


class SourceError(ValueError):
    """An input that cannot be listed at all (missing path, wrong type, unusable captions file)."""


@dataclass(frozen=True)
class Span:
    """Bytes ``[offset, offset + length)`` of a file (``length`` -1: the whole file)."""

    uri: str
    offset: int = 0
    length: int = -1


@dataclass(frozen=True)
class RawRef:
    """One raw record before loading: where its image and text live."""

    key: str
    origin: str  # names the input in messages: a path, ``tar:member`` or ``file:line``
    image: Span | None = None
    text: Span | None = None
    caption: str | None = None  # inline text from a captions file (lone surrogates = non-UTF-8 bytes)
    text_field: str = ""  # ``text`` is a JSON line and this is the field holding the text
    skip: str = ""  # reason already known from listing
    size_hint: int = 0  # raw bytes, for sizing shards before decoding


@dataclass
class RawRecord:
    key: str
    origin: str
    image: bytes | None
    text: str | None
    skip: str = ""


def kind_of(source: str) -> str:
    if source not in SOURCES:
        raise SourceError(f"unknown prepare.source {source!r}; expected one of {', '.join(SOURCES)}")
    return SOURCES[source]


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def _file_uri(root_uri: str, root_path: str, path: str) -> str:
    return storage.join(root_uri, os.path.relpath(path, root_path).replace(os.sep, "/"))


def _list_files(
    uri: str, storage_cfg: StorageConfig, extensions: tuple[str, ...]
) -> list[tuple[str, str, int]]:
    """(relative path, uri, size) of the files under a directory (or the file itself), sorted."""
    fs, path = storage.resolve(uri, storage_cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"input not found: {uri}")
    if info.type == pafs.FileType.File:
        if not uri.lower().endswith(extensions):
            raise SourceError(f"{uri}: expected a directory or a file ending in {', '.join(extensions)}")
        return [(uri.rstrip("/").rsplit("/", 1)[-1], uri, info.size)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [
        (os.path.relpath(i.path, path).replace(os.sep, "/"), _file_uri(uri, path, i.path), i.size)
        for i in infos
        if i.type == pafs.FileType.File and i.path.lower().endswith(extensions)
    ]
    return sorted(files)


def _mark_duplicates(refs: list[RawRef]) -> list[RawRef]:
    """The first occurrence of a key wins; later ones are skipped as duplicates."""
    seen: set[str] = set()
    out = []
    for ref in refs:
        if ref.key in seen and not ref.skip:
            ref = replace(ref, skip=DUPLICATE_KEY)
        seen.add(ref.key)
        out.append(ref)
    return out


def _read_captions(uri: str, storage_cfg: StorageConfig) -> list[tuple[str, str | None, str | None]]:
    """(origin, file name, caption) per row; None where the row is malformed."""
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except (FileNotFoundError, OSError) as e:
        raise SourceError(f"captions file not readable: {uri} ({e})") from e
    # surrogateescape keeps undecodable bytes visible as lone surrogates, so one bad caption is a
    # counted skip instead of failing the whole file
    text = raw.decode("utf-8", errors="surrogateescape")
    rows: list[tuple[str, str | None, str | None]] = []
    if uri.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        fields = reader.fieldnames or []
        file_col = next((f for f in _FILE_FIELDS if f in fields), None)
        cap_col = next((f for f in _CAPTION_FIELDS if f in fields), None)
        if file_col is None or cap_col is None:
            raise SourceError(
                f"{uri}: CSV header needs a file column ({'/'.join(_FILE_FIELDS)}) and a caption column "
                f"({'/'.join(_CAPTION_FIELDS)}); got {fields}"
            )
        for row in reader:
            rows.append((f"{uri}:{reader.line_num}", row.get(file_col), row.get(cap_col)))
        return rows
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{uri}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            rows.append((origin, None, None))
            continue
        if not isinstance(obj, dict):
            rows.append((origin, None, None))
            continue
        name = next((obj[f] for f in _FILE_FIELDS if f in obj), None)
        caption = next((obj[f] for f in _CAPTION_FIELDS if f in obj), None)
        rows.append(
            (origin, name if isinstance(name, str) else None, caption if isinstance(caption, str) else None)
        )
    return rows


def _default_captions(folder: str, storage_cfg: StorageConfig) -> str:
    for name in ("captions.jsonl", "captions.csv"):
        uri = storage.join(folder, name)
        if storage.exists(uri, storage_cfg):
            return uri
    raise SourceError(f"{folder}: no captions.jsonl or captions.csv (set prepare.captions)")


def list_captioned_folder(folder: str, captions: str, storage_cfg: StorageConfig) -> list[RawRef]:
    images = {rel: (uri, size) for rel, uri, size in _list_files(folder, storage_cfg, IMAGE_EXTENSIONS)}
    captions_uri = captions or _default_captions(folder, storage_cfg)
    refs, captioned = [], set()
    for origin, name, caption in _read_captions(captions_uri, storage_cfg):
        if name is None or caption is None:
            refs.append(
                RawRef(
                    key=f"{captions_uri}#{origin.rsplit(':', 1)[-1]}", origin=origin, skip=MALFORMED_RECORD
                )
            )
            continue
        rel = name.removeprefix("./")
        captioned.add(rel)
        if rel not in images:
            refs.append(RawRef(key=_stem(rel), origin=f"{origin} (file {rel})", skip=MISSING_IMAGE))
            continue
        uri, size = images[rel]
        refs.append(RawRef(key=_stem(rel), origin=uri, image=Span(uri), caption=caption, size_hint=size))
    for rel, (uri, size) in images.items():
        if rel not in captioned:
            refs.append(RawRef(key=_stem(rel), origin=uri, skip=MISSING_CAPTION, size_hint=size))
    # sorted by key so that the order (and thus the shard of every record) does not depend on the
    # order of rows in the captions file; ties keep file order so the first duplicate wins
    return sorted(refs, key=lambda r: r.key)


def list_image_folder(folder: str, storage_cfg: StorageConfig) -> list[RawRef]:
    return [
        RawRef(key=_stem(rel), origin=uri, image=Span(uri), size_hint=size)
        for rel, uri, size in _list_files(folder, storage_cfg, IMAGE_EXTENSIONS)
    ]


def list_tar(uri: str, storage_cfg: StorageConfig) -> list[RawRef]:
    """Groups ``<key>.<ext>`` members of an img2dataset/webdataset tar by key, in archive order."""
    fs, path = storage.resolve(uri, storage_cfg)
    groups: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
    broken = ""
    try:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            try:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and "." in base:
                        stem, ext = base.split(".", 1)
                        groups[member.name[: len(member.name) - len(base)] + stem]["." + ext.lower()] = member
            except tarfile.ReadError as e:
                broken = str(e)
    except (tarfile.ReadError, OSError) as e:
        raise SourceError(f"{uri}: not a readable tar archive ({e})") from e
    refs = []
    for key, members in groups.items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        caption = members.get(".txt")
        origin = f"{uri}:{(image or caption or next(iter(members.values()))).name}"
        if image is None:
            refs.append(RawRef(key=key, origin=origin, skip=MISSING_IMAGE))
        elif caption is None:
            refs.append(RawRef(key=key, origin=origin, skip=MISSING_CAPTION, size_hint=image.size))
        else:
            refs.append(
                RawRef(
                    key=key,
                    origin=origin,
                    image=Span(uri, image.offset_data, image.size),
                    text=Span(uri, caption.offset_data, caption.size),
                    size_hint=image.size + caption.size,
                )
            )
    if broken:
        refs.append(RawRef(key=f"{uri}#rest", origin=f"{uri} ({broken})", skip=CORRUPT_ARCHIVE))
    return refs


def list_text_file(uri: str, rel: str, storage_cfg: StorageConfig) -> list[RawRef]:
    """One record per line; a ``.jsonl`` line holds a JSON object with a ``text`` field."""
    data = storage.read_bytes(uri, storage_cfg)
    field = "text" if uri.lower().endswith(".jsonl") else ""
    refs, offset = [], 0
    for n, line in enumerate(data.split(b"\n"), start=1):
        if offset >= len(data):  # the empty tail after a final newline is not a line
            break
        refs.append(
            RawRef(
                key=f"{rel}:{n}",
                origin=f"{uri}:{n}",
                text=Span(uri, offset, len(line)),
                text_field=field,
                size_hint=len(line),
            )
        )
        offset += len(line) + 1
    return refs


def list_refs(source: str, inputs: list[str], captions: str, storage_cfg: StorageConfig) -> list[RawRef]:
    """All raw records of a source, in deterministic order, duplicates marked."""
    kind_of(source)
    if not inputs:
        raise SourceError("prepare.inputs is empty: give the folders, .tar files or text files to convert")
    if captions and (source != "captioned_folder" or len(inputs) != 1):
        raise SourceError("prepare.captions applies to a captioned_folder source with exactly one input")
    refs: list[RawRef] = []
    for uri in inputs:
        if source == "captioned_folder":
            refs += list_captioned_folder(uri, captions, storage_cfg)
        elif source == "image_folder":
            refs += list_image_folder(uri, storage_cfg)
        elif source == "webdataset":
            for _, tar_uri, _ in _list_files(uri, storage_cfg, (".tar",)):
                refs += list_tar(tar_uri, storage_cfg)
        else:
            for rel, file_uri, _ in _list_files(uri, storage_cfg, TEXT_EXTENSIONS):
                refs += list_text_file(file_uri, rel, storage_cfg)
    return _mark_duplicates(refs)


def read_spans(spans: list[Span], storage_cfg: StorageConfig) -> list[bytes | OSError]:
    """The bytes of each span; spans of one file (tar members, lines) come from one ranged read."""
    out: list[bytes | OSError] = [b""] * len(spans)
    by_uri: dict[str, list[int]] = defaultdict(list)
    for i, span in enumerate(spans):
        by_uri[span.uri].append(i)
    filesystems: dict[bool, pafs.FileSystem] = {}  # one client per scheme, not one per file
    for uri, idx in by_uri.items():
        try:
            scheme = storage.is_s3(uri)
            if scheme not in filesystems:
                filesystems[scheme] = storage.resolve(uri, storage_cfg)[0]
            fs, path = filesystems[scheme], storage.fs_path(uri)
            if any(spans[i].length < 0 for i in idx):
                with fs.open_input_stream(path) as f:
                    data, base = f.read(), 0
            else:
                base = min(spans[i].offset for i in idx)
                end = max(spans[i].offset + spans[i].length for i in idx)
                with fs.open_input_file(path) as f:
                    data = f.read_at(end - base, base)
        except OSError as e:
            for i in idx:
                out[i] = e
            continue
        for i in idx:
            start = spans[i].offset - base
            out[i] = data[start:] if spans[i].length < 0 else data[start : start + spans[i].length]
    return out


def _decode_text(raw: bytes | str, field: str) -> tuple[str | None, str]:
    """(text, skip reason) of a caption or line: strict UTF-8, JSON field when ``field``."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, NON_UTF8_TEXT
    if field:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return None, MALFORMED_RECORD
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            return None, MALFORMED_RECORD
        raw = obj[field]
    # lone surrogates: undecodable bytes kept by surrogateescape, or "\udc80"-style JSON escapes
    if any("\ud800" <= c <= "\udfff" for c in raw):
        return None, NON_UTF8_TEXT
    text = raw.strip()
    return (text, "") if text else (None, EMPTY_TEXT)


def load_records(refs: list[RawRef], storage_cfg: StorageConfig) -> list[RawRecord]:
    """Reads the bytes of the references; text is decoded and checked here, images by the caller."""
    wanted = [
        (i, part) for i, r in enumerate(refs) if not r.skip for part in ("image", "text") if getattr(r, part)
    ]
    blobs = dict(zip(wanted, read_spans([getattr(refs[i], p) for i, p in wanted], storage_cfg), strict=True))
    records = []
    for i, ref in enumerate(refs):
        image, text, skip = blobs.get((i, "image")), None, ref.skip
        if any(isinstance(blobs.get((i, p)), OSError) for p in ("image", "text")):
            skip = UNREADABLE
        if not skip and (ref.text is not None or ref.caption is not None):
            raw = blobs[(i, "text")] if ref.text is not None else ref.caption
            text, skip = _decode_text(raw.rstrip(b"\r") if isinstance(raw, bytes) else raw, ref.text_field)
        records.append(RawRecord(ref.key, ref.origin, None if skip else image, None if skip else text, skip))
    return records

"""Listing and loading raw sources, without Ray."""

from __future__ import annotations

import tarfile

import pytest
from raw_fixtures import BAD_PAIRS, captioned_folder, image_bytes, text_files, webdataset_tar

from pipeline.config import StorageConfig
from pipeline.shards.sources import SourceError, list_refs, load_records

LOCAL = StorageConfig()


def _load(source, inputs, captions=""):
    return {r.key: r for r in load_records(list_refs(source, inputs, captions, LOCAL), LOCAL)}


@pytest.mark.parametrize("csv", [False, True], ids=["jsonl", "csv"])
def test_captioned_folder_marks_every_listing_and_text_problem(tmp_path, csv):
    good = captioned_folder(tmp_path, 3, bad=True, csv=csv)
    records = load_records(list_refs("captioned_folder", [str(tmp_path)], "", LOCAL), LOCAL)
    text_reasons = {"non_utf8_text", "empty_text", "duplicate_key", "missing_caption", "missing_image"}
    found = {r.key: r.skip for r in records if r.skip}
    assert found == {k: v for k, v in BAD_PAIRS.items() if v in text_reasons}
    loaded = {r.key: r for r in records if not r.skip}
    # image problems are the decoder's business: here they still carry their (bad) bytes
    assert set(loaded) == set(good) | {"corrupt", "truncated", "zero", "tiny"}
    assert loaded["img001"].text == "picture number 1"
    assert loaded["img001"].image == (tmp_path / "img001.png").read_bytes()
    assert loaded["dupe"].text == "the first of two"


def test_webdataset_tar_members_are_grouped_by_key(tmp_path):
    good = webdataset_tar(tmp_path / "a.tar", 3)
    good |= webdataset_tar(tmp_path / "b.tar", 2, start=3)
    with tarfile.open(tmp_path / "b.tar", "a") as tar:  # an image without its caption
        tar.add(tmp_path / "a.tar", arcname="999.jpg")
    records = _load("webdataset", [str(tmp_path)])
    assert {k: r.text for k, r in records.items() if not r.skip} == good
    assert records["999"].skip == "missing_caption"
    assert records["000000004"].image == image_bytes(4, fmt="JPEG")
    assert records["000000004"].origin.endswith("b.tar:000000004.jpg")


def test_text_files_one_record_per_line(tmp_path):
    good = text_files(tmp_path)
    records = _load("text", [str(tmp_path)])
    assert {k: r.text for k, r in records.items() if not r.skip} == good
    assert {k: r.skip for k, r in records.items() if r.skip} == {
        "lines.txt:3": "empty_text",
        "docs.jsonl:2": "non_utf8_text",
        "docs.jsonl:3": "malformed_record",
        "docs.jsonl:5": "non_utf8_text",
    }


@pytest.mark.parametrize(
    "source,inputs,message",
    [
        ("image_folder", ["/nonexistent/images"], "input not found: /nonexistent/images"),
        ("captioned_folder", [], "prepare.inputs is empty"),
        ("text", ["{tmp}/a.png"], "expected a directory or a file ending in"),
        ("folder_of_things", ["{tmp}"], "unknown prepare.source 'folder_of_things'"),
        ("captioned_folder", ["{tmp}"], "no captions.jsonl or captions.csv"),
    ],
)
def test_unusable_inputs_are_errors_naming_them(tmp_path, source, inputs, message):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    with pytest.raises(SourceError, match=message.replace("{tmp}", str(tmp_path))):
        list_refs(source, [i.replace("{tmp}", str(tmp_path)) for i in inputs], "", LOCAL)


def test_truncated_tar_keeps_complete_members_and_counts_the_rest(tmp_path):
    webdataset_tar(tmp_path / "full.tar", 4)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    refs = list_refs("webdataset", [str(tmp_path / "cut.tar")], "", LOCAL)
    assert refs[-1].skip == "corrupt_archive" and "cut.tar" in refs[-1].origin
    assert any(not r.skip for r in refs)

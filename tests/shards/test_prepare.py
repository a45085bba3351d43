"""prepare: raw sources -> verified shards through a real local Ray cluster."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections import Counter

import pytest
from codebook_oracle import check_rows, random_init_codebook
from raw_fixtures import (
    BAD_PAIRS,
    captioned_folder,
    image_bytes,
    image_folder_job_argv,
    small_prep,
    text_files,
    webdataset_tar,
)

from pipeline.config import StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.codebook import decode_image
from pipeline.shards.prepare import (
    PrepareError,
    ShardTask,
    assign_shards,
    execute,
    format_report,
    load_shard,
    plan,
    prepare,
    write_shard_task,
)
from pipeline.shards.sources import RawRef

LOCAL = StorageConfig()


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    """One Ray run preparing a dataset of every source, with bad inputs mixed in."""
    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("out")
    expected = {
        "pairs": captioned_folder(raw / "pairs", 10, bad=True),
        "tars": webdataset_tar(raw / "tars" / "00000.tar", 6)
        | webdataset_tar(raw / "tars" / "00001.tar", 5, 6),
        "texts": text_files(raw / "texts"),
    }
    (raw / "images" / "sub").mkdir(parents=True)
    for i in range(7):
        (raw / "images" / "sub" / f"photo{i}.jpg").write_bytes(
            image_bytes(100 + i, size=(60, 36), fmt="JPEG")
        )
    (raw / "images" / "broken.png").write_bytes(b"garbage")
    expected["images"] = {f"sub/photo{i}": None for i in range(7)}
    base = small_prep()
    sources = {"pairs": "captioned_folder", "tars": "webdataset", "images": "image_folder", "texts": "text"}
    preps = {
        name: dataclasses.replace(base, source=source, inputs=[str(raw / name)], output=str(out / name))
        for name, source in sources.items()
    }
    plans = [p for prep in preps.values() for p in plan(prep, LOCAL)]
    report = execute(plans, base, LOCAL)
    return {"raw": raw, "out": out, "expected": expected, "report": report, "prep": base}


def _rows(dataset):
    manifest = fmt.verify_dataset(dataset, LOCAL)
    rows = [r for e in manifest.shards for r in fmt.read_shard(dataset, e, LOCAL).to_pylist()]
    return manifest, rows


@pytest.mark.parametrize(
    "name,kind", [("pairs", "image_text"), ("tars", "image_text"), ("images", "image"), ("texts", "text")]
)
def test_round_trip_each_source(prepared, name, kind):
    manifest, rows = _rows(str(prepared["out"] / name))
    expected = prepared["expected"][name]
    assert manifest.kind == kind
    assert sorted(r["key"] for r in rows) == sorted(expected)
    if kind != "image":
        assert {r["key"]: r["text"] for r in rows} == expected
    if kind != "text":
        assert manifest.codebook.identity == "random-init(0)" and manifest.codebook.code_grid == 2
        for row in rows:
            assert decode_image(row["image"]).shape == (32, 32, 3)
            assert len(row["dvae_codes"]) == len(row["dvae_codes_flipped"]) == 4
    else:
        assert manifest.codebook is None


def test_shards_follow_the_size_limits(prepared):
    manifest, _ = _rows(str(prepared["out"] / "tars"))
    assert [s.rows for s in manifest.shards] == [8, 3]  # shard_rows = 8, 11 records


def test_every_bad_input_is_skipped_and_counted(prepared):
    manifest, rows = _rows(str(prepared["out"] / "pairs"))
    assert manifest.skipped == dict(Counter(BAD_PAIRS.values()))
    assert len(rows) == 11  # 10 good pairs + the first of the duplicates
    images, _ = _rows(str(prepared["out"] / "images"))
    assert images.skipped == {"corrupt_image": 1}
    texts, _ = _rows(str(prepared["out"] / "texts"))
    assert texts.skipped == {"empty_text": 1, "non_utf8_text": 2, "malformed_record": 1}
    table = format_report(prepared["report"])
    for reason in set(BAD_PAIRS.values()):
        assert reason in table


@pytest.mark.parametrize("name", ["pairs", "images"])
def test_codes_are_those_of_the_stored_image(prepared, name):
    """The independent oracle (``codebook_oracle``, no ``pipeline.shards.codebook``) recomputes every row's
    codes from its stored image, one image at a time."""
    manifest, rows = _rows(str(prepared["out"] / name))
    check_rows(random_init_codebook(manifest.codebook), rows, manifest.codebook.input_size)
    # the codes of a flipped image are not the flipped grid of codes, hence the second column
    assert any(r["dvae_codes"] != r["dvae_codes_flipped"] for r in rows)


WORKER_FOUND = {
    k: v
    for k, v in BAD_PAIRS.items()
    if v in ("corrupt_image", "zero_byte_file", "image_too_small", "non_utf8_text", "empty_text")
}
LISTING_FOUND = {k: v for k, v in BAD_PAIRS.items() if k not in WORKER_FOUND}


@pytest.mark.parametrize("bad_key", sorted(LISTING_FOUND))
def test_strict_fails_at_listing_naming_the_input(tmp_path, bad_key):
    captioned_folder(tmp_path, 2, bad=True)
    prep = small_prep(
        source="captioned_folder", inputs=[str(tmp_path)], output=str(tmp_path / "out"), strict=True
    )
    for other in set(LISTING_FOUND) - {bad_key}:  # leave only this one listing problem in the folder
        _remove_input(tmp_path, other)
    with pytest.raises(PrepareError, match=f"{bad_key}.*: {LISTING_FOUND[bad_key]} \\(strict mode"):
        plan(prep, LOCAL)


def _remove_input(folder, key):
    for path in folder.glob(f"{key}.*"):
        path.unlink()
    lines = (folder / "captions.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "captions.jsonl").write_bytes(
        b"".join(line for line in lines if f'"{key}.'.encode() not in line)
    )


@pytest.mark.parametrize("bad_key", sorted(WORKER_FOUND))
def test_strict_refuses_a_shard_with_a_bad_input(tmp_path, bad_key):
    """The decode and write stages as plain functions: in strict mode the shard is not written."""
    captioned_folder(tmp_path, 2, bad=True)
    prep = small_prep(source="captioned_folder", inputs=[str(tmp_path)], output=str(tmp_path / "out"))
    (p,) = plan(prep, LOCAL)
    refs = [r for shard in p.shards for r in shard if r.key in (bad_key, "img000")]
    task = pickle.dumps(ShardTask(p.dataset, p.kind, 0, "shard-000000.parquet", refs))
    row = load_shard({"task": task}, prep, LOCAL)
    result = write_shard_task(row, dataclasses.replace(prep, strict=True), LOCAL)
    assert result["entry"] == "" and json.loads(result["skipped"]) == {WORKER_FOUND[bad_key]: 1}
    assert bad_key in json.loads(result["examples"])[WORKER_FOUND[bad_key]]
    assert not (tmp_path / "out").exists()


def test_strict_run_fails_naming_the_input_and_writes_no_manifest(ray_cluster, tmp_path):
    captioned_folder(tmp_path / "raw", 4)
    (tmp_path / "raw" / "img002.png").write_bytes(b"\x89PNG broken")
    prep = small_prep(
        source="captioned_folder", inputs=[str(tmp_path / "raw")], output=str(tmp_path / "out"), strict=True
    )
    with pytest.raises(PrepareError, match="img002.png: corrupt_image"):
        prepare(prep, LOCAL)
    assert not (tmp_path / "out" / fmt.MANIFEST_NAME).exists()


def test_rerun_after_an_interruption_rewrites_only_missing_shards(ray_cluster, tmp_path):
    webdataset_tar(tmp_path / "raw" / "data.tar", 20)
    out = tmp_path / "out"
    prep = small_prep(source="webdataset", inputs=[str(tmp_path / "raw")], output=str(out), shard_rows=5)
    first = prepare(prep, LOCAL)
    manifest = fmt.verify_dataset(str(out), LOCAL)
    assert len(manifest.shards) == 4 and first.rows_computed == 20
    # an interruption: no manifest yet, one shard never written, one mid-write temporary, one torn copy
    (out / fmt.MANIFEST_NAME).unlink()
    (out / "shard-000002.parquet").unlink()
    (out / "shard-000001.parquet.tmp-deadbeef").write_bytes(b"partial")
    torn = out / "shard-000003.parquet"
    torn.write_bytes(torn.read_bytes()[:300])
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].parquet")}
    second = prepare(prep, LOCAL)
    assert second.rows_computed == 10  # shards 2 and 3 only
    assert [d.new_shards for d in second.datasets] == [2]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].parquet")} == untouched
    assert not list(out.glob("*.tmp-*"))
    assert fmt.verify_dataset(str(out), LOCAL) == manifest  # same bytes, same checksums


def test_train_val_split_is_deterministic_by_key(ray_cluster, tmp_path):
    good = text_files(tmp_path / "raw")
    (tmp_path / "raw" / "more.txt").write_text("".join(f"sentence {i}\n" for i in range(60)))
    prep = small_prep(
        source="text", inputs=[str(tmp_path / "raw")], output=str(tmp_path / "out"), val_fraction=0.25
    )
    report = prepare(prep, LOCAL)
    train, val = (_rows(str(tmp_path / "out" / split))[1] for split in ("train", "val"))
    keys = {r["key"] for r in train}, {r["key"] for r in val}
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == len(good) + 60
    assert 5 <= len(keys[1]) <= 30
    assert [p.dataset for p in plan(prep, LOCAL)] == [d.dataset for d in report.datasets]
    skipped = Counter(report.datasets[0].skipped) + Counter(report.datasets[1].skipped)
    assert skipped == {"empty_text": 1, "non_utf8_text": 2, "malformed_record": 1}


def test_prepare_data_job_rejects_bad_paths(tmp_path, capsys):
    from jobs.prepare_data import main

    argv = [
        "--dry-run",
        "prepare.source=image_folder",
        f"prepare.inputs=[{tmp_path}/nope]",
        f"prepare.output={tmp_path}/o",
    ]
    assert main(argv) == 2
    assert f"input not found: {tmp_path}/nope" in capsys.readouterr().err
    assert main(["--dry-run", "prepare.source=image_folder", f"prepare.inputs=[{tmp_path}]"]) == 2
    assert "prepare.output is empty" in capsys.readouterr().err


def _image_folder(root, n: int) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img{i:03d}.png").write_bytes(image_bytes(300 + i))


@pytest.mark.parametrize("strict", ["--strict", "prepare.strict=true"])
def test_prepare_data_job_strict_fails_on_a_corrupt_image(ray_cluster, tmp_path, capsys, strict):
    """Found by a worker (decode): the job returns non-zero, names the input and writes no manifest."""
    from jobs.prepare_data import main

    raw, out = tmp_path / "raw", tmp_path / "out"
    _image_folder(raw, 3)
    (raw / "img001b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    assert main([strict, *image_folder_job_argv(raw, out)]) == 2
    err = capsys.readouterr().err
    assert f"prepare_data: {raw / 'img001b.png'}: corrupt_image (strict mode" in err
    assert not (out / fmt.MANIFEST_NAME).exists()
    assert not list(out.glob("*.parquet"))  # its one shard holds the bad input: not written


def test_prepare_data_job_strict_fails_at_listing(tmp_path, capsys):
    """Found while listing (a second file of the same key): fails before any Ray work, naming it."""
    from jobs.prepare_data import main

    raw, out = tmp_path / "raw", tmp_path / "out"
    _image_folder(raw, 3)
    (raw / "img002.jpg").write_bytes(image_bytes(9, fmt="JPEG"))  # img002.jpg sorts first and wins
    assert main(["--strict", *image_folder_job_argv(raw, out)]) == 2
    assert f"{raw / 'img002.png'}: duplicate_key (strict mode" in capsys.readouterr().err
    assert not out.exists()


def test_random_init_codebook_warns_loudly_and_is_recorded(ray_cluster, tmp_path, caplog):
    import logging

    _image_folder(tmp_path / "raw", 3)
    prep = small_prep(
        source="image_folder", inputs=[str(tmp_path / "raw")], output=str(tmp_path / "out"), codebook_seed=7
    )
    assert prep.codebook == ""
    with caplog.at_level(logging.WARNING, logger="pipeline.shards.codebook"):
        prepare(prep, LOCAL)
    (record,) = [r for r in caplog.records if r.name == "pipeline.shards.codebook"]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "NO CODEBOOK WEIGHTS GIVEN" in message and "RANDOMLY" in message
    assert "random-init(7)" in message and "prepare.codebook=" in message
    manifest = fmt.verify_dataset(str(tmp_path / "out"), LOCAL)
    assert manifest.codebook.identity == "random-init(7)"
    assert manifest.codebook.name == "flava-image-codebook(hidden_size=16)"


def test_a_rerun_recomputes_exactly_the_shards_whose_inputs_settings_or_codebook_changed(
    ray_cluster, tmp_path
):
    """20 pairs in 4 shards of 5. A shard is recomputed when one of its inputs changed (an image replaced,
    a caption edited), every image shard when an image setting or the codebook changed, none otherwise.
    Which shards were written is read from the files' modification times, not from the report alone."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    captioned_folder(raw, 20)
    prep = small_prep(source="captioned_folder", inputs=[str(raw)], output=str(out), shard_rows=5)

    def run(prep) -> tuple[int, list[int]]:
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
        report = prepare(prep, LOCAL)
        after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.parquet"))}
        assert len(after) == 4 and fmt.verify_dataset(str(out), LOCAL)
        return report.rows_computed, [i for i, (n, t) in enumerate(after.items()) if before.get(n) != t]

    assert run(prep) == (20, [0, 1, 2, 3])
    assert run(prep) == (0, [])  # nothing changed
    (raw / "img007.png").write_bytes(image_bytes(500, size=(56, 40)))  # shard 1: another picture
    captions = raw / "captions.jsonl"
    captions.write_text(captions.read_text().replace("picture number 13", "picture number XIII"))
    assert run(prep) == (10, [1, 2])  # shard 2: an edited caption
    assert run(dataclasses.replace(prep, jpeg_quality=80, image_format="jpeg")) == (20, [0, 1, 2, 3])
    assert run(dataclasses.replace(prep, jpeg_quality=80, image_format="jpeg", codebook_seed=1)) == (
        20,
        [0, 1, 2, 3],
    )


def test_shard_bytes_cuts_before_the_record_that_would_pass_it():
    """README: a new shard starts once the current one holds ``shard_rows`` records, or once the next
    record would push its estimated size past ``shard_bytes`` (text: its raw length; image: its raw size,
    at most the canonical pixels, plus two code grids)."""
    texts = [RawRef(f"t{i}", f"t{i}", size_hint=n) for i, n in enumerate([40, 40, 30, 50, 10, 150, 5])]
    prep = small_prep(shard_rows=3, shard_bytes=100)
    cut = [[r.size_hint for r in shard] for shard in assign_shards(texts, prep, "text")]
    # 40+40 (+30 > 100) | 30+50+10 (3 rows) | 150 alone (over the limit on its own) | 5
    assert cut == [[40, 40], [30, 50, 10], [150], [5]]
    # images of 32 px: at most 3 * 32 * 32 = 3072 bytes of pixels + 4 * 2 * 2 bytes of codes (patch 16)
    images = [RawRef(f"i{i}", f"i{i}", size_hint=n) for i, n in enumerate([3000, 9000, 10, 10])]
    prep = small_prep(shard_rows=10, shard_bytes=3000 + 16 + 3072 + 16)
    cut = [[r.size_hint for r in shard] for shard in assign_shards(images, prep, "image")]
    assert cut == [[3000, 9000], [10, 10]]  # 9000 counts as 3072 + 16: the pair fits exactly

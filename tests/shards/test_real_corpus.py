"""Real images and captions (Tux Paint stamps from Debian packages) through prepare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from raw_fixtures import small_prep

from pipeline.config import StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.codebook import decode_image
from pipeline.shards.prepare import prepare

CACHE = Path(tempfile.gettempdir()) / "flava-real-corpus"  # built once per machine (~15 s, apt-get download)


@pytest.fixture(scope="session")
def real_corpus(shared_dir) -> Path:
    script = shared_dir / "data" / "real_corpus.py"
    if not script.exists():
        pytest.skip(f"{script} is absent")
    done = subprocess.run(
        [sys.executable, str(script), str(CACHE), "--max-images", "200"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not (CACHE / "DONE").exists():
        pytest.skip(
            f"could not build the real corpus (offline? apt-get download failed): {done.stderr[-500:]}"
        )
    return CACHE


@pytest.mark.slow
def test_tuxpaint_pairs_prepare(ray_cluster, real_corpus, tmp_path):
    lines = (real_corpus / "tuxpaint" / "captions.jsonl").read_text(encoding="utf-8").splitlines()[:48]
    subset = tmp_path / "tuxpaint"
    subset.mkdir()
    for line in lines:
        name = json.loads(line)["file"]
        shutil.copy(real_corpus / "tuxpaint" / "images" / name, subset / name)
    (subset / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    prep = small_prep(
        source="captioned_folder", inputs=[str(subset)], output=str(tmp_path / "out"), image_size=64
    )
    report = prepare(prep, StorageConfig())
    manifest = fmt.verify_dataset(str(tmp_path / "out"), StorageConfig())
    assert manifest.rows + sum(manifest.skipped.values()) == len(lines)
    assert manifest.rows >= len(lines) * 0.9, report
    table = fmt.read_shard(str(tmp_path / "out"), manifest.shards[0], StorageConfig())
    captions = {json.loads(line)["file"].rsplit(".", 1)[0]: json.loads(line)["caption"] for line in lines}
    for row in table.to_pylist():
        assert row["text"] == captions[row["key"]].strip()
        assert decode_image(row["image"]).shape == (64, 64, 3)

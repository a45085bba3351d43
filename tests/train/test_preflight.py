"""Pre-flight of ``jobs/pretrain.py``: bad inputs end the job before any worker, with a message naming it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import KINDS, load_config
from pipeline.train.launch import InputError, resolve_paths, validate_inputs

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pretrain_job", ROOT / "jobs/pretrain.py")
pretrain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain)


def overrides(demo: Path, **datasets: str) -> list[str]:
    train = {k: str(demo / k / "train") for k in KINDS} | datasets
    val = {k: str(demo / k / "val") for k in KINDS}
    return [f"data.train={json.dumps(train)}", f"data.val={json.dumps(val)}"]


def config(demo: Path, *extra: str, **datasets: str):
    return resolve_paths(
        load_config(ROOT / "jobs/configs/tiny-test.yaml", [*overrides(demo, **datasets), *extra])
    )


def test_valid_inputs_pass(demo_root):
    manifests = validate_inputs(config(demo_root))
    assert set(manifests) == {f"{s}/{k}" for s in ("train", "val") for k in KINDS}


@pytest.mark.parametrize(
    ("extra", "message"),
    [  # ratios wrong on their own (negative, all zero, unknown kind) fail at load: tests/test_config.py
        (["data.ratios={image_text: 1, image: 1}"], r"no ratio for configured train dataset\(s\) \['text'\]"),
        (["data.train={text: /x}", "data.ratios={image: 1, text: 1}"], r"\['image'\] have ratio > 0 but no"),
    ],
)
def test_ratios_that_do_not_fit_the_datasets(demo_root, extra, message):
    with pytest.raises(InputError, match=message):
        validate_inputs(config(demo_root, *extra))


def test_missing_empty_corrupt_and_mismatched_datasets(demo_root, tmp_path):
    with pytest.raises(InputError, match=r"data\.train\.image .*no _manifest\.json"):
        validate_inputs(config(demo_root, image=str(tmp_path / "nowhere")))

    empty = tmp_path / "empty"
    shutil.copytree(demo_root / "image" / "train", empty)
    manifest = json.loads((empty / "_manifest.json").read_text())
    (empty / "_manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(InputError, match="lists no shards"):
        validate_inputs(config(demo_root, image=str(empty)))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(demo_root / "image" / "train", corrupt)
    (corrupt / "_manifest.json").write_text('{"kind": "image", "shar')
    with pytest.raises(InputError, match="not valid JSON"):
        validate_inputs(config(demo_root, image=str(corrupt)))

    truncated = tmp_path / "truncated"
    shutil.copytree(demo_root / "image" / "train", truncated)
    shard = next(truncated.glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated or rewritten"):
        validate_inputs(config(demo_root, image=str(truncated)))

    with pytest.raises(InputError, match="expected 'image'"):
        validate_inputs(config(demo_root, image=str(demo_root / "text" / "train")))
    with pytest.raises(InputError, match="64px images but model preset 'base' expects 224px"):
        validate_inputs(config(demo_root, "model.preset=base"))
    with pytest.raises(InputError, match=r"data\.tokenizer"):
        validate_inputs(config(demo_root, f"data.tokenizer={tmp_path}"))


def test_job_exits_with_a_message_not_a_traceback(demo_root, tmp_path):
    """The real command line: exit status 2, one readable line, nothing started."""
    argv = [
        sys.executable,
        str(ROOT / "jobs/pretrain.py"),
        "--config",
        str(ROOT / "jobs/configs/tiny-test.yaml"),
    ]
    bad = subprocess.run(
        [*argv, *overrides(demo_root, image=str(tmp_path / "missing")), f"train.storage_path={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "pretrain: bad input: data.train.image" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "tiny-test").exists()


def test_dry_run_and_parse(demo_root, capsys):
    assert (
        pretrain.main(
            ["--config", str(ROOT / "jobs/configs/tiny-test.yaml"), *overrides(demo_root), "--dry-run"]
        )
        == 0
    )
    assert "inputs valid" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # wrong on its own: the parser stops it
        pretrain.main(
            [
                "--config",
                str(ROOT / "jobs/configs/tiny-test.yaml"),
                *overrides(demo_root),
                "data.ratios={text: 0, image: 0, image_text: 0}",
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "config error: data.ratios" in error and "all ratios are zero" in error
    config, args = pretrain.parse(["train.steps=3", "--dry-run"])
    assert config.train.steps == 3 and args.dry_run

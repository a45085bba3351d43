from __future__ import annotations

import pytest

from pipeline.config import Config, ConfigError, dump_config, load_config, parse_cli


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config() == Config()


def test_yaml_then_dotted_overrides(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\ndata:\n  ratios: {text: 1}\n")
    config = load_config(path, ["train.lr=0.5", "data.ratios.image=2", "model.preset=tiny"])
    assert config.train.steps == 7
    assert config.train.lr == 0.5
    # a mapping given in YAML replaces the default whole; an override adds to it
    assert config.data.ratios == {"text": 1.0, "image": 2.0}
    assert config.model.preset == "tiny"


def test_override_merges_into_default_mapping():
    config = load_config(None, ["data.ratios.image=0.1"])
    assert config.data.ratios == {"image_text": 0.5, "image": 0.1, "text": 0.25}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "unknown config key: train.stepz"),
        ("nope.x=1", "unknown config key: nope.x"),
        ("train.steps=abc", "train.steps: expected int"),
        ("train.use_gpu=3", "train.use_gpu: expected bool"),
        ("data.ratios.image=high", "data.ratios.image: expected float"),
        ("train.steps", "not of the form key=value"),
        ("train.steps.x=1", "has no sub-keys"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.foo"):
        load_config(write(tmp_path, "train:\n  foo: 1\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_dump_round_trip(tmp_path):
    config = load_config(None, ["train.steps=3", "data.train.text=s3://b/text/train"])
    assert load_config(write(tmp_path, dump_config(config))) == config


def test_cli_exits_2_with_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(["train.bogus=1"], "x")
    assert exc.value.code == 2
    assert "unknown config key: train.bogus" in capsys.readouterr().err


def test_yaml_syntax_error_in_a_file_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n   lr: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3:6: mapping values are not allowed"):
        load_config(path)
    flow = write(tmp_path, "train: [1,2\n")
    with pytest.raises(ConfigError, match=rf"^{flow}:2:1: .*flow sequence started at 1:8"):
        load_config(flow)


def test_an_override_that_is_not_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[': the value is not YAML \(1:2: "):
        load_config(None, ["train.steps=["])


@pytest.mark.parametrize("job", ["pretrain", "tune_mixing", "prepare_data", "inspect_data"])
@pytest.mark.parametrize(
    ("args", "said"), [(["--config", "BAD"], "BAD:2:1: "), (["train.steps=["], "train.steps=[")]
)
def test_jobs_print_yaml_errors_without_a_traceback(tmp_path, job, args, said):
    import subprocess
    import sys
    from pathlib import Path

    bad = write(tmp_path, "train: [1,2\n")
    argv = [str(bad) if a == "BAD" else a for a in args]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "jobs" / f"{job}.py"), *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("config error: ") and said.replace("BAD", str(bad)) in done.stderr
    assert "Traceback" not in done.stderr

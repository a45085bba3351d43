from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import REDACTED, Config, ConfigError, dump_config, load_config, parse_cli, redact_uri


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


def closed_sets() -> list[tuple[str, tuple]]:
    """Every config field whose values are a closed set (``Literal``, or a list of one), as (dotted key,
    allowed values)."""
    import typing

    found = []
    for section, cls in typing.get_type_hints(Config).items():
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is list:
                (hint,) = typing.get_args(hint)
            if typing.get_origin(hint) is typing.Literal:
                found.append((f"{section}.{name}", typing.get_args(hint)))
    return found


def test_the_closed_sets_are_the_expected_ones():
    keys = {key for key, _ in closed_sets()}
    assert keys == {
        "prepare.source",
        "prepare.image_format",
        "data.on_corrupt_shard",
        "data.on_changed_data",
        "data.mixing",
        "model.preset",
        "model.phase",
        "model.image_objective",
        "train.precision",
        "tune.search",
        "tune.scheduler",
    }


@pytest.mark.parametrize(("key", "allowed"), closed_sets(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_value_outside_a_closed_set_names_the_key_and_the_allowed_values(key, allowed):
    value = "nonsense"
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{key}={value}"])
    message = str(error.value)
    assert message.startswith(key) and "nonsense" in message
    assert all(str(a) in message for a in allowed if a), message
    for good in allowed:  # and every allowed value is accepted (with the settings it needs)
        load_config(None, [f"{key}={repr(good) if good == '' else good}", *NEEDS.get((key, good), ())])


# values that are valid only together with other settings: a unimodal phase samples its kind only
NEEDS = {
    ("model.phase", "text"): ("data.ratios={text: 1}",),
    ("model.phase", "image"): ("data.ratios={image: 1}",),
    ("model.image_objective", "dino"): ("model.phase=image", "data.ratios={image: 1}"),
}


def test_presets_and_sources_agree_with_their_implementations():
    import typing

    from model.presets import PRESETS
    from pipeline.config import PRESET_NAMES, ModelConfig, PrepareConfig
    from pipeline.shards.sources import SOURCES

    assert (
        set(PRESET_NAMES)
        == set(PRESETS)
        == set(typing.get_args(typing.get_type_hints(ModelConfig)["preset"]))
    )
    assert set(typing.get_args(typing.get_type_hints(PrepareConfig)["source"])) == {"", *SOURCES}


def test_a_renamed_key_names_its_successor(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.bf16 is now train\.precision \(fp32 \| bf16\)"):
        load_config(None, ["train.bf16=false"])
    with pytest.raises(ConfigError, match=r"train\.bf16 is now train\.precision"):
        load_config(write(tmp_path, "train:\n  bf16: true\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.num_workers=0", "train.num_workers = 0: must be >= 1"),
        ("train.lr=0", "train.lr = 0.0: must be > 0"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio = 2.0: must be in [0, 1]"),
        ("train.betas=[0.9]", "train.betas = [0.9]: must be two numbers in [0, 1)"),
        ("data.batch_size=0", "data.batch_size = 0: must be >= 1"),
        ("data.mlm_probability=1.5", "data.mlm_probability = 1.5: must be in [0, 1)"),
        ("data.ratios={image: -1}", "data.ratios = {'image': -1.0}: must be finite and non-negative"),
        ("data.ratios={image: 0}", "all ratios are zero"),
        ("data.ratios.imagez=1", "data.ratios = "),
        ("model.loss_weights={mimm: 1}", "unknown loss(es) ['mimm']"),
        ("prepare.image_size=100", "prepare.image_size = 100: must be a multiple of prepare.patch_size=16"),
        ("tune.reduction_factor=1", "tune.reduction_factor = 1: must be >= 2"),
        ("tune.sources=[text, text]", "a source is listed twice"),
        ("storage.s3_max_attempts=0", "storage.s3_max_attempts = 0: must be >= 1"),
    ],
)
def test_ranges_and_fields_that_must_agree_are_checked_at_load(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


ONE_SOURCE = "data.sources={web: {kind: image_text, train: /d/web}}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [ONE_SOURCE, "data.ratios={web: 1, wiki: 1}"],
            "unknown source(s) ['wiki']; the sources are ['web']",
        ),
        ([ONE_SOURCE, "data.ratios={web: 0}"], "all ratios are zero"),
        ([ONE_SOURCE, "data.ratios={web: .nan}"], "must be finite and non-negative"),
        (["data.sources={web: {kind: image_text}}", "data.ratios={web: 1}"], "['web'] have no dataset"),
        ([ONE_SOURCE, "data.train={text: /d/t}", "data.ratios={web: 1}"], "not both"),
        (["data.sources={web: {kind: video, train: /d}}"], "data.sources.web.kind: expected one of"),
        (["data.sources={a.b: {kind: text, train: /d}}", "data.ratios={a.b: 1}"], "may use only letters"),
        (
            ["data.sources={web: {kind: text, train: /d, test: /e}}"],
            "unknown config key(s): data.sources.web.test",
        ),
        (["tune.kinds=[text]"], "tune.kinds is now tune.sources"),
    ],
)
def test_named_sources_that_do_not_fit_are_named_at_load(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_one_dataset_per_kind_is_one_source_per_kind_named_after_it():
    config = load_config(None, ["data.train={text: /d/t, image_text: /d/p}", "data.val={image_text: /d/pv}"])
    sources = config.data.named_sources()
    assert list(sources) == ["image_text", "text"]  # KINDS order
    assert (sources["image_text"].kind, sources["image_text"].train, sources["image_text"].val) == (
        "image_text",
        "/d/p",
        "/d/pv",
    )
    assert config.data.key_of("text") == "data.train.text" and not config.data.named
    named = load_config(None, [ONE_SOURCE, "data.sources.web.val=/d/wv", "data.ratios={web: 2}"])
    assert named.data.named_sources()["web"].val == "/d/wv" and named.data.key_of("web", "val") == (
        "data.sources.web.val"
    )


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.steps=0", "data.batch_size=0"])
    assert "train.steps" in str(error.value) and "data.batch_size" in str(error.value)


# a password holding "@" (as a generated one may): userinfo runs to the last "@" before the host
LEAKY = {
    "mlflow.tracking_uri": "http://trainer:p@ss@w0rd@mlflow.example:5000",
    "storage.s3_endpoint_url": "http://minio:s3cr3t@minio:9000",
    "train.storage_path": "s3://AKEXAMPLE:sk@bucket/runs",
}


def _leaky_config() -> Config:
    """A config with credentials in URIs, built directly (loading refuses them, see below)."""
    config = Config()
    config.mlflow.tracking_uri = LEAKY["mlflow.tracking_uri"]
    config.storage.s3_endpoint_url = LEAKY["storage.s3_endpoint_url"]
    config.train.storage_path = LEAKY["train.storage_path"]
    return config


def test_dump_config_redacts_userinfo_even_with_at_in_the_password():
    text = dump_config(_leaky_config())
    for secret in ("p@ss", "w0rd", "s3cr3t", "AKEXAMPLE", ":sk@"):
        assert secret not in text, f"{secret} in dumped config"
    loaded = yaml.safe_load(text)
    assert loaded["mlflow"]["tracking_uri"] == f"http://{REDACTED}@mlflow.example:5000"
    assert loaded["train"]["storage_path"] == f"s3://{REDACTED}@bucket/runs"
    assert redact_uri("see https://a:b@c@h/x?q=u@v") == f"see https://{REDACTED}@h/x?q=u@v"


@pytest.mark.parametrize("key", sorted(LEAKY))
def test_userinfo_in_a_uri_is_refused_at_load(key):
    """What Ray Train/Tune keep of a config (trainer and tuner state on storage) is not redacted, and
    best_config.yaml / recommended_config.yaml are re-read with this check: credentials come from the
    environment only."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: user:password@ in a URI.*environment"):
        load_config(None, [f"{key}={LEAKY[key]}"])


def test_every_yaml_the_code_writes_goes_through_dump_config():
    """best_config.yaml (sweep), recommended_config.yaml (mixture fit), MLflow's config/resolved.yaml and
    every --dry-run print are dump_config's output: no other YAML dumper in pipeline/ or jobs/."""
    root = Path(__file__).resolve().parents[1]
    dumpers = []
    for path in [*root.joinpath("pipeline").rglob("*.py"), *root.joinpath("jobs").glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("safe_dump", "dump", "dump_all")
                and isinstance(node.value, ast.Name)
                and node.value.id == "yaml"
            ):
                dumpers.append(f"{path.relative_to(root)}:{node.lineno}")
    dump_config_line = inspect.getsourcelines(dump_config)[1]
    inside = [f"pipeline/config.py:{dump_config_line + i}" for i in range(5)]
    assert len(dumpers) == 1 and dumpers[0] in inside, f"YAML written outside dump_config: {dumpers}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.phase=text"],
            r"data.ratios: model.phase=text trains on \['text'\] data only, but \['image', 'image_text'\]",
        ),
        (
            ["model.phase=image", "data.ratios={image: 1}", "data.val={text: v}"],
            r"data.val: model.phase=image cannot validate on \['text'\]",
        ),
        (["model.image_objective=dino"], r"model.image_objective = 'dino': dino trains the image phase only"),
        (
            ["model.phase=text", "data.ratios={text: 1}", "model.init_encoders={image: x}"],
            r"model.init_encoders = .*: a text-phase model has no image encoder",
        ),
        (["model.init_encoders={audio: x}"], r"unknown part\(s\) \['audio'\]"),
        (["model.init_encoders={text: x}", "model.init_checkpoint=y"], r"not both"),
    ],
)
def test_a_phase_takes_only_its_kind_of_data_and_encoders(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    load_config(None, ["model.phase=text", "data.ratios={text: 1, image: 0}", "data.val={text: v}"])

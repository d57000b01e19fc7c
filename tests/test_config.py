import pytest
import yaml

from lmops.config import Config, load_config, override, parse_config, render_default_yaml
from lmops.errors import LmopsError


def test_default_yaml_round_trips_and_explains_every_key():
    text = render_default_yaml()
    assert parse_config(yaml.safe_load(text)) == Config()
    for section, field in Config.model_fields.items():
        for key, f in field.annotation.model_fields.items():
            assert f.description, f"{section}.{key} has no reason for its default"
            assert f"  {key}:" in text


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "lmops.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(LmopsError, match=r"lmops.yaml: unknown key 'train.max_step' \(did you mean 'max_steps'\?\)"):
        load_config(path)


def test_unknown_section_and_bad_value_are_named():
    with pytest.raises(LmopsError, match="unknown key 'trian'"):
        parse_config({"trian": {}})
    with pytest.raises(LmopsError, match="key 'train.lr'"):
        parse_config({"train": {"lr": "fast"}})
    with pytest.raises(LmopsError, match="multiple of n_head"):
        parse_config({"model": {"d_model": 100, "n_head": 3}})


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "lmops.yaml"
    path.write_text("train:\n  lr: [1\n")
    with pytest.raises(LmopsError, match="lmops.yaml: line"):
        load_config(path)


def test_override():
    cfg = override(Config(), ["train.max_steps=7", "tokenizer.kind=char"])
    assert cfg.train.max_steps == 7 and cfg.tokenizer.kind == "char"
    with pytest.raises(LmopsError, match="section.key=value"):
        override(Config(), ["max_steps=7"])
    with pytest.raises(LmopsError, match="unknown key 'train.nope'"):
        override(Config(), ["train.nope=1"])


# ----------------------------------------------------------------------------- LMOPS__SECTION__KEY environment variables

def test_environment_overrides_the_file_and_set_overrides_the_environment(tmp_path):
    path = tmp_path / "lmops.yaml"
    path.write_text("train:\n  max_steps: 10\n  lr: 0.001\nstore:\n  database_url: sqlite:///from-file.db\n")
    env = {"LMOPS__TRAIN__MAX_STEPS": "20", "LMOPS__STORE__DATABASE_URL": "postgresql+psycopg://ci@db:5432/lmops"}
    cfg = load_config(path, env)
    assert cfg.train.max_steps == 20 and cfg.train.lr == 0.001  # the file's other keys stay
    assert cfg.store.database_url == "postgresql+psycopg://ci@db:5432/lmops"
    assert override(cfg, ["train.max_steps=30"]).train.max_steps == 30
    assert load_config(path, {}).train.max_steps == 10


def test_the_workspace_config_reads_the_environment(workspace, monkeypatch):
    monkeypatch.setenv("LMOPS__ROLLOUT__WINDOW_S", "2")
    assert workspace.config().rollout.window_s == 2.0


def test_environment_values_are_typed_like_set_values_but_text_stays_text(tmp_path):
    path = tmp_path / "lmops.yaml"
    path.write_text("")
    cfg = load_config(path, {
        "LMOPS__ROLLOUT__STEPS": "[50, 100]", "LMOPS__REGISTRY__REQUIRE_APPROVAL": "true",
        "LMOPS__ROLLOUT__SMOKE__MAX_TOKENS": "4",  # a nested section
        "LMOPS__TRACKING__EXPERIMENT": "no", "LMOPS__SERVE__SERVED_MODEL_NAME": "1e3",  # YAML would make these a bool, a float
        "LMOPS__TRAIN__THREADS": "null",
        "lmops__train__seed": "7",  # names are not case-sensitive
    })
    assert cfg.rollout.steps == [50, 100] and cfg.registry.require_approval is True
    assert cfg.rollout.smoke.max_tokens == 4 and cfg.train.threads is None and cfg.train.seed == 7
    assert cfg.tracking.experiment == "no" and cfg.serve.served_model_name == "1e3"


def test_an_empty_variable_is_unset(tmp_path):
    """A CI maps a secret nobody defined to an empty string: it must not replace the file's value."""
    path = tmp_path / "lmops.yaml"
    path.write_text("tracking:\n  tracking_uri: http://mlflow:5000\n")
    assert load_config(path, {"LMOPS__TRACKING__TRACKING_URI": ""}).tracking.tracking_uri == "http://mlflow:5000"


@pytest.mark.parametrize("var, value, message", [
    ("LMOPS__TRAIN__MAX_STEP", "2", r"environment variable LMOPS__TRAIN__MAX_STEP: unknown key 'train.max_step' \(did you mean 'max_steps'\?\)"),
    ("LMOPS__TRIAN__MAX_STEPS", "2", r"LMOPS__TRIAN__MAX_STEPS: unknown key 'trian'"),
    ("LMOPS__TRAIN", "2", "name a key as LMOPS__SECTION__KEY"),
    ("LMOPS__TRAIN__LR", "fast", r"LMOPS__TRAIN__LR: key 'train.lr'"),
    ("LMOPS__ROLLOUT__STEPS", "[1,", r"LMOPS__ROLLOUT__STEPS: '\[1,' is not a value"),
    ("LMOPS__ROLLOUT__METRICS__ERROR_RATE", "x", "rollout.metrics is not a section; set it whole"),
    ("LMOPS__STORE__DATABASE_URL", "$(LMOPS_DATABASE_URL)", "a CI variable that was never defined"),
])
def test_a_wrong_environment_variable_is_named(tmp_path, var, value, message):
    path = tmp_path / "lmops.yaml"
    path.write_text("")
    with pytest.raises(LmopsError, match=message):
        load_config(path, {var: value})

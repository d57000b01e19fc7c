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

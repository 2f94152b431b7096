"""Typed config values: `--set`, YAML config files and `Config.from_dict` convert and check every value
against its field's declared type, with one-line errors; and the `moleflow config` command."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from moleflow.cli import main
from moleflow.config import ABLATIONS, PRESETS, Config, _parse_override, _SECTION_TYPES
from moleflow.errors import MoleflowError


def tiny(*overrides: str) -> Config:
    return Config.from_preset("tiny").with_overrides(list(overrides))


def error_of(*overrides: str) -> str:
    with pytest.raises(MoleflowError) as info:
        tiny(*overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("text, expected", [("1e-4", 1e-4), ("1E-5", 1e-5), (".5", 0.5), ("3", 3.0), ("2.5e+1", 25.0)])
def test_floats_parse_from_every_spelling(text, expected):
    cfg = tiny(f"train.lr={text}", f"train.lambda_logdet={text}")
    assert cfg.train.lr == expected and type(cfg.train.lr) is float
    assert cfg.train.lambda_logdet == expected and type(cfg.train.lambda_logdet) is float


def test_a_float_field_accepts_an_int():
    cfg = Config.from_preset("tiny").with_overrides({"train.grad_clip": 3})
    assert cfg.train.grad_clip == 3.0 and type(cfg.train.grad_clip) is float


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False), ("yes", True), ("no", False),
                                            ("1", True), ("0", False), ("True", True), ("off", False)])
def test_bools(text, expected):
    assert tiny(f"router.enabled={text}").router.enabled is expected


def test_maybe_is_not_a_bool():
    message = error_of("router.enabled=maybe")
    assert "router.enabled='maybe'" in message and "true or false" in message


def test_ints_convert_and_refuse_fractions_and_words():
    assert tiny("train.epochs=3").train.epochs == 3
    assert "model.lora_rank=1.5: expected an integer" in error_of("model.lora_rank=1.5")
    assert "train.epochs='abc': expected an integer" in error_of("train.epochs=abc")
    assert "train.epochs=True: expected an integer" in error_of("train.epochs=true")  # no bool-as-1


@pytest.mark.parametrize("key", ["backbone.embed_dim", "model.lora_alpha", "backbone.weights", "train.cache_dir"])
@pytest.mark.parametrize("text", ["null", "None", "none", "~"])
def test_none_for_optional_fields(key, text):
    section, name = key.split(".")
    assert getattr(getattr(tiny(f"{key}={text}"), section), name) is None


def test_optional_fields_still_check_their_type():
    assert tiny("backbone.embed_dim=64").backbone.embed_dim == 64
    assert "expected an integer or null" in error_of("backbone.embed_dim=abc")
    assert "expected a number or null" in error_of("model.lora_alpha=abc")
    assert "train.epochs='None': expected an integer" in error_of("train.epochs=None")  # not optional
    assert "train.epochs=None: expected an integer" in error_of("train.epochs=null")
    assert tiny("backbone.weights=007").backbone.weights == "007"  # text stays text


def test_a_literal_names_its_choices():
    message = error_of("model.task_adapter=foo")
    assert "model.task_adapter='foo'" in message and "'whitening', 'soft_ln', 'none'" in message
    assert tiny("model.task_adapter=none").model.task_adapter == "none"  # the choice, not null


def test_range_checks_still_run():
    assert "invalid config: train.lr must be > 0" in error_of("train.lr=-1")
    assert "invalid config" in error_of("data.image_size=100")


# ------------------------------------------------------------------------------------------ unknown keys
def test_unknown_key_lists_the_section_keys_and_the_config_command():
    message = error_of("train.epoch=3")
    assert "'train.epoch'" in message and "epochs, min_steps, batch_size" in message
    assert "moleflow config --preset cpu" in message and "main" not in message


def test_unknown_section_and_malformed_key():
    message = error_of("trian.epochs=3")
    assert "'trian'" in message and "backbone, data, model, train, router, score" in message
    assert "moleflow config --preset cpu" in message
    assert "section.key" in error_of("epochs=3")
    assert "section.key=value" in error_of("train.epochs")


def test_from_dict_converts_and_refuses():
    cfg = Config.from_dict({"train": {"epochs": "5", "lr": "1e-4"}, "router": {"enabled": "no"}})
    assert cfg.train.epochs == 5 and cfg.train.lr == 1e-4 and cfg.router.enabled is False
    for data, words in [({"train": {"epoch": 5}}, ["train", "epoch", "valid keys", "epochs"]),
                        ({"trian": {}}, ["trian", "sections"]),
                        ({"train": 5}, ["'train'", "mapping"]),
                        ({"model": {"lora_rank": 1.5}}, ["model.lora_rank=1.5"]),
                        ({"preset": 3}, ["preset=3"])]:
        with pytest.raises(MoleflowError) as info:
            Config.from_dict(data)
        assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips(name):
    cfg = Config.from_preset(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))) == cfg


def test_every_ablation_still_applies():
    for overrides in ABLATIONS.values():
        Config.from_preset("tiny").with_overrides(overrides)


def test_repo_preset_holds_nothing_out():
    assert Config.from_preset("repo").score.calibration_fraction == 0.0


def test_lists_parse_from_set():
    # no field is a list today; the parser is ready for one
    list_fields = [f"{s}.{f.name}" for s, c in _SECTION_TYPES.items() for f in dataclasses.fields(c)
                   if typing.get_origin(typing.get_type_hints(c)[f.name]) in (list, tuple)]
    assert list_fields == []
    assert _parse_override("[1,2]", list[int]) == [1, 2]


# ------------------------------------------------------------------------------------------ files and the CLI
def test_yaml_file_with_a_bad_value_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    data = Config.from_preset("tiny").to_dict()
    data["train"]["epochs"] = "abc"
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "train.epochs='abc': expected an integer" in err


@pytest.mark.parametrize("text, words", [(None, "cannot read"), ("train: [1\n  epochs: 2", "not a valid YAML"),
                                         ("- 1\n- 2\n", "mapping"), ("", "mapping")])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, words):
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and str(path) in err and words in err


def test_config_command_prints_yaml_that_round_trips(capsys):
    assert main(["config", "--preset", "tiny", "--set", "train.epochs=3", "--set", "train.lr=1e-4"]) == 0
    printed = Config.from_dict(yaml.safe_load(capsys.readouterr().out))
    expected = Config.from_preset("tiny")
    expected.train.epochs, expected.train.lr = 3, 1e-4
    assert printed == expected and printed.preset == "tiny"


def test_config_command_reads_back_its_own_output(tmp_path, capsys):
    assert main(["config", "--preset", "repo"]) == 0
    path = tmp_path / "repo.yaml"
    path.write_text(capsys.readouterr().out)
    assert main(["config", "--config", str(path)]) == 0
    assert Config.from_dict(yaml.safe_load(capsys.readouterr().out)) == Config.from_preset("repo")


def test_config_command_bad_value_is_one_line_and_exit_2(capsys):
    assert main(["config", "--set", "train.epochs=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moleflow config: error: train.epochs='abc': expected an integer"

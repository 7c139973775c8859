"""Config loading: TOML data over dataclass schema, overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, from_dict, load_config, to_dict


def test_named_configs_load() -> None:
    tiny = load_config("tiny")
    paper = load_config("paper")
    assert tiny.name == "tiny" and paper.name == "paper"
    assert paper.stage1.latent_dim == 512 and paper.stage1.motion_dim == 20
    assert paper.stage2.timesteps == 1000


def test_overrides_apply_and_parse_types() -> None:
    cfg = load_config("tiny", ["stage1.latent_dim=64", "stage2.beta_end=0.03", "name=x"])
    assert cfg.stage1.latent_dim == 64
    assert cfg.stage2.beta_end == pytest.approx(0.03)
    assert cfg.name == "x"
    cfg = load_config("tiny", ["train.stage1.betas=[0.5, 0.9]"])
    assert cfg.train.stage1.betas == [0.5, 0.9]


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[stage1]\nimage_sise = 128\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "stage1.image_sise" in str(e.value) and str(p) in str(e.value)


def test_unknown_key_in_override() -> None:
    with pytest.raises(ConfigError, match="stage2.nope"):
        load_config("tiny", ["stage2.nope=1"])


def test_wrong_type_and_bad_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected int"):
        load_config("tiny", ["stage1.latent_dim='big'"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config("tiny", ["stage1.latent_dim"])
    p = tmp_path / "broken.toml"
    p.write_text("[stage1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_missing_config_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        load_config("does-not-exist")


def test_round_trip_dict() -> None:
    cfg = load_config("paper")
    assert from_dict(to_dict(cfg)) == cfg

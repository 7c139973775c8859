"""The ``livehead`` command: help texts and one-line errors (no tracebacks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from livehead.cli import build_parser, main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("reenact", "train", "eval", "data"):
        assert cmd in out


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert name in text and len(text) > 80, name


def test_bad_config_is_one_clear_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "livehead", "eval", "stage1", "--identities", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "livehead: error:" in r.stderr


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [("--noise-scale", "3", "noise_scale"), ("--steps", "0", "sample_steps")],
)
def test_eval_stage2_refuses_sampler_settings_the_engine_refuses(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, key: str
) -> None:
    """The evaluation checks --noise-scale and --steps as the engine does (one check), before
    any generation starts."""
    assert main(["eval", "stage2", flag, value, "--clips", "1"]) == 2
    err = capsys.readouterr().err
    assert f"stage2.{key} must be in" in err and "Traceback" not in err

"""Every numeric setting has a range and rejects non-finite values: command options, env options
and method settings, refused with one line before any run row is written.
Run: .venv/bin/python -m pytest tests/test_option_ranges.py
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import pytest

from envs.registry import env_class, env_names, env_settings
from harness.cli.eval import EvalOptions
from harness.cli.train import SftOptions
from harness.errors import ConfigError
from harness.options import check_ranges, field_type, from_pairs, option
from harness.store import Store
from trainers.config import TrainConfig
from trainers.methods import make_method, method_names


@dataclass
class Knobs:
    count: int = option(1, minimum=1)
    share: float = option(0.5, minimum=0, maximum=1)
    timeout: float = option(1.0, above=0)
    free: float = 0.0


@pytest.mark.parametrize("field,value,message", [
    ("count", 0, "--count must be at least 1, got 0"),
    ("share", 1.5, "--share must be at most 1, got 1.5"),
    ("timeout", 0.0, "--timeout must be greater than 0, got 0"),
    ("free", float("nan"), "--free must be a finite number, got nan"),
    ("free", float("-inf"), "--free must be a finite number, got -inf"),
])
def test_each_bound_is_enforced(field, value, message):
    check_ranges(Knobs(), "knobs")  # the defaults are inside
    with pytest.raises(ConfigError) as err:
        check_ranges(dataclasses.replace(Knobs(), **{field: value}), "knobs")
    assert str(err.value) == f"knobs: {message}"


def test_key_value_settings_reject_non_finite_numbers():
    for raw in ("nan", "inf", "-Infinity"):
        with pytest.raises(ConfigError, match="finite number"):
            from_pairs(Knobs, [f"free={raw}"], what="--x")


def _float_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if field_type(cls, f.name) in (float, float | None)]


def test_every_float_setting_of_every_command_env_and_method_rejects_nan():
    """The class, not the examples: any float field anywhere refuses NaN."""
    commands = {EvalOptions: EvalOptions(env="toy"), TrainConfig: TrainConfig(env="toy", policy="p"),
                SftOptions: SftOptions(env="toy", policy="p", out="o")}
    checked = 0
    for cls, instance in commands.items():
        for name in _float_fields(cls):
            with pytest.raises(ConfigError, match="finite"):
                check_ranges(dataclasses.replace(instance, **{name: float("nan")}), cls.__name__)
            checked += 1
    for env in env_names():
        for name in _float_fields(env_class(env).Options):
            with pytest.raises(ConfigError, match="finite"):
                env_settings(env, {name: float("nan")})
            checked += 1
    for method in method_names():
        settings = make_method(method).cfg
        for name in _float_fields(type(settings)):
            with pytest.raises(ConfigError, match="finite"):
                make_method(method, **{name: float("nan")})
            checked += 1
    assert checked >= 60  # every command, env and method contributed


@pytest.mark.parametrize("method,key,value,message", [
    ("sgcd", "cap", 0.5, "cap must be at least 1"),
    ("sgcd", "kl_saturation", 0.0, "kl_saturation must be greater than 0"),
    ("rlad", "alpha", 1.5, "alpha must be at most 1"),
    ("rlsd", "lam_start", -0.1, "lam_start must be at least 0"),
    ("grpo", "clip_high", -0.2, "clip_high must be at least 0"),
])
def test_method_settings_have_ranges(method, key, value, message):
    with pytest.raises(ConfigError, match=f"method {method}: {message}"):
        make_method(method, **{key: value})


@pytest.mark.parametrize("args,message", [
    (["--timeout", "nan"], "--timeout must be a finite number"),
    (["--env-arg", "max_errors=0"], "--max-errors must be at least 1"),
])
def test_the_cli_refuses_before_any_run_row(tmp_path, args, message):
    db = f"sqlite:///{tmp_path}/r.db"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "eval", "--env", "tau-airline", "--agent", "oracle",
                           "--user", "scripted", "--tasks", "1", "--run", "r", "--db", db, "--quiet", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "r" not in [r.name for r in Store(db).list_runs()]

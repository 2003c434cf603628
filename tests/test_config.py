"""Settings: defaults < TOML < CHATLOOP_* environment < CLI overrides; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatloop.config import ConfigError, load_settings
from chatloop.models import ModelError, resolve_model


def test_precedence_and_types(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "from-file"\nport = 9000\n[training]\nbeta = 0.3\nmin_pairs = 5\n'
                   '[generation]\ntemperature = 0.2\n')
    env = {"CHATLOOP_PORT": "9100", "CHATLOOP_TRAINING__MIN_PAIRS": "7",
           "CHATLOOP_TRAINING__LORA_TARGET_MODULES": "q_proj,v_proj", "OTHER": "x"}
    s = load_settings(cfg, {"model": "from-cli", "port": None}, environ=env)
    assert s.model == "from-cli" and s.port == 9100
    assert s.training.beta == 0.3 and s.training.min_pairs == 7
    assert s.training.lora_target_modules == ("q_proj", "v_proj")
    assert s.generation.temperature == 0.2
    assert load_settings(environ={}).model == "default"


def test_data_dir_config_file_is_read(tmp_path):
    (tmp_path / "chatloop.toml").write_text('admin_token = "t0ken"\n')
    s = load_settings(overrides={"data_dir": str(tmp_path)}, environ={})
    assert s.admin_token == "t0ken" and s.db_path == tmp_path / "chatloop.duckdb"


@pytest.mark.parametrize("env", [{"CHATLOOP_PORT": "eighty"}, {"CHATLOOP_NOPE": "1"},
                                 {"CHATLOOP_TRAINING__NOPE": "1"}, {"CHATLOOP_TRAINING__REWARD_POOLING": "first"},
                                 {"CHATLOOP_PREFILL_CHUNK_TOKENS": "0"}, {"CHATLOOP_PREFILL_CHUNK_BUDGET": "-0.5"},
                                 {"CHATLOOP_PREFILL_CHUNK_BUDGET": "nan"}, {"CHATLOOP_TRAINING__PAIR_MIN_RELEVANCE": "1.5"},
                                 {"CHATLOOP_TRAINING__PAIR_MIN_RELEVANCE": "nan"}, {"CHATLOOP_TRAINING__PPO_TEMPERATURE": "0"},
                                 {"CHATLOOP_TRAINING__RLOO_TEMPERATURE": "nan"}, {"CHATLOOP_ROW_INVARIANT_ATTENTION": "maybe"},
                                 {"CHATLOOP_TRAINING__RLOO_REGISTER_COEF": "-1"},
                                 {"CHATLOOP_TRAINING__PPO_REGISTER_COEF": "inf"}])
def test_bad_settings_are_clear_errors(env):
    with pytest.raises(ConfigError):
        load_settings(environ=env)


def test_the_benchmarks_shared_data_variable_is_not_a_setting(tmp_path):
    # benchmarks and oracles read it; a service started beside them (efficacy.py) must still start
    s = load_settings(environ={"CHATLOOP_SHARED_DATA": str(tmp_path), "CHATLOOP_PORT": "9100"})
    assert s.port == 9100


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_model_resolution(tmp_path, tiny_model_dir):
    default = resolve_model("default")
    assert default.gguf_file and Path(default.path, default.gguf_file).is_file()
    assert resolve_model(str(tiny_model_dir)).path == str(Path(tiny_model_dir).resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct").path == "HuggingFaceTB/SmolLM2-360M-Instruct"
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path / "missing-dir"))
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path / "missing.gguf"))

"""Configuration has one source: the settings model gives every flag, variable and default of ``lpt-serve``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import pytest

from service.auth import merge_keys, read_keys_file
from service.cli import build_parser, flag_name, load_config
from service.settings import DEMO_BACKBONE, ServiceConfig, ServiceSettings, env_name

FIELDS = list(ServiceSettings.model_fields)
# Flags and variables that users, compose files and docs already rely on: they must keep working.
CONTRACT_FLAGS = [
    "--host", "--port", "--backbone", "--backbone-weights", "--img-size", "--store", "--data-dir", "--device",
    "--dtype", "--max-batch-size", "--max-wait-ms", "--queue-size", "--tenant-queue-share", "--cache-bytes",
    "--request-timeout", "--max-image-bytes", "--max-image-pixels", "--max-classes", "--max-prompt-bytes",
    "--api-keys-file", "--insecure", "--demo", "--shutdown-timeout", "--log-level",
]  # fmt: skip
CONTRACT_VARIABLES = [
    "LPT_HOST", "LPT_PORT", "LPT_BACKBONE", "LPT_BACKBONE_WEIGHTS", "LPT_IMG_SIZE", "LPT_STORE", "LPT_DATA_DIR",
    "LPT_DEVICE", "LPT_DTYPE", "LPT_MAX_BATCH_SIZE", "LPT_MAX_WAIT_MS", "LPT_QUEUE_SIZE", "LPT_TENANT_QUEUE_SHARE",
    "LPT_CACHE_BYTES", "LPT_REQUEST_TIMEOUT", "LPT_MAX_IMAGE_BYTES", "LPT_MAX_IMAGE_PIXELS", "LPT_MAX_PROMPT_BYTES",
    "LPT_MAX_CLASSES", "LPT_API_KEYS", "LPT_API_KEYS_FILE", "LPT_INSECURE", "LPT_DEMO", "LPT_LOG_LEVEL",
    "LPT_STORE_TIMEOUT", "LPT_RECONCILE_S", "LPT_SHUTDOWN_TIMEOUT", "LPT_REPLICA_ID",
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in FIELDS:
        monkeypatch.delenv(env_name(name), raising=False)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "version")}


def test_every_setting_has_exactly_one_flag_and_nothing_else_has_one():
    actions = options(build_parser())
    assert sorted(actions) == sorted(FIELDS)
    for name, action in actions.items():
        positive = [s for s in action.option_strings if not s.startswith("--no-")]
        assert positive == [flag_name(name)], (name, action.option_strings)


def test_help_shows_each_default_and_variable_from_the_field():
    actions = options(build_parser())
    for name, info in ServiceSettings.model_fields.items():
        text = actions[name].help
        assert text.startswith(info.description), name
        assert text.endswith(f"; env {env_name(name)})"), name
        if info.default is not None and not isinstance(info.default, bool):
            assert f"(default: {info.default};" in text, name
    assert "(default: DATA_DIR/store;" in actions["store"].help
    assert "(default: HOST:PORT;" in actions["replica_id"].help
    assert "(default: off;" in actions["insecure"].help


def test_settings_that_had_no_flag_now_have_one(tmp_path):
    config = load_config(["--store-timeout", "0.25", "--reconcile-s", "7", "--replica-id", "r-1", "--device", "cpu"])
    assert (config.store_timeout, config.reconcile_s, config.replica_id) == (0.25, 7.0, "r-1")


@pytest.mark.parametrize("flag", CONTRACT_FLAGS)
def test_existing_flag_names_still_parse(flag):
    parser = build_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    assert flag in known


def test_existing_variables_are_settings():
    assert {env_name(name) for name in FIELDS} >= set(CONTRACT_VARIABLES)


def test_variables_apply_and_a_flag_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("LPT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LPT_INSECURE", "true")
    monkeypatch.setenv("LPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LPT_DEVICE", "cpu")
    config = load_config([])
    assert config.max_batch_size == 7 and config.insecure is True
    assert config.store == str(tmp_path / "store")  # unset store resolves under the data dir from the variable
    config = load_config(["--max-batch-size", "9", "--no-insecure"])
    assert config.max_batch_size == 9 and config.insecure is False


def test_unset_values_resolve(monkeypatch):
    config = load_config(["--host", "127.0.0.2", "--port", "8123", "--device", "cpu"])
    assert config.replica_id == "127.0.0.2:8123" and config.store == str(Path("data") / "store")
    assert config.compute_dtype == "float32"
    assert config.decode_threads == len(os.sched_getaffinity(0))


def test_a_bad_value_names_its_flag_and_variable(monkeypatch):
    monkeypatch.setenv("LPT_PORT", "eighty")
    with pytest.raises(SystemExit, match="--port / LPT_PORT"):
        load_config([])


def test_api_keys_from_variable_flag_and_file(monkeypatch, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenants\nglobex:globex-secret-0001\n")
    monkeypatch.setenv("LPT_API_KEYS", "acme:acme-secret-0001")
    config = load_config(["--api-keys-file", str(keys_file), "--device", "cpu"])
    assert config.api_keys == {"acme": ("acme-secret-0001",)} and config.api_keys_file == keys_file
    assert merge_keys(config.api_keys, read_keys_file(keys_file)) == {
        "acme": ("acme-secret-0001",),
        "globex": ("globex-secret-0001",),
    }
    assert "acme-secret-0001" not in repr(config)
    config = load_config(["--api-keys", "initech:initech-secret-1,initech:initech-secret-2", "--device", "cpu"])
    assert config.api_keys == {"initech": ("initech-secret-1", "initech-secret-2")}  # two keys: rotation


def test_demo_defaults_the_offline_backbone_and_the_access_log(monkeypatch):
    config = load_config(["--demo", "--device", "cpu"])
    assert (config.backbone, config.backbone_weights) == DEMO_BACKBONE and config.access_log is True
    assert load_config(["--demo", "--no-access-log", "--device", "cpu"]).access_log is False
    assert load_config(["--device", "cpu"]).access_log is False
    monkeypatch.setenv("LPT_DEMO", "1")
    monkeypatch.setenv("LPT_BACKBONE", "test_vit")  # a chosen backbone keeps its own default weights
    config = load_config(["--device", "cpu"])
    assert (config.backbone, config.backbone_weights) == ("test_vit", "hub")


def test_the_settings_are_generated_from_the_config_fields():
    config_fields = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    assert set(config_fields) == set(FIELDS)
    hints = typing.get_type_hints(ServiceConfig)
    for name, info in ServiceSettings.model_fields.items():
        if name in config_fields and name != "api_keys":
            assert config_fields[name].default == info.default, name
            assert hints[name] == info.annotation, name
            assert info.description == config_fields[name].metadata["help"], name
    assert hints["api_keys"] == dict[str, tuple[str, ...]]
    direct = ServiceConfig(device="cpu")
    via_settings = ServiceSettings(device="cpu").freeze()
    assert direct == via_settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        direct.port = 1  # type: ignore[misc]

"""Settings layering and validation."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from proxy.settings import HELP, Settings, SettingsError, load

ROOT = Path(__file__).resolve().parents[1]


def test_default_toml_lists_every_setting_with_its_default() -> None:
    table = tomllib.loads((ROOT / "config/default.toml").read_text())
    assert table == asdict(Settings())
    assert set(HELP) == {f.name for f in fields(Settings)}


def test_readme_settings_table_lists_every_setting() -> None:
    readme = (ROOT / "docs/settings.md").read_text()
    for f in fields(Settings):
        assert f"`{f.name}`" in readme and f"`PROXY_{f.name.upper()}`" in readme, f.name


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('port = 9001\nlog_level = "debug"\nworkers = 3\n')
    assert load(env={}).port == 8000
    s = load(config_file=str(config), env={"PROXY_LOG_LEVEL": "warning", "PROXY_WORKERS": "2"})
    assert (s.port, s.log_level, s.workers) == (9001, "warning", 2)
    s = load(env={"PROXY_CONFIG": str(config), "PROXY_PORT": "9002"}, overrides={"port": "9003"})
    assert (s.port, s.workers) == (9003, 3)


def test_env_lists_and_maps() -> None:
    s = load(
        env={"PROXY_ALLOWED_PROVIDERS": "openai, acme", "PROXY_PROVIDER_ALIASES": "google=gemini"}
    )
    assert s.allowed_providers == ["openai", "acme"]
    assert s.provider_aliases == {"google": "gemini"}
    assert load(env={"PROXY_ALLOWED_PROVIDERS": "*"}).id_rules().allowed_providers is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PROXY_PORT": "http"}, "PROXY_PORT: expected int"),
        ({"PROXY_PORT": "70000"}, "port: must be 1..65535"),
        ({"PROXY_UPSTREAM_URL": "ftp://x"}, r"upstream_url: must be an http\(s\) URL"),
        ({"PROXY_LOG_LEVEL": "loud"}, "log_level: must be one of"),
        ({"PROXY_UPSTREAM_TIMEOUT_SECONDS": "0"}, "upstream_timeout_seconds: must be > 0"),
        ({"PROXY_ALLOWED_PROVIDERS": "Open AI"}, "allowed_providers"),
        ({"PROXY_CACHE_BACKEND": "redis"}, "cache_key_secret: required"),
        ({"PROXY_CACHE_BACKEND": "disk"}, "cache_backend: must be one of"),
        ({"PROXY_MAX_REQUEST_BYTES": "-1"}, "max_request_bytes: must be > 0"),
        ({"PROXY_CONFIG": "/nonexistent.toml"}, "config: cannot read"),
    ],
)
def test_invalid_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load(env=env)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="prot: unknown setting"):
        load(config_file=str(config), env={})


def test_cli_invalid_setting_exits_before_binding() -> None:
    exe = Path(sys.executable).with_name("bifrost-video-proxy")
    result = subprocess.run(
        [str(exe), "--port", "0", "--upstream", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["bifrost-video-proxy: invalid setting: port: must be 1..65535, got 0"]

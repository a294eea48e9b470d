"""Daemon configuration: daemon.json keys, flag overrides, refusals before start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pallet.config import ConfigError, load_config

from .conftest import PALLETD


def write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "daemon.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_defaults_and_docker_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}))
    assert str(cfg.data_root) == "/var/lib/pallet"
    assert str(cfg.exec_root) == "/run/pallet"
    assert cfg.hosts == ["unix:///run/pallet.sock"]
    assert cfg.socket_mode == 0o660
    assert cfg.live_restore is True
    cfg = load_config(
        write(
            tmp_path,
            {
                "data-root": "/srv/p",
                "storage-driver": "vfs",
                "storage-opts": ["size=1G"],
                "log-level": "debug",
                "hosts": ["unix:///tmp/x.sock", "tcp://127.0.0.1:2375"],
                "live-restore": False,
            },
        )
    )
    assert str(cfg.data_root) == "/srv/p" and cfg.storage_driver == "vfs"
    assert cfg.storage_options() == {"size": "1G"}
    assert cfg.live_restore is False


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"data-root": "/a", "storage-driver": "vfs"})
    cfg = load_config(path, {"data-root": "/b", "storage-driver": None})
    assert str(cfg.data_root) == "/b" and cfg.storage_driver == "vfs"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"data-rot": "/x"}, "data-rot: unknown key"),
        ({"live-restore": "maybe"}, "live-restore"),
        ({"data-root": "relative/dir"}, "data-root: Value error, must be an absolute path"),
        ({"hosts": ["http://x"]}, "expected unix:///path or tcp://host:port"),
        ({"hosts": ["tcp://127.0.0.1:99999"]}, "expected tcp://HOST:PORT"),
        ({"log-level": "loud"}, "log-level"),
        ({"storage-opts": ["novalue"]}, "expected KEY=VALUE"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_config_is_refused_naming_file_key_reason(
    tmp_path: Path, content: object, expected: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_palletd_refuses_bad_config_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, {"storage-driver": 3, "data-root": str(tmp_path / "data")})
    r = subprocess.run(
        [PALLETD, "--config-file", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert str(path) in r.stderr and "storage-driver" in r.stderr
    assert not (tmp_path / "data").exists(), "nothing may be created before the config is valid"


def test_palletd_missing_config_file(tmp_path: Path) -> None:
    r = subprocess.run(
        [PALLETD, "--config-file", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "no such file" in r.stderr


def test_palletd_validate_flag(tmp_path: Path) -> None:
    path = write(tmp_path, {"data-root": str(tmp_path / "data")})
    r = subprocess.run(
        [PALLETD, "--config-file", str(path), "--validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "configuration OK" in r.stdout


def test_unknown_storage_driver_refused_at_start(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(storage_driver="nosuch", start=False)
    with pytest.raises(RuntimeError, match="storage-driver 'nosuch': no such driver"):
        d.start()

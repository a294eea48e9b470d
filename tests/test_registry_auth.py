"""Registry authentication against a real registry: htpasswd basic auth over TLS (a
throwaway CA), the bearer-token flow (a small token server), ``pallet login/logout``
with a Docker-style config.json, ``X-Registry-Auth`` from the docker CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.registry import Registry, TokenServer, start_registry

DOCKER = "/usr/local/bin/docker"


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("palletd-auth"), "overlay", [])
    d.start()
    try:
        d.import_busybox(busybox_tar)
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("reg-tls"), tls=True, htpasswd=("alice", "s3cret"))
    yield reg
    reg.stop()


@pytest.fixture
def cli_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PALLET_CONFIG", str(tmp_path / "pallet-config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    return tmp_path / "pallet-config" / "config.json"


def test_basic_auth_over_tls(pd: Daemon, tls_registry: Registry, cli_config: Path) -> None:
    host = tls_registry.host
    ref = f"{host}/secure/busybox:v1"
    pd.cli("tag", "busybox:latest", ref)
    # without credentials: refused, with the registry's words
    r = pd.cli("push", ref, check=False)
    assert r.returncode != 0
    assert "no basic auth credentials" in r.stderr, r.stderr
    # a wrong password is refused by login, nothing stored
    r = pd.cli("login", "-u", "alice", "-p", "wrong", host, check=False)
    assert r.returncode != 0
    assert "401" in r.stderr or "unauthorized" in r.stderr.lower(), r.stderr
    assert not cli_config.exists()
    r = pd.cli("login", "-u", "alice", "--password-stdin", host, input=b"s3cret\n")
    assert "Login Succeeded" in r.stdout
    auths = json.loads(cli_config.read_text())["auths"]
    assert base64.b64decode(auths[host]["auth"]).decode() == "alice:s3cret"
    assert oct(cli_config.stat().st_mode & 0o777) == "0o600"
    r = pd.cli("push", ref)
    assert "Pushed" in r.stdout and "v1: digest: sha256:" in r.stdout
    # the registry really has it (over TLS, verified with the throwaway CA)
    status, body, _ = tls_registry.get(
        "/v2/secure/busybox/tags/list",
        {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()},
    )
    assert status == 200 and json.loads(body)["tags"] == ["v1"]
    pd.cli("rmi", ref)
    pd.cli("pull", ref)
    pd.cli("rmi", ref)
    r = pd.cli("logout", host)
    assert f"Removing login credentials for {host}" in r.stdout
    assert host not in json.loads(cli_config.read_text())["auths"]
    r = pd.cli("pull", ref, check=False)
    assert r.returncode != 0 and "no basic auth credentials" in r.stderr
    assert pd.api("GET", "/_ping")[0] == 200


def test_docker_cli_login_and_push_through_pallet(
    pd: Daemon, tls_registry: Registry, tmp_path: Path
) -> None:
    host = tls_registry.host
    env = {**os.environ, "DOCKER_HOST": pd.host, "DOCKER_CONFIG": str(tmp_path / "dc")}
    r = subprocess.run(
        [DOCKER, "login", "-u", "alice", "--password-stdin", host],
        input="s3cret\n",
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "Login Succeeded" in r.stdout
    ref = f"{host}/secure/viadocker:v2"
    pd.cli("tag", "busybox:latest", ref)
    r = subprocess.run([DOCKER, "push", ref], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "v2: digest: sha256:" in r.stdout
    r = subprocess.run(
        [DOCKER, "login", "-u", "alice", "--password-stdin", host],
        input="nope\n",
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0


def test_tls_verification_with_certs_d(tls_registry: Registry, tmp_path: Path) -> None:
    """A registry not in insecure-registries is verified: with its CA in certs.d the
    handshake succeeds, without it the error names the certificate."""
    from pallet.distribution.registry import (
        Endpoint,
        RegistryOptions,
        Repository,
        Unreachable,
    )

    certs = tmp_path / "certs.d"
    opts = RegistryOptions(certs_d=str(certs))
    ep = Endpoint(tls_registry.host, "https", verify=True)
    with pytest.raises(Unreachable, match="failed to verify certificate"):
        Repository(opts, ep, "secure/busybox").ping()
    (certs / tls_registry.host).mkdir(parents=True)
    assert tls_registry.ca is not None
    (certs / tls_registry.host / "ca.crt").write_bytes(tls_registry.ca.read_bytes())
    repo = Repository(opts, Endpoint(tls_registry.host, "https", verify=True), "secure/busybox")
    repo.ping()
    assert repo._challenge is not None and repo._challenge[0] == "basic"


def test_bearer_token_flow(pd: Daemon, tmp_path: Path, cli_config: Path) -> None:
    tokens = TokenServer(tmp_path / "token", users={"bob": "hunter2"})
    reg = start_registry(tmp_path / "reg", token=tokens)
    try:
        ref = f"{reg.host}/tok/busybox:t1"
        pd.cli("tag", "busybox:latest", ref)
        r = pd.cli("push", ref, check=False)
        assert r.returncode != 0
        assert "unauthorized" in r.stderr.lower() or "401" in r.stderr, r.stderr
        pd.cli("login", "-u", "bob", "-p", "hunter2", reg.host)
        r = pd.cli("push", ref)
        assert "t1: digest: sha256:" in r.stdout
        assert any(
            q["user"] == "bob" and "repository:tok/busybox:pull,push" in q["scopes"]
            for q in tokens.requests
        ), tokens.requests
        pd.cli("rmi", ref)
        before = len(tokens.requests)
        pd.cli("pull", ref)
        pulls = tokens.requests[before:]
        assert any("repository:tok/busybox:pull" in q["scopes"] for q in pulls), pulls
        out = pd.cli("run", "--rm", "--network", "none", ref, "echo", "token-ok").stdout
        assert out == "token-ok\n"
        # the API takes credentials from X-Registry-Auth directly
        pd.cli("rmi", ref)
        status, body = api_with_auth(
            pd, f"/images/create?fromImage={reg.host}/tok/busybox&tag=t1", {}
        )
        assert status in (401, 403) or "error" in str(body), body
        status, body = api_with_auth(
            pd,
            f"/images/create?fromImage={reg.host}/tok/busybox&tag=t1",
            {"username": "bob", "password": "hunter2", "serveraddress": reg.host},
        )
        assert status == 200 and "Downloaded newer image" in str(body), body
    finally:
        reg.stop()
        tokens.stop()


def api_with_auth(pd: Daemon, path: str, auth: dict[str, str]) -> tuple[int, Any]:
    import http.client
    import socket

    c = http.client.HTTPConnection("localhost", timeout=120)
    c.sock = socket.socket(socket.AF_UNIX)
    c.sock.connect(pd.sock)
    header = base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()
    c.request("POST", path, headers={"X-Registry-Auth": header})
    r = c.getresponse()
    raw = r.read().decode()
    c.close()
    return r.status, raw

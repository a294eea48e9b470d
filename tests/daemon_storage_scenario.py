"""The daemon-level storage scenario, shared by tests/test_commit_diff_export.py (host
drivers) and the devmapper guest run: run a container, diff it, commit it (with
changes, message and author), run the committed image, export, on one daemon."""

from __future__ import annotations

import tarfile
import time
from typing import Any


def scenario(d: Any) -> None:
    """``d``: a running tests.conftest.Daemon with busybox:latest imported."""
    d.cli(
        "run",
        "--name",
        "work",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "echo hello > /greeting; mkdir -p /data/sub; echo x > /data/sub/f;"
        " rm /bin/ls; echo changed >> /etc/passwd",
    )
    # docker diff: kinds and paths as Docker reports them
    code, changes = d.api("GET", "/containers/work/changes")
    assert code == 200, changes
    got = {c["Path"]: c["Kind"] for c in changes}
    assert got["/greeting"] == 1 and got["/data"] == 1 and got["/data/sub/f"] == 1
    assert got["/bin/ls"] == 2 and got["/bin"] == 0
    assert got["/etc/passwd"] == 0 and got["/etc"] == 0
    out = d.cli("diff", "work").stdout.splitlines()
    assert "A /greeting" in out and "D /bin/ls" in out and "C /etc/passwd" in out

    # docker commit with changes, a message and an author
    r = d.cli(
        "commit",
        "-c",
        "ENV MODE=committed",
        "-c",
        'CMD ["cat", "/greeting"]',
        "-c",
        "WORKDIR /data",
        "-c",
        "LABEL stage=two",
        "-m",
        "first commit",
        "-a",
        "Tester <t@example.com>",
        "work",
        "committed:v1",
    )
    image_id = r.stdout.strip()
    assert image_id.startswith("sha256:")
    code, info = d.api("GET", "/images/committed:v1/json")
    assert code == 200
    assert info["Author"] == "Tester <t@example.com>" and info["Comment"] == "first commit"
    cfg = info["Config"]
    assert "MODE=committed" in cfg["Env"] and cfg["Cmd"] == ["cat", "/greeting"]
    assert cfg["WorkingDir"] == "/data" and cfg["Labels"] == {"stage": "two"}
    code, base = d.api("GET", "/images/busybox/json")
    assert len(info["RootFS"]["Layers"]) == len(base["RootFS"]["Layers"]) + 1
    assert info["Parent"] == base["Id"]

    # the committed image carries the changes, deletions included
    r = d.cli("run", "--rm", "--network", "none", "committed:v1")
    assert r.stdout == "hello\n"
    r = d.cli(
        "run",
        "--rm",
        "--network",
        "none",
        "committed:v1",
        "sh",
        "-c",
        "pwd; cat sub/f; test -e /bin/ls && echo ls-present || echo ls-gone; tail -1 /etc/passwd",
    )
    assert r.stdout.split() == ["/data", "x", "ls-gone", "changed"]
    hist = d.api("GET", "/images/committed:v1/history")[1]
    assert hist[0]["Comment"] == "first commit"

    # docker export: the whole filesystem
    out_path = d.data_root.parent / "work.tar"
    d.cli("export", "-o", str(out_path), "work")
    with tarfile.open(out_path) as tf:
        names = set(tf.getnames())
    assert {"greeting", "data/sub/f", "bin/sh"} <= {n.lstrip("./") for n in names}
    assert "bin/ls" not in {n.lstrip("./") for n in names}
    out_path.unlink()
    # bad input: Docker's status and message, nothing stored
    n_images = len(d.api("GET", "/images/json")[1])
    code, err = d.api("POST", "/commit?container=work&changes=RUN%20rm%20-rf%20/")
    assert code == 400 and "run is not a valid change command" in err["message"], err
    code, err = d.api("POST", "/commit?container=work&tag=v1")
    assert code == 400 and "repo" in err["message"], err
    assert len(d.api("GET", "/images/json")[1]) == n_images
    code, err = d.api("GET", "/containers/nope/changes")
    assert code == 404 and "No such container: nope" in err["message"], err
    d.cli("rm", "work")

    # a running container: diff and commit while it runs (docker pauses; the layer is
    # taken from the live filesystem)
    d.cli(
        "run",
        "-d",
        "--name",
        "live",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "echo r > /running; exec sleep 1000",
    )
    for _ in range(600):
        _, changes = d.api("GET", "/containers/live/changes")
        if {"Path": "/running", "Kind": 1} in (changes or []):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the running container's change never showed: {changes}")
    d.cli("commit", "live", "live:img")
    r = d.cli("run", "--rm", "--network", "none", "live:img", "cat", "/running")
    assert r.stdout == "r\n"
    d.cli("rm", "-f", "live")
    d.cli("rmi", "live:img")
    code, err = d.api("GET", "/containers/work/changes")
    assert code == 404, err
    code, err = d.api("POST", "/commit?container=nope")
    assert code == 404 and "nope" in err["message"], err
    d.cli("rmi", "committed:v1")

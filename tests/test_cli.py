"""The CLI against a stub daemon: flags become the requests docker's CLI sends, answers
become docker's tables, messages and exit statuses.

Most tests drive the click command in-process (CliRunner); the ones about real stdin,
signals and process exit statuses run the ``pallet`` console script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from pallet import cli as pcli
from pallet.cli import _common
from pallet.cli import format as pformat
from pallet.streams import STDERR, STDOUT, frame

from tests.test_client import Request, StubServer

PALLET = str(Path(sys.executable).parent / "pallet")
CID = "4f1c8d2a9b7e" + "0" * 52
IMG = "sha256:" + "ab12cd34ef56" + "1" * 52


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StubServer]:
    import tempfile

    d = tempfile.mkdtemp(prefix="pallet-cli-")
    s = StubServer(os.path.join(d, "d.sock"))
    yield s
    s.close()
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
    assert not s.errors, s.errors


def pallet(server: StubServer, *args: str, input: bytes | str | None = None) -> Result:
    return CliRunner().invoke(pcli.cli, ["-H", server.host, *args], input=input)


def run_proc(
    server: StubServer, *args: str, input: bytes | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PALLET_HOST": server.host}
    return subprocess.run(
        [PALLET, *args], input=input, capture_output=True, env=env, timeout=timeout
    )


class RunFlow:
    """The daemon's side of ``docker run``: create, attach, wait, start."""

    def __init__(
        self,
        server: StubServer,
        *,
        output: list[bytes] | None = None,
        status: int = 0,
        echo_stdin: bool = False,
        start_error: tuple[int, str] | None = None,
        raw: bool = False,
    ) -> None:
        self.server = server
        self.output = output if output is not None else [frame(STDOUT, b"hi\n")]
        self.status = status
        self.started = threading.Event()
        self.start_failed = threading.Event()
        self.attach_done = threading.Event()
        self.killed = threading.Event()
        self.wait_headers_at = 0.0
        self.stdin: bytes | None = None
        self.echo_stdin = echo_stdin
        server.json_route("POST", "/containers/create", 201, {"Id": CID, "Warnings": []})
        server.route("POST", r"/containers/\w+/attach", self.attach)
        server.route("POST", r"/containers/\w+/wait", self.wait)
        if start_error:
            code, msg = start_error

            def fail(req: Request) -> None:
                req.error(code, msg)
                self.start_failed.set()

            server.route("POST", r"/containers/\w+/start", fail)
        else:
            server.route("POST", r"/containers/\w+/start", self.start)
        server.route("POST", r"/containers/\w+/kill", self.kill)
        self.raw = raw
        self.hold: threading.Event | None = None

    def attach(self, req: Request) -> None:
        req.upgrade(
            "application/vnd.docker.raw-stream"
            if self.raw
            else "application/vnd.docker.multiplexed-stream"
        )
        deadline = time.monotonic() + 20
        while not self.started.wait(0.02):
            if self.start_failed.is_set() or time.monotonic() > deadline:
                self.attach_done.set()
                return  # start failed: the client closes
        if self.hold is not None:
            self.hold.wait(20)
        if self.echo_stdin:
            self.stdin = req.read_until_eof()
            req.send(frame(STDOUT, b"echo: " + self.stdin))
        for piece in self.output:
            req.send(piece)
            time.sleep(0.002)
        self.attach_done.set()

    def wait(self, req: Request) -> None:
        req.start_chunked()
        self.wait_headers_at = time.monotonic()
        self.attach_done.wait(20)
        try:
            req.chunk(json.dumps({"StatusCode": self.status, "Error": None}))
            req.end_chunked()
        except OSError:
            pass  # the client went away (start failed)

    def start(self, req: Request) -> None:
        req.respond(204)
        self.started.set()

    def kill(self, req: Request) -> None:
        req.respond(204)
        self.killed.set()

    def order(self) -> list[str]:
        return [f"{r.method} {r.path.rsplit('/', 1)[-1]}" for r in self.server.requests]


# --------------------------------------------------------------------------- run


def test_run_sequence_output_and_exit_status(server: StubServer) -> None:
    flow = RunFlow(
        server,
        output=[frame(STDOUT, b"out line\n"), frame(STDERR, b"err line\n")],
        status=3,
    )
    r = pallet(server, "run", "busybox", "sh", "-c", "echo hi; exit 3")
    assert r.exit_code == 3, r.output
    assert r.stdout == "out line\n"
    assert r.stderr == "err line\n"
    assert flow.order() == ["POST create", "POST attach", "POST wait", "POST start"]
    attach = server.find("POST", r"/containers/\w+/attach")[0]
    assert attach.path == f"/containers/{CID}/attach"
    assert attach.query == {"stream": ["1"], "stdout": ["1"], "stderr": ["1"]}
    assert attach.headers["upgrade"] == "tcp"
    wait = server.find("POST", r"/containers/\w+/wait")[0]
    assert wait.q("condition") == "next-exit"
    start = server.find("POST", r"/containers/\w+/start")[0]
    assert start.at >= flow.wait_headers_at > 0, "start was sent before wait's headers came"
    body = server.find("POST", "/containers/create")[0].json()
    assert body["Image"] == "busybox"
    assert body["Cmd"] == ["sh", "-c", "echo hi; exit 3"]
    assert body["AttachStdout"] is body["AttachStderr"] is True
    assert body["AttachStdin"] is body["OpenStdin"] is body["StdinOnce"] is False
    assert body["Tty"] is False
    assert body["Entrypoint"] is None
    assert body["HostConfig"]["AutoRemove"] is False


def test_run_flags_make_the_create_body(server: StubServer, tmp_path: Path) -> None:
    RunFlow(server)
    envfile = tmp_path / "env"
    envfile.write_text("# comment\n\nFROM_FILE=1\nPASSED_THROUGH\nUNSET_VAR\n")
    runner = CliRunner(env={"PASSED_THROUGH": "yes", "HOSTVAR": "hv"})
    r = runner.invoke(
        pcli.cli,
        [
            "-H",
            server.host,
            "run",
            "--rm",
            "--name",
            "web",
            "-e",
            "A=1",
            "--env",
            "B=two words",
            "-e",
            "HOSTVAR",
            "--env-file",
            str(envfile),
            "-w",
            "/tmp",
            "--entrypoint",
            "/bin/echo",
            "-u",
            "1000:100",
            "--runtime",
            "crun",
            "-h",
            "box",
            "-l",
            "a=b",
            "busybox:1.36",
            "-n",
            "--flag-for-the-command",
        ],
    )
    assert r.exit_code == 0, r.output
    create = server.find("POST", "/containers/create")[0]
    assert create.q("name") == "web"
    body = create.json()
    assert body["Env"] == ["FROM_FILE=1", "PASSED_THROUGH=yes", "A=1", "B=two words", "HOSTVAR=hv"]
    assert body["WorkingDir"] == "/tmp"
    assert body["Entrypoint"] == ["/bin/echo"]
    assert body["Cmd"] == ["-n", "--flag-for-the-command"]
    assert body["User"] == "1000:100"
    assert body["Hostname"] == "box"
    assert body["Image"] == "busybox:1.36"
    assert body["Labels"] == {"a": "b"}
    assert body["HostConfig"] == {"AutoRemove": True, "Runtime": "crun"}
    assert server.find("POST", r"/containers/\w+/wait")[0].q("condition") == "removed"


def test_run_empty_entrypoint_resets_it(server: StubServer) -> None:
    RunFlow(server)
    assert pallet(server, "run", "--entrypoint", "", "busybox").exit_code == 0
    body = server.find("POST", "/containers/create")[0].json()
    assert body["Entrypoint"] == [""]
    assert body["Cmd"] is None


def test_run_detached_prints_the_id(server: StubServer) -> None:
    flow = RunFlow(server)
    r = pallet(server, "run", "-d", "busybox", "sleep", "100")
    assert r.exit_code == 0, r.output
    assert r.stdout == CID + "\n"
    assert flow.order() == ["POST create", "POST start"]
    body = server.find("POST", "/containers/create")[0].json()
    assert body["AttachStdout"] is False and body["AttachStderr"] is False


def test_run_interactive_stdin_then_half_close(server: StubServer) -> None:
    flow = RunFlow(server, echo_stdin=True, output=[frame(STDOUT, b"after eof\n")])
    r = pallet(server, "run", "-i", "busybox", "cat", input=b"line one\nline two\n")
    assert r.exit_code == 0, r.output
    assert flow.stdin == b"line one\nline two\n"
    assert r.stdout == "echo: line one\nline two\nafter eof\n"
    attach = server.find("POST", r"/containers/\w+/attach")[0]
    assert attach.q("stdin") == "1"
    body = server.find("POST", "/containers/create")[0].json()
    assert body["AttachStdin"] is body["OpenStdin"] is body["StdinOnce"] is True


def test_run_interactive_real_process(server: StubServer) -> None:
    flow = RunFlow(server, echo_stdin=True, status=7)
    r = run_proc(server, "run", "-i", "busybox", "cat", input=b"from a pipe\n")
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"echo: from a pipe\nhi\n"
    assert flow.stdin == b"from a pipe\n"


def test_run_tty_copies_raw_bytes(server: StubServer) -> None:
    RunFlow(server, output=[b"\x1b[0mraw\r\n", frame(STDOUT, b"x")], raw=True)
    r = pallet(server, "run", "-t", "busybox")
    assert r.exit_code == 0
    assert r.stdout_bytes == b"\x1b[0mraw\r\n" + frame(STDOUT, b"x")
    assert server.find("POST", "/containers/create")[0].json()["Tty"] is True


def test_run_proxies_signals(server: StubServer) -> None:
    flow = RunFlow(server, status=143)
    flow.output = []
    flow.hold = flow.killed  # the container runs until it gets the signal
    env = {**os.environ, "PALLET_HOST": server.host}
    proc = subprocess.Popen(
        [PALLET, "run", "busybox", "sleep", "100"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert flow.started.wait(20)
        time.sleep(0.3)  # the handlers are installed right after start
        proc.send_signal(signal.SIGTERM)
        assert flow.killed.wait(10), "SIGTERM was not forwarded to the container"
        kill = server.find("POST", r"/containers/\w+/kill")[0]
        assert kill.q("signal") == "SIGTERM"
        assert proc.wait(20) == 143
    finally:
        proc.kill()
        proc.wait()
        flow.attach_done.set()


def test_run_missing_image_pulls_then_retries(server: StubServer) -> None:
    flow = RunFlow(server)
    created = []

    @server.route("POST", "/containers/create")
    def create(req: Request) -> None:
        created.append(req)
        if len(created) == 1:
            req.error(404, "No such image: alpine:latest")
        else:
            req.respond(201, {"Id": CID, "Warnings": ["low memory"]})

    server.routes.insert(0, server.routes.pop())  # before RunFlow's create

    @server.route("POST", "/images/create")
    def pull(req: Request) -> None:
        req.start_chunked()
        for msg in [
            {"status": "Pulling from library/alpine", "id": "latest"},
            {"status": "Downloading", "progressDetail": {"current": 1, "total": 2}, "id": "l1"},
            {"status": "Pull complete", "progressDetail": {}, "id": "l1"},
            {"status": "Status: Downloaded newer image for alpine:latest"},
        ]:
            req.chunk(json.dumps(msg) + "\r\n")
        req.end_chunked()

    r = pallet(server, "run", "alpine", "true")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [
        "Unable to find image 'alpine:latest' locally",
        "latest: Pulling from library/alpine",
        "l1: Pull complete",
        "Status: Downloaded newer image for alpine:latest",
        "WARNING: low memory",
    ]
    assert r.stdout == "hi\n"
    pull_req = server.find("POST", "/images/create")[0]
    assert pull_req.query == {"fromImage": ["alpine"], "tag": ["latest"]}
    assert len(created) == 2
    assert flow.started.is_set()


def test_run_pull_refused_exits_125(server: StubServer) -> None:
    server.route("POST", "/containers/create", lambda r: r.error(404, "No such image: nope:latest"))
    server.route(
        "POST", "/images/create", lambda r: r.error(501, "pulling images is not supported yet")
    )
    r = pallet(server, "run", "nope")
    assert r.exit_code == 125
    assert r.stderr == (
        "Unable to find image 'nope:latest' locally\n"
        "pallet: Error response from daemon: pulling images is not supported yet\n"
        "See 'pallet run --help'.\n"
    )


def test_run_pull_error_in_stream_exits_125(server: StubServer) -> None:
    server.route("POST", "/containers/create", lambda r: r.error(404, "No such image: x:1"))

    @server.route("POST", "/images/create")
    def pull(req: Request) -> None:
        req.start_chunked()
        req.chunk(json.dumps({"errorDetail": {"message": "manifest unknown"}, "error": "m"}))
        req.end_chunked()

    r = pallet(server, "run", "x:1")
    assert r.exit_code == 125
    assert "Unable to find image 'x:1' locally" in r.stderr
    assert "pallet: manifest unknown" in r.stderr


def test_run_create_conflict_exits_125(server: StubServer) -> None:
    msg = 'Conflict. The container name "/web" is already in use'
    server.route("POST", "/containers/create", lambda r: r.error(409, msg))
    r = pallet(server, "run", "--name", "web", "busybox")
    assert r.exit_code == 125
    assert r.stderr == (f"pallet: Error response from daemon: {msg}\nSee 'pallet run --help'.\n")
    r = pallet(server, "create", "--name", "web", "busybox")
    assert r.exit_code == 125
    assert f"Error response from daemon: {msg}" in r.stderr


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ('exec: "nope": executable file not found in $PATH', 127),
        ("exec /bin/nope: no such file or directory", 127),
        ("exec /etc/passwd: permission denied", 126),
        ("exec /etc: is a directory", 126),
        ("cgroup setup failed", 125),
    ],
)
def test_run_start_failure_status(server: StubServer, message: str, status: int) -> None:
    RunFlow(server, start_error=(400, message))
    r = pallet(server, "run", "busybox", "nope")
    assert r.exit_code == status
    assert r.stderr == (
        f"pallet: Error response from daemon: {message}\nSee 'pallet run --help'.\n"
    )


def test_run_wait_error(server: StubServer) -> None:
    flow = RunFlow(server)

    def wait(req: Request) -> None:
        req.start_chunked()
        flow.attach_done.wait(10)
        req.chunk(json.dumps({"StatusCode": 0, "Error": {"Message": "container vanished"}}))
        req.end_chunked()

    server.routes.insert(0, ("POST", __import__("re").compile(r"^/containers/\w+/wait$"), wait))
    r = pallet(server, "run", "busybox")
    assert r.exit_code == 125
    assert "Error waiting for container: container vanished" in r.stderr


def test_cannot_connect(tmp_path: Path) -> None:
    host = f"unix://{tmp_path}/none.sock"
    r = CliRunner().invoke(pcli.cli, ["-H", host, "ps"])
    assert r.exit_code == 1
    assert r.stderr == f"Cannot connect to the pallet daemon at {host}. Is the daemon running?\n"
    r = CliRunner().invoke(pcli.cli, ["-H", host, "run", "busybox"])
    assert r.exit_code == 125
    assert r.stderr.startswith(f"pallet: Cannot connect to the pallet daemon at {host}.")


def test_pallet_host_env(server: StubServer) -> None:
    server.json_route("GET", "/containers/json", 200, [])
    r = CliRunner(env={"PALLET_HOST": server.host}).invoke(pcli.cli, ["ps", "-q"])
    assert r.exit_code == 0, r.output
    assert len(server.requests) == 1


def test_usage_errors_exit_125(server: StubServer) -> None:
    r = pallet(server, "ps", "--bogus")
    assert r.exit_code == 125
    assert "--bogus" in r.stderr
    assert pallet(server, "run").exit_code == 125
    assert not server.requests


def test_help_is_fast_and_lazy() -> None:
    code = (
        "import sys, pallet.cli;"
        "assert 'pallet.client' not in sys.modules;"
        "assert 'threading' not in sys.modules or True"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    r = subprocess.run([PALLET, "--help"], capture_output=True, text=True, check=True)
    assert "run" in r.stdout and "Usage: pallet" in r.stdout
    r = subprocess.run([PALLET], capture_output=True, text=True)
    assert r.returncode == 0 and "Commands:" in r.stdout


def _modules_after(*args: str) -> set[str]:
    """The modules loaded once ``pallet ARGS`` has run (in a fresh interpreter)."""
    code = (
        "import sys\n"
        "from pallet.cli import main\n"
        f"sys.argv = ['pallet', *{list(args)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(r.stderr.split())


def test_commands_load_only_their_module() -> None:
    loaded = _modules_after("--help")
    assert not {"pallet.cli.containers", "pallet.cli.images", "pallet.cli.system"} & loaded
    loaded = _modules_after("run", "--help")
    assert "pallet.cli.containers" in loaded
    assert not {"pallet.cli.images", "pallet.cli.system", "pallet.client"} & loaded
    loaded = _modules_after("images", "--help")
    assert "pallet.cli.images" in loaded
    assert not {"pallet.cli.containers", "pallet.cli.system"} & loaded


def test_command_table_matches_the_commands() -> None:
    """Each COMMANDS entry names a command of that name whose short help is the table's,
    so `pallet --help` (which reads only the table) shows what `pallet CMD --help` does."""
    for name, (target, short_help) in pcli.COMMANDS.items():
        command = pcli.load_command(name)
        assert command.name == name, target
        assert command.get_short_help_str(limit=1000) == short_help, target
    r = CliRunner().invoke(pcli.cli, ["--help"])
    listed = [line.split()[0] for line in r.stdout.split("Commands:\n")[1].splitlines()]
    assert listed == sorted(pcli.COMMANDS)
    assert pcli.cli.get_command(click.Context(pcli.cli), "nope") is None


# --------------------------------------------------------------------------- start/stop/...


def test_start_stop_kill_rm_restart(server: StubServer) -> None:
    for verb in ("start", "stop", "kill", "restart"):
        server.route("POST", rf"/containers/\w+/{verb}", lambda r: r.respond(204))
    server.route(
        "POST", r"/containers/missing/\w+", lambda r: r.error(404, "No such container: missing")
    )
    server.routes.insert(0, server.routes.pop())
    server.route("DELETE", r"/containers/\w+", lambda r: r.respond(204))

    r = pallet(server, "start", "a", "b")
    assert (r.exit_code, r.stdout) == (0, "a\nb\n")
    r = pallet(server, "stop", "-t", "3", "-s", "SIGUSR1", "a")
    assert (r.exit_code, r.stdout) == (0, "a\n")
    stop = server.find("POST", r"/containers/a/stop")[0]
    assert stop.query == {"t": ["3"], "signal": ["SIGUSR1"]}
    r = pallet(server, "kill", "-s", "HUP", "a")
    assert r.exit_code == 0
    assert server.find("POST", r"/containers/a/kill")[0].query == {"signal": ["HUP"]}
    r = pallet(server, "kill", "a")
    assert server.find("POST", r"/containers/a/kill")[-1].query == {}
    r = pallet(server, "rm", "-f", "-v", "a", "b")
    assert (r.exit_code, r.stdout) == (0, "a\nb\n")
    assert server.find("DELETE", "/containers/a")[0].query == {"force": ["1"], "v": ["1"]}
    r = pallet(server, "rm", "b")
    assert server.find("DELETE", "/containers/b")[-1].query == {}
    r = pallet(server, "restart", "a")
    assert r.exit_code == 0

    r = pallet(server, "stop", "a", "missing", "b")
    assert r.exit_code == 1
    assert r.stdout == "a\nb\n"
    assert r.stderr == "Error response from daemon: No such container: missing\n"
    r = pallet(server, "start", "missing")
    assert r.exit_code == 1
    assert r.stderr == (
        "Error response from daemon: No such container: missing\n"
        "Error: failed to start containers: missing\n"
    )


def test_start_attach(server: StubServer) -> None:
    flow = RunFlow(server, output=[frame(STDERR, b"oops\n")], status=2)
    server.json_route(
        "GET",
        r"/containers/\w+/json",
        200,
        {"Id": CID, "Config": {"Tty": False, "OpenStdin": True}, "HostConfig": {}},
    )
    r = pallet(server, "start", "-a", "web")
    assert r.exit_code == 2
    assert r.stderr == "oops\n"
    assert flow.order() == ["GET json", "POST attach", "POST wait", "POST start"]
    assert server.find("POST", r"/containers/\w+/attach")[0].q("stdin") is None


def test_wait(server: StubServer) -> None:
    server.json_route("POST", r"/containers/a/wait", 200, {"StatusCode": 0})
    server.json_route("POST", r"/containers/b/wait", 200, {"StatusCode": 137})
    server.route("POST", r"/containers/c/wait", lambda r: r.error(404, "No such container: c"))
    r = pallet(server, "wait", "a", "b", "c")
    assert r.exit_code == 1
    assert r.stdout == "0\n137\n"
    assert r.stderr == "Error response from daemon: No such container: c\n"


# --------------------------------------------------------------------------- ps / images

NOW = time.time()


def _containers() -> list[dict[str, Any]]:
    return [
        {
            "Id": CID,
            "Names": ["/web"],
            "Image": "busybox",
            "ImageID": IMG,
            "Command": "sh -c 'while true; do sleep 1; done'",
            "Created": int(NOW - 125),
            "State": "running",
            "Status": "Up 3 seconds",
            "Ports": [],
            "Labels": {},
        },
        {
            "Id": "9" * 64,
            "Names": ["/quick_exit"],
            "Image": IMG,
            "ImageID": IMG,
            "Command": "true",
            "Created": int(NOW - 3 * 3600),
            "State": "exited",
            "Status": "Exited (0) 5 seconds ago",
            "Ports": [{"PrivatePort": 80, "Type": "tcp"}],
            "Labels": {"a": "b"},
        },
    ]


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)


def test_ps_table(server: StubServer, frozen_time: None) -> None:
    server.json_route("GET", "/containers/json", 200, _containers())
    r = pallet(server, "ps", "-a")
    assert r.exit_code == 0, r.output
    assert server.requests[0].query == {"all": ["1"]}
    assert r.stdout == (
        "CONTAINER ID   IMAGE          COMMAND                  CREATED         "
        "STATUS                     PORTS     NAMES\n"
        '4f1c8d2a9b7e   busybox        "sh -c \'while true; …"   2 minutes ago   '
        "Up 3 seconds                         web\n"
        '999999999999   ab12cd34ef56   "true"                   3 hours ago     '
        "Exited (0) 5 seconds ago   80/tcp    quick_exit\n"
    )


def test_ps_quiet_no_trunc_filters_format(server: StubServer) -> None:
    server.json_route("GET", "/containers/json", 200, _containers())
    r = pallet(server, "ps", "-q")
    assert r.stdout == "4f1c8d2a9b7e\n999999999999\n"
    assert server.requests[-1].query == {}
    r = pallet(server, "ps", "-a", "-q", "--no-trunc", "-f", "status=exited", "-f", "name=q")
    assert r.stdout == f"{CID}\n{'9' * 64}\n"
    assert json.loads(server.requests[-1].q("filters") or "") == {
        "status": ["exited"],
        "name": ["q"],
    }
    r = pallet(server, "ps", "--no-trunc", "--format", "{{.Names}}:{{.Command}}")
    assert r.stdout.splitlines()[0] == "web:\"sh -c 'while true; do sleep 1; done'\""
    r = pallet(server, "ps", "--format", "table {{.Names}}\\t{{.State}}")
    assert r.stdout == ("NAMES        STATE\nweb          running\nquick_exit   exited\n")
    r = pallet(server, "ps", "-f", "bad")
    assert r.exit_code == 125


def test_ps_empty(server: StubServer) -> None:
    server.json_route("GET", "/containers/json", 200, [])
    r = pallet(server, "ps")
    assert r.stdout == ("CONTAINER ID   IMAGE     COMMAND   CREATED   STATUS    PORTS     NAMES\n")


def test_images(server: StubServer, frozen_time: None) -> None:
    images = [
        {
            "Id": IMG,
            "RepoTags": ["busybox:latest", "localhost:5000/bb:1"],
            "RepoDigests": [],
            "Created": int(NOW - 3 * 24 * 3600),
            "Size": 4_261_550,
        },
        {
            "Id": "sha256:" + "f" * 64,
            "RepoTags": [],
            "RepoDigests": [],
            "Created": int(NOW - 30),
            "Size": 999,
        },
    ]
    server.json_route("GET", "/images/json", 200, images)
    r = pallet(server, "images")
    assert r.exit_code == 0, r.output
    assert r.stdout == (
        "REPOSITORY          TAG       IMAGE ID       CREATED          SIZE\n"
        "busybox             latest    ab12cd34ef56   3 days ago       4.26MB\n"
        "localhost:5000/bb   1         ab12cd34ef56   3 days ago       4.26MB\n"
        "<none>              <none>    ffffffffffff   30 seconds ago   999B\n"
    )
    r = pallet(server, "images", "-q", "-a")
    assert r.stdout == "ab12cd34ef56\nab12cd34ef56\nffffffffffff\n"
    assert server.requests[-1].query == {"all": ["1"]}
    r = pallet(server, "images", "--no-trunc", "-q", "busybox")
    assert r.stdout.splitlines()[0] == IMG
    assert json.loads(server.requests[-1].q("filters") or "") == {"reference": ["busybox"]}


# --------------------------------------------------------------------------- logs / inspect


def test_logs(server: StubServer) -> None:
    server.json_route("GET", r"/containers/\w+/json", 200, {"Id": CID, "Config": {"Tty": False}})

    @server.route("GET", r"/containers/\w+/logs")
    def logs(req: Request) -> None:
        req.start_chunked(content_type="application/vnd.docker.multiplexed-stream")
        req.chunk(frame(STDOUT, b"one\n") + frame(STDERR, b"two\n")[:3])
        req.chunk(frame(STDERR, b"two\n")[3:])
        req.end_chunked()

    r = pallet(server, "logs", "--tail", "2", "-t", "-f", "--since", "1700000000", "web")
    assert r.exit_code == 0, r.output
    assert (r.stdout, r.stderr) == ("one\n", "two\n")
    q = server.find("GET", r"/containers/\w+/logs")[0].query
    assert q == {
        "stdout": ["1"],
        "stderr": ["1"],
        "follow": ["1"],
        "tail": ["2"],
        "timestamps": ["1"],
        "since": ["1700000000"],
    }
    r = pallet(server, "logs", "--since", "10m", "web")
    since = float(server.find("GET", r"/containers/\w+/logs")[-1].q("since") or 0)
    assert abs(since - (time.time() - 600)) < 30
    assert server.find("GET", r"/containers/\w+/logs")[-1].q("tail") == "all"


def test_logs_tty_is_raw(server: StubServer) -> None:
    server.json_route("GET", r"/containers/\w+/json", 200, {"Id": CID, "Config": {"Tty": True}})

    @server.route("GET", r"/containers/\w+/logs")
    def logs(req: Request) -> None:
        req.respond(200, b"\x01raw\r\n", content_type="application/vnd.docker.raw-stream")

    r = pallet(server, "logs", "web")
    assert r.stdout_bytes == b"\x01raw\r\n"


def test_logs_missing_container(server: StubServer) -> None:
    server.route("GET", r"/containers/\w+/json", lambda r: r.error(404, "No such container: x"))
    r = pallet(server, "logs", "x")
    assert r.exit_code == 1
    assert r.stderr == "Error response from daemon: No such container: x\n"


CONTAINER_JSON = {
    "Id": CID,
    "Name": "/web",
    "State": {"Status": "exited", "Running": False, "ExitCode": 3, "Pid": 0},
    "Config": {"Env": ["A=1", "B=2"], "Cmd": ["sh"], "Labels": {"z": "1", "a": "2"}},
}


def test_inspect(server: StubServer) -> None:
    server.json_route("GET", "/containers/web/json", 200, CONTAINER_JSON)
    server.route("GET", r"/containers/\w+/json", lambda r: r.error(404, "No such container"))
    server.json_route("GET", "/images/busybox/json", 200, {"Id": IMG, "RepoTags": ["busybox"]})
    server.route("GET", r"/images/.+/json", lambda r: r.error(404, "No such image"))

    r = pallet(server, "inspect", "web")
    assert r.exit_code == 0
    assert r.stdout == json.dumps([CONTAINER_JSON], indent=4) + "\n"
    r = pallet(server, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", "web")
    assert r.stdout == "exited 3\n"
    r = pallet(server, "inspect", "--format", "{{json .Config.Env}}", "web")
    assert r.stdout == '["A=1","B=2"]\n'
    r = pallet(server, "inspect", "-f", "{{.Id}}", "busybox", "web")
    assert r.stdout == f"{IMG}\n{CID}\n"
    r = pallet(server, "inspect", "web", "nothere")
    assert r.exit_code == 1
    assert json.loads(r.stdout) == [CONTAINER_JSON]
    assert r.stderr == "Error: No such object: nothere\n"
    r = pallet(server, "inspect", "--type", "image", "web")
    assert r.exit_code == 1
    assert r.stderr == "Error: No such image: web\n"
    r = pallet(server, "inspect", "-f", "{{.Nope", "web")
    assert r.exit_code == 1


# --------------------------------------------------------------------------- images


def test_import_file(server: StubServer, tmp_path: Path) -> None:
    tar = tmp_path / "rootfs.tar"
    data = os.urandom(200_000)
    tar.write_bytes(data)

    @server.route("POST", "/images/create")
    def create(req: Request) -> None:
        req.start_chunked()
        req.chunk(json.dumps({"status": IMG}) + "\r\n")
        req.end_chunked()

    r = pallet(
        server,
        "import",
        "-c",
        'CMD ["sh"]',
        "--change",
        "ENV A=1",
        "-m",
        "hi",
        str(tar),
        "busybox:1.0",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == IMG + "\n"
    req = server.requests[0]
    assert req.body == data
    assert req.query == {
        "fromSrc": ["-"],
        "repo": ["busybox"],
        "tag": ["1.0"],
        "message": ["hi"],
        "changes": ['CMD ["sh"]', "ENV A=1"],
    }
    assert req.headers["content-type"] == "application/x-tar"

    r = pallet(server, "import", "-", "localhost:5000/x", input=b"tar from stdin")
    assert r.exit_code == 0, r.output
    assert server.requests[-1].body == b"tar from stdin"
    assert server.requests[-1].query == {"fromSrc": ["-"], "repo": ["localhost:5000/x"]}

    r = pallet(server, "import", str(tmp_path / "missing.tar"))
    assert r.exit_code == 1
    assert "no such file" in r.stderr.lower()


def test_import_refused(server: StubServer, tmp_path: Path) -> None:
    (tmp_path / "t.tar").write_bytes(b"x" * 10)
    server.route("POST", "/images/create", lambda r: r.error(400, "not a tar archive"))
    r = pallet(server, "import", str(tmp_path / "t.tar"))
    assert (r.exit_code, r.stderr) == (1, "Error response from daemon: not a tar archive\n")


def test_tag_and_rmi(server: StubServer) -> None:
    server.route("POST", r"/images/.+/tag", lambda r: r.respond(201))
    server.json_route(
        "DELETE",
        r"/images/.+",
        200,
        [{"Untagged": "busybox:latest"}, {"Deleted": IMG}],
    )
    r = pallet(server, "tag", "busybox", "localhost:5000/bb:v1")
    assert r.exit_code == 0
    req = server.requests[-1]
    assert req.path == "/images/busybox/tag"
    assert req.query == {"repo": ["localhost:5000/bb"], "tag": ["v1"]}
    pallet(server, "tag", "busybox", "mine")
    assert server.requests[-1].query == {"repo": ["mine"], "tag": ["latest"]}
    r = pallet(server, "rmi", "-f", "busybox")
    assert r.exit_code == 0
    assert r.stdout == f"Untagged: busybox:latest\nDeleted: {IMG}\n"
    assert server.requests[-1].query == {"force": ["1"]}


# --------------------------------------------------------------------------- info / version


def test_info(server: StubServer) -> None:
    server.json_route(
        "GET",
        "/info",
        200,
        {
            "Containers": 3,
            "ContainersRunning": 1,
            "ContainersPaused": 0,
            "ContainersStopped": 2,
            "Images": 1,
            "ServerVersion": "0.1.0",
            "Driver": "overlay",
            "DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]],
            "PalletPlugins": [
                {"Name": "storage_overlay", "State": "loaded", "Reason": ""},
                {"Name": "storage_btrfs", "State": "skipped", "Reason": "not on btrfs"},
            ],
            "OSType": "linux",
            "MemTotal": 16_000_000_000,
            "DockerRootDir": "/var/lib/pallet",
        },
    )
    r = pallet(server, "info")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert " Containers: 3\n  Running: 1\n  Paused: 0\n  Stopped: 2\n" in out
    assert " Storage Driver: overlay\n  Backing Filesystem: extfs\n  Supports d_type: true\n" in out
    assert " Pallet Plugins:\n  storage_overlay  loaded\n" in out
    assert "  storage_btrfs    skipped (not on btrfs)\n" in out
    assert " Total Memory: 14.9GiB\n" in out
    r = pallet(server, "info", "-f", "{{.Driver}} {{len .PalletPlugins}}")
    assert r.stdout == "overlay 2\n"


def test_version(server: StubServer) -> None:
    server.json_route(
        "GET",
        "/version",
        200,
        {
            "Version": "0.1.0",
            "ApiVersion": "1.44",
            "MinAPIVersion": "1.24",
            "Os": "linux",
            "Arch": "amd64",
            "Components": [{"Name": "Engine", "Version": "0.1.0", "Details": {}}],
        },
    )
    r = pallet(server, "version")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Client:\n Version:           0.1.0\n API version:       1.44\n")
    assert "Server: pallet\n Engine:\n  Version:           0.1.0\n" in r.stdout
    assert "  API version:       1.44 (minimum version 1.24)\n" in r.stdout
    r = pallet(server, "version", "-f", "{{.Server.Version}}/{{.Client.ApiVersion}}")
    assert r.stdout == "0.1.0/1.44\n"


def test_version_without_daemon(tmp_path: Path) -> None:
    r = CliRunner().invoke(pcli.cli, ["-H", f"unix://{tmp_path}/x.sock", "version"])
    assert r.exit_code == 1
    assert r.stdout.startswith("Client:\n")
    assert "Cannot connect to the pallet daemon" in r.stderr


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "Less than a second"),
        (1, "1 second"),
        (59, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (120, "2 minutes"),
        (59 * 60, "59 minutes"),
        (3600, "About an hour"),
        (5400, "2 hours"),
        (47 * 3600, "47 hours"),
        (48 * 3600, "2 days"),
        (14 * 86400, "2 weeks"),
        (60 * 86400, "2 months"),
        (800 * 86400, "2 years"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert pformat.human_duration(seconds) == text


def test_sizes() -> None:
    assert pformat.human_size(0) == "0B"
    assert pformat.human_size(999) == "999B"
    assert pformat.human_size(1000) == "1kB"
    assert pformat.human_size(4_261_550) == "4.26MB"
    assert pformat.human_size(1_234_567_890) == "1.23GB"
    assert pformat.bytes_size(16 * 1024**3) == "16GiB"


def test_tabwrite_like_go() -> None:
    assert pformat.tabwrite(["A\tBB\tC", "longer value\tx\ty"]) == (
        "A              BB        C\nlonger value   x         y\n"
    )


def test_references() -> None:
    assert _common.split_reference("busybox") == ("busybox", "")
    assert _common.split_reference("busybox:1.36") == ("busybox", "1.36")
    assert _common.split_reference("localhost:5000/a/b") == ("localhost:5000/a/b", "")
    assert _common.split_reference("localhost:5000/a:v2") == ("localhost:5000/a", "v2")
    assert _common.tagged_reference("busybox") == "busybox:latest"
    assert _common.tagged_reference("a@sha256:00") == "a@sha256:00"


@pytest.mark.parametrize(
    ("tpl", "out"),
    [
        ("{{.Name}}", "/web"),
        ("{{.State.Running}} {{.State.Pid}}", "false 0"),
        ("{{.Missing}}", "<no value>"),
        ("{{json .Config.Labels}}", '{"z":"1","a":"2"}'),
        ("{{.Config.Labels}}", "map[a:2 z:1]"),
        ("{{.Config.Env}}", "[A=1 B=2]"),
        ('{{join .Config.Env ","}}', "A=1,B=2"),
        ('{{index .Config.Labels "z"}}', "1"),
        ("{{.Name | upper}}", "/WEB"),
        ("{{range .Config.Env}}[{{.}}]{{end}}", "[A=1][B=2]"),
        ("{{range $k, $v := .Config.Labels}}{{$k}}={{$v}};{{end}}", "a=2;z=1;"),
        ("{{if .State.Running}}up{{else}}down{{end}}", "down"),
        ('{{if eq .State.Status "exited"}}E{{end}}', "E"),
        ("{{if not .State.Running}}stopped{{end}}", "stopped"),
        ("{{with .State}}{{.ExitCode}}{{end}}", "3"),
        ('a {{- " b " -}} c', "a b c"),
        ("{{len .Config.Env}}", "2"),
        ('{{printf "%s:%d" .Name .State.ExitCode}}', "/web:3"),
        ("{{.Config.Cmd | json}}", '["sh"]'),
        ("{{range .Config.Nope}}x{{else}}none{{end}}", "none"),
        ("{{if .State.Running}}a{{else if .State.ExitCode}}b{{else}}c{{end}}", "b"),
    ],
)
def test_templates(tpl: str, out: str) -> None:
    assert pformat.Template(tpl).execute(CONTAINER_JSON) == out


def test_jsonmessages_non_tty() -> None:
    import io

    out = io.StringIO()
    aux = pformat.display_jsonmessages(
        [
            {"status": "Importing", "progressDetail": {"current": 10}, "id": "x"},
            {"stream": "Step 1/2\n"},
            {"aux": {"ID": IMG}},
            {"status": IMG},
        ],
        out,
    )
    assert out.getvalue() == f"Step 1/2\n{IMG}\n"
    assert aux == {"ID": IMG}

"""``pallet``: the command line, a client of the daemon's Docker Engine API.

Verbs, flags, output tables, messages and exit statuses follow the docker CLI's, so
that scripts written for one work with the other. The module is on the path of every
command: it imports click and nothing heavy at the top; the HTTP client, threading,
signal handling and the like are imported inside the commands that need them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from pallet.client import Client, Hijacked, Response

F = TypeVar("F", bound=Callable[..., Any])

# --------------------------------------------------------------------------- plumbing


class _State:
    def __init__(self, host: str | None) -> None:
        self.host = host
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            from pallet.client import Client

            self._client = Client(self.host)
        return self._client


def _client() -> Client:
    ctx = click.get_current_context()
    state = ctx.find_object(_State)
    if state is None:  # a command invoked on its own (tests)
        state = _State(None)
        ctx.obj = state
    return state.client()


def _err(message: str) -> None:
    click.echo(message, err=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    _err(message)
    sys.exit(code)


def _is_client_error(exc: BaseException) -> bool:
    if "pallet.client" not in sys.modules:
        return False
    from pallet.client import ClientError

    return isinstance(exc, ClientError)


def _is_status(exc: BaseException, *statuses: int) -> bool:
    from pallet.client import APIError

    return isinstance(exc, APIError) and exc.status in statuses


class PalletGroup(click.Group):
    """The top-level group: docker's exit statuses (125 for bad usage, 1 for a daemon
    error) and messages on stderr."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        try:
            rv = super().main(
                args, prog_name or "pallet", complete_var, standalone_mode=False, **extra
            )
        except click.UsageError as exc:
            exc.show()
            sys.exit(125)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            sys.exit(130)
        # (a reader that went away, `pallet ps | head`, is click's: quiet exit 1)
        except Exception as exc:
            if _is_client_error(exc):
                _fail(str(exc))
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=PalletGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["--help"], "max_content_width": 100},
)
@click.option(
    "-H",
    "--host",
    envvar="PALLET_HOST",
    metavar="HOST",
    help="Daemon socket to connect to (unix:///run/pallet.sock, tcp://host:port).",
)
@click.version_option(
    None, "-v", "--version", package_name="pallet", message="pallet version %(version)s"
)
@click.pass_context
def cli(ctx: click.Context, host: str | None) -> None:
    """A container engine built the way Docker was.

    pallet talks to the pallet daemon (palletd) through the Docker Engine API.
    """
    ctx.obj = _State(host)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main() -> None:
    """Console-script entry point."""
    cli.main()


# --------------------------------------------------------------------------- formatting


def human_duration(seconds: float) -> str:
    """go-units' HumanDuration: "Less than a second", "About a minute", "3 hours"..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def _go_g(value: float, precision: int) -> str:
    text = f"{value:.{precision}g}"
    return text


def human_size(size: float) -> str:
    """go-units' HumanSizeWithPrecision(size, 3): decimal units, "4.26MB"."""
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000.0
        i += 1
    return _go_g(size, 3) + units[i]


def bytes_size(size: float) -> str:
    """go-units' BytesSize: binary units, "15.5GiB"."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"]
    i = 0
    while size >= 1024 and i < len(units) - 1:
        size /= 1024.0
        i += 1
    return _go_g(size, 4) + units[i]


def ellipsis(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    return text[: width - 1] + "…"


def go_quote(text: str) -> str:
    """Close to Go's strconv.Quote."""
    import json

    return json.dumps(text, ensure_ascii=False)


def tabwrite(lines: Iterable[str], minwidth: int = 10, padding: int = 3) -> str:
    """Go's tabwriter as docker configures it (minwidth 10, padding 3, blanks): cells
    end with a tab; the last cell of a line is not padded."""
    rows = [line.split("\t") for line in lines]
    ncols = max((len(r) for r in rows), default=0)
    widths = [0] * ncols
    for r in rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell) + padding, minwidth)
    out = []
    for r in rows:
        parts = [cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])]
        parts.append(r[-1])
        out.append("".join(parts))
    return "".join(line + "\n" for line in out)


def short_id(ident: str, trunc: bool = True) -> str:
    if not trunc:
        return ident
    if ident.startswith("sha256:"):
        ident = ident[len("sha256:") :]
    return ident[:12]


# --------------------------------------------------------------------------- Go templates

_MISSING = object()


class TemplateError(Exception):
    pass


def _go_str(value: Any) -> str:
    if value is _MISSING:
        return "<no value>"
    if value is None:
        return "<nil>"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + " ".join(_go_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_go_str(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def _truthy(value: Any) -> bool:
    if value is _MISSING or value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | str | list | tuple | dict):
        return bool(value)
    return True


def _tpl_json(value: Any) -> str:
    import json

    value = None if value is _MISSING else value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _tpl_index(value: Any, *keys: Any) -> Any:
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            if isinstance(value, dict):
                return _MISSING
            raise TemplateError(
                f"error calling index: cannot index {value!r} with {key!r}"
            ) from None
    return value


def _tpl_sprint(*args: Any) -> str:
    out = ""
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out += " "
        out += _go_str(arg)
    return out


def _tpl_printf(fmt: str, *args: Any) -> str:
    out = []
    it = iter(args)
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        if ch != "%" or i + 1 >= len(fmt):
            out.append(ch)
            i += 1
            continue
        verb = fmt[i + 1]
        i += 2
        if verb == "%":
            out.append("%")
            continue
        arg = next(it, _MISSING)
        if verb == "q":
            out.append(go_quote(_go_str(arg)))
        elif verb == "d" and isinstance(arg, int | float):
            out.append(str(int(arg)))
        else:
            out.append(_go_str(arg))
    return "".join(out)


def _tpl_cmp(op: str) -> Callable[..., bool]:
    def cmp(a: Any, *b: Any) -> bool:
        if op == "eq":
            return any(a == x for x in b)
        x = b[0]
        return {
            "ne": a != x,
            "lt": a < x,
            "le": a <= x,
            "gt": a > x,
            "ge": a >= x,
        }[op]

    return cmp


def _tpl_and(*args: Any) -> Any:
    for a in args:
        if not _truthy(a):
            return a
    return args[-1]


def _tpl_or(*args: Any) -> Any:
    for a in args:
        if _truthy(a):
            return a
    return args[-1]


def _tpl_title(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))


_FUNCS: dict[str, Callable[..., Any]] = {
    "json": _tpl_json,
    "index": _tpl_index,
    "join": lambda items, sep: sep.join(_go_str(x) for x in (items or [])),
    "split": lambda s, sep: s.split(sep),
    "upper": lambda s: _go_str(s).upper(),
    "lower": lambda s: _go_str(s).lower(),
    "title": lambda s: _tpl_title(_go_str(s)),
    "len": lambda v: len(v) if v not in (None, _MISSING) else 0,
    "print": _tpl_sprint,
    "println": lambda *a: " ".join(_go_str(x) for x in a) + "\n",
    "printf": _tpl_printf,
    "truncate": lambda s, n: _go_str(s)[: int(n)],
    "pad": lambda s, a, b: " " * int(a) + _go_str(s) + " " * int(b),
    "not": lambda v: not _truthy(v),
    "and": _tpl_and,
    "or": _tpl_or,
    "eq": _tpl_cmp("eq"),
    "ne": _tpl_cmp("ne"),
    "lt": _tpl_cmp("lt"),
    "le": _tpl_cmp("le"),
    "gt": _tpl_cmp("gt"),
    "ge": _tpl_cmp("ge"),
}

# A node: ("text", str) | ("pipe", pipeline) | (kind, decl, pipeline, body, else_body)
Node = tuple[Any, ...]


def _tokenize_pipe(text: str) -> list[str]:
    import re

    return re.findall(r'"(?:[^"\\]|\\.)*"|`[^`]*`|\(|\)|\||:?=|,|[^\s|(),]+', text)


class Template:
    """A subset of Go's text/template: fields (``.A.B``), variables, pipelines, the
    functions docker adds (json, join, split, upper, lower, title, truncate, pad) plus
    index/len/print/printf/eq/ne/lt/le/gt/ge/and/or/not, and if/else/range/with/end."""

    def __init__(self, source: str) -> None:
        import re

        self.source = source
        pieces: list[tuple[str, str]] = []
        pos = 0
        for m in re.finditer(r"\{\{(-\s)?(.*?)(\s-)?\}\}", source, re.S):
            text = source[pos : m.start()]
            if m.group(1):
                text = text.rstrip()
            if pieces and pieces[-1][0] == "trim":
                pieces.pop()
                text = text.lstrip()
            pieces.append(("text", text))
            pieces.append(("action", m.group(2).strip()))
            if m.group(3):
                pieces.append(("trim", ""))
            pos = m.end()
        tail = source[pos:]
        if any("{{" in text for kind, text in pieces if kind == "text") or "{{" in tail:
            raise TemplateError("unclosed action")
        if pieces and pieces[-1][0] == "trim":
            pieces.pop()
            tail = tail.lstrip()
        pieces.append(("text", tail))
        self._pieces = pieces
        self._i = 0
        self.nodes, end = self._parse_list()
        if end is not None:
            raise TemplateError(f"unexpected {{{{{end}}}}}")

    def _parse_list(self) -> tuple[list[Node], str | None]:
        nodes: list[Node] = []
        while self._i < len(self._pieces):
            kind, text = self._pieces[self._i]
            self._i += 1
            if kind == "text":
                if text:
                    nodes.append(("text", text))
                continue
            if kind == "trim":
                continue
            if text.startswith("/*"):
                continue
            word = text.split(None, 1)[0] if text else ""
            if word == "end":
                return nodes, "end"
            if word == "else":
                return nodes, text  # "else", or "else if ..." / "else with ..."
            if word in ("if", "range", "with"):
                nodes.append(self._parse_branch(word, text[len(word) :]))
                continue
            decl, pipe = self._parse_pipe(text)
            nodes.append(("pipe", decl, pipe))
        return nodes, None

    def _parse_branch(self, word: str, text: str) -> Node:
        decl, pipe = self._parse_pipe(text)
        body, end = self._parse_list()
        else_body: list[Node] = []
        if end is not None and end.startswith("else") and end != "else":
            # "else if X": an if in the else branch, closed by the same {{end}}
            rest = end[len("else") :].strip()
            inner = rest.split(None, 1)[0]
            if inner not in ("if", "with"):
                raise TemplateError(f"unexpected {{{{{end}}}}}")
            else_body = [self._parse_branch(inner, rest[len(inner) :])]
            end = "end"
        elif end == "else":
            else_body, end = self._parse_list()
        if end != "end":
            raise TemplateError(f"unexpected EOF in {word}")
        return (word, decl, pipe, body, else_body)

    @staticmethod
    def _parse_pipe(text: str) -> tuple[list[str], list[list[str]]]:
        tokens = _tokenize_pipe(text)
        decl: list[str] = []
        if ":=" in tokens or "=" in tokens:
            op = ":=" if ":=" in tokens else "="
            idx = tokens.index(op)
            decl = [t for t in tokens[:idx] if t != ","]
            tokens = tokens[idx + 1 :]
        cmds: list[list[str]] = [[]]
        for tok in tokens:
            if tok == "|":
                cmds.append([])
            else:
                cmds[-1].append(tok)
        if any(not c for c in cmds):
            raise TemplateError(f"missing value in pipeline {text.strip()!r}")
        return decl, cmds

    # -- evaluation
    def execute(self, data: Any) -> str:
        out: list[str] = []
        self._exec(self.nodes, data, {"$": data}, out)
        return "".join(out)

    def _exec(self, nodes: list[Node], dot: Any, vars: dict[str, Any], out: list[str]) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "pipe":
                value = self._pipe(node[2], dot, vars)
                if node[1]:
                    vars[node[1][-1]] = value
                else:
                    out.append(_go_str(value))
            else:
                _, decl, pipe, body, else_body = node
                value = self._pipe(pipe, dot, vars)
                if kind == "if":
                    self._exec(body if _truthy(value) else else_body, dot, dict(vars), out)
                elif kind == "with":
                    if _truthy(value):
                        self._exec(body, value, dict(vars), out)
                    else:
                        self._exec(else_body, dot, dict(vars), out)
                else:  # range
                    if isinstance(value, dict):
                        items: list[tuple[Any, Any]] = [(k, value[k]) for k in sorted(value)]
                    elif isinstance(value, list | tuple):
                        items = list(enumerate(value))
                    elif isinstance(value, int) and not isinstance(value, bool):
                        items = [(i, i) for i in range(value)]
                    else:
                        items = []
                    if not items:
                        self._exec(else_body, dot, dict(vars), out)
                    for key, elem in items:
                        scope = dict(vars)
                        if len(decl) == 1:
                            scope[decl[0]] = elem
                        elif len(decl) >= 2:
                            scope[decl[0]], scope[decl[1]] = key, elem
                        self._exec(body, elem, scope, out)

    def _pipe(self, cmds: list[list[str]], dot: Any, vars: dict[str, Any]) -> Any:
        value: Any = _MISSING
        for i, cmd in enumerate(cmds):
            extra = [value] if i else []
            value = self._command(cmd, dot, vars, extra)
        return value

    def _command(self, cmd: list[str], dot: Any, vars: dict[str, Any], extra: list[Any]) -> Any:
        head = cmd[0]
        if head in _FUNCS:
            args = [self._arg(t, dot, vars) for t in cmd[1:]] + extra
            try:
                return _FUNCS[head](*args)
            except TemplateError:
                raise
            except Exception as exc:
                raise TemplateError(f"error calling {head}: {exc}") from None
        if len(cmd) > 1 or extra:
            if head.startswith(".") or head.startswith("$"):
                raise TemplateError(f"can't give argument to non-function {head}")
            raise TemplateError(f'function "{head}" not defined')
        return self._arg(head, dot, vars)

    def _arg(self, tok: str, dot: Any, vars: dict[str, Any]) -> Any:
        if tok.startswith('"'):
            import json

            return json.loads(tok)
        if tok.startswith("`"):
            return tok[1:-1]
        if tok == ".":
            return dot
        if tok.startswith("."):
            return _field(dot, tok[1:].split("."))
        if tok.startswith("$"):
            name, _, rest = tok.partition(".")
            if name not in vars:
                raise TemplateError(f"undefined variable: {name}")
            return _field(vars[name], rest.split(".")) if rest else vars[name]
        if tok in ("true", "false"):
            return tok == "true"
        if tok == "nil":
            return None
        try:
            return int(tok)
        except ValueError:
            pass
        try:
            return float(tok)
        except ValueError:
            pass
        if tok in _FUNCS:
            return _FUNCS[tok]()
        raise TemplateError(f'function "{tok}" not defined')


def _field(value: Any, path: list[str]) -> Any:
    for name in path:
        if not name:
            continue
        if isinstance(value, dict):
            value = value.get(name, _MISSING)
        else:
            return _MISSING
    return value


def _template(fmt: str) -> Template:
    try:
        return Template(fmt.replace("\\t", "\t").replace("\\n", "\n"))
    except TemplateError as exc:
        _fail(f"template parsing error: {exc}")


def _render(tpl: Template, data: Any) -> str:
    try:
        return tpl.execute(data)
    except TemplateError as exc:
        _fail(f"template: executing: {exc}")


def format_rows(fmt: str, rows: list[dict[str, Any]], headers: dict[str, str]) -> str:
    """docker's formatter: "table ..." gets a header row and tabwriter columns."""
    table = fmt.startswith("table")
    if table:
        fmt = fmt[len("table") :].lstrip()
    tpl = _template(fmt)
    lines = [_render(tpl, r) for r in rows]
    if not table:
        return "".join(line + "\n" for line in lines)
    head = _render(tpl, headers)
    text = "\n".join([head, *lines])
    return tabwrite(text.split("\n"))


# --------------------------------------------------------------------------- jsonmessage


def display_jsonmessages(messages: Iterable[dict[str, Any]], out: IO[str]) -> Any:
    """Print a jsonmessage stream the way docker does; raise on an ``error`` message.
    Returns the last ``aux`` value (import and build put the image ID there)."""
    from pallet.client import StreamError

    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    ids: dict[str, int] = {}
    aux = None
    for jm in messages:
        if not isinstance(jm, dict):
            continue
        if jm.get("errorDetail") or jm.get("error"):
            detail = jm.get("errorDetail") or {}
            raise StreamError(detail.get("message") or str(jm.get("error")))
        if "aux" in jm:
            aux = jm["aux"]
            continue
        has_progress = "progressDetail" in jm or bool(jm.get("progress"))
        progress = _progress_string(jm)
        diff = 0
        jid = jm.get("id") or ""
        if jid and has_progress:
            line = ids.get(jid)
            if line is None:
                line = len(ids)
                ids[jid] = line
                if tty:
                    out.write("\n")
            diff = len(ids) - line
            if tty and diff:
                out.write(f"\x1b[{diff}A")
        else:
            ids = {}
        endl = ""
        if tty and not jm.get("stream") and has_progress:
            out.write("\x1b[2K\r")
            endl = "\r"
        elif has_progress and progress:
            continue  # no progress bars when not on a terminal
        text = f"{jid}: " if jid else ""
        if has_progress and tty:
            text += f"{jm.get('status', '')} {progress}{endl}"
        elif jm.get("stream"):
            text += f"{jm['stream']}{endl}"
        else:
            text += f"{jm.get('status', '')}{endl}\n"
        out.write(text)
        if tty and jid and has_progress and diff:
            out.write(f"\x1b[{diff}B")
        out.flush()
    return aux


def _progress_string(jm: dict[str, Any]) -> str:
    if jm.get("progress"):
        return str(jm["progress"])
    detail = jm.get("progressDetail") or {}
    current, total = detail.get("current") or 0, detail.get("total") or 0
    if current <= 0 and total <= 0:
        return ""
    if total <= 0:
        return f"{human_size(current):>8}"
    pct = min(100, int(current * 100 / total))
    bar = "=" * (pct // 2) + (">" if pct < 100 else "") + " " * (50 - pct // 2 - 1)
    return f"[{bar[:50]}] {human_size(current):>8}/{human_size(total)}"


# --------------------------------------------------------------------------- references


def split_reference(ref: str) -> tuple[str, str]:
    """("repo", "tag") from "repo[:tag]"; a digest ("repo@sha256:...") goes in tag."""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        return name, digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, ""


def tagged_reference(ref: str) -> str:
    """The reference with ``:latest`` made explicit."""
    name, tag = split_reference(ref)
    if "@" in ref or tag:
        return ref
    return f"{name}:latest"


# --------------------------------------------------------------------------- containers


def _container_options(f: F) -> F:
    options = [
        click.option("--name", help="Assign a name to the container."),
        click.option(
            "-e", "--env", "env", multiple=True, metavar="LIST", help="Set environment variables."
        ),
        click.option(
            "--env-file",
            "env_files",
            multiple=True,
            type=click.Path(dir_okay=False),
            help="Read in a file of environment variables.",
        ),
        click.option("-w", "--workdir", help="Working directory inside the container."),
        click.option("--entrypoint", help="Overwrite the default ENTRYPOINT of the image."),
        click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open."),
        click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY."),
        click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>])."),
        click.option("--runtime", help="Runtime to use for this container."),
        click.option("-h", "--hostname", help="Container host name."),
        click.option(
            "-l", "--label", "labels", multiple=True, metavar="LIST", help="Set metadata."
        ),
        click.option("--network", help="Connect a container to a network."),
        click.option("--privileged", is_flag=True, help="Give extended privileges."),
        click.option("--rm", "auto_remove", is_flag=True, help="Remove the container on exit."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _parse_env_file(path: str) -> list[str]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise click.BadParameter(f"open {path}: {exc.strerror}", param_hint="--env-file") from None
    for n, raw in enumerate(lines, 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, _ = line.partition("=")
        if not key.strip() or (" " in key.strip() and not sep):
            raise click.BadParameter(
                f"variable '{key}' contains whitespaces ({path}:{n})", param_hint="--env-file"
            )
        if sep:
            out.append(line)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def _env_list(env: tuple[str, ...], env_files: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for path in env_files:
        out.extend(_parse_env_file(path))
    for item in env:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
        else:
            out.append(item)
    return out


def _labels(labels: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in labels:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def build_create_body(
    image: str,
    command: tuple[str, ...],
    *,
    detach: bool = False,
    env: tuple[str, ...] = (),
    env_files: tuple[str, ...] = (),
    workdir: str | None = None,
    entrypoint: str | None = None,
    interactive: bool = False,
    tty: bool = False,
    user: str | None = None,
    runtime: str | None = None,
    hostname: str | None = None,
    labels: tuple[str, ...] = (),
    network: str | None = None,
    privileged: bool = False,
    auto_remove: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """The body docker sends to ``POST /containers/create``."""
    attach = not detach
    host_config: dict[str, Any] = {"AutoRemove": auto_remove}
    if runtime:
        host_config["Runtime"] = runtime
    if network:
        host_config["NetworkMode"] = network
    if privileged:
        host_config["Privileged"] = True
    body: dict[str, Any] = {
        "Hostname": hostname or "",
        "Domainname": "",
        "User": user or "",
        "AttachStdin": attach and interactive,
        "AttachStdout": attach,
        "AttachStderr": attach,
        "Tty": tty,
        "OpenStdin": interactive,
        "StdinOnce": attach and interactive,
        "Env": _env_list(env, env_files),
        "Cmd": list(command) if command else None,
        "Image": image,
        "WorkingDir": workdir or "",
        "Entrypoint": [entrypoint] if entrypoint is not None else None,
        "Labels": _labels(labels),
        "HostConfig": host_config,
    }
    return body


_RUN_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def _run_error(msg: str, cmd: str = "run") -> None:
    _err(f"pallet: {msg}\nSee 'pallet {cmd} --help'.")


def _start_error_status(msg: str) -> int:
    """docker's runStartContainerErr: 127 command not found, 126 cannot execute."""
    if (
        "executable file not found" in msg
        or "no such file or directory" in msg
        or "system cannot find the file specified" in msg
    ):
        return 127
    if "permission denied" in msg or "is a directory" in msg:
        return 126
    return 125


def _pull(client: Client, ref: str, out: IO[str]) -> None:
    name, tag = split_reference(ref)
    if "@" in ref:
        params = {"fromImage": ref}
    else:
        params = {"fromImage": name, "tag": tag or "latest"}
    display_jsonmessages(client.stream_json("POST", "/images/create", params), out)


def _create(client: Client, body: dict[str, Any], name: str | None, cmd: str) -> str:
    """Create the container, pulling the image once if the daemon does not have it.
    Errors are reported docker-style and end the process with status 125."""
    from pallet.client import APIError, ClientError

    params = {"name": name} if name else None
    try:
        try:
            resp = client.post("/containers/create", params, body)
        except APIError as exc:
            if exc.status != 404 or "No such image" not in exc.message:
                raise
            _err(f"Unable to find image '{tagged_reference(body['Image'])}' locally")
            _pull(client, body["Image"], sys.stderr)
            resp = client.post("/containers/create", params, body)
    except ClientError as exc:
        _run_error(str(exc), cmd)
        sys.exit(125)
    for warning in (resp or {}).get("Warnings") or []:
        _err(f"WARNING: {warning}")
    return str(resp["Id"])


def _stdin_pump(conn: Hijacked) -> None:
    """Copy our stdin to the attach connection; half-close it when stdin ends."""
    read: Callable[[int], bytes]
    try:
        fd = sys.stdin.fileno()

        def read(n: int) -> bytes:
            return os.read(fd, n)

    except (AttributeError, ValueError, OSError):
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:
            conn.close_write()
            return
        read = getattr(buffer, "read1", None) or buffer.read
    try:
        while True:
            data = read(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close_write()


def _pump_output(conn: Hijacked, tty: bool) -> None:
    """Copy the attach stream to our stdout/stderr until the daemon closes it."""
    from pallet.streams import STDERR, STDOUT, FrameDecoder

    out = _binary(sys.stdout)
    err = _binary(sys.stderr)
    raw = tty and conn.multiplexed is not True
    decoder = FrameDecoder()
    while True:
        try:
            data = conn.recv(65536)
        except OSError:
            break
        if not data:
            break
        if raw:
            out.write(data)
            out.flush()
            continue
        for stream, payload in decoder.feed(data):
            target = out if stream == STDOUT else err if stream >= STDERR else None
            if target is not None:
                target.write(payload)
                target.flush()


def _binary(stream: IO[str]) -> IO[bytes]:
    buf = getattr(stream, "buffer", None)
    stream.flush()
    return buf if buf is not None else stream  # type: ignore[return-value]


class _SignalProxy:
    """docker's --sig-proxy: signals the CLI gets are sent to the container."""

    def __init__(self, client: Client, cid: str) -> None:
        import signal

        self.client = client
        self.cid = cid
        self.saved: dict[int, Any] = {}
        self.interrupts = 0
        for name in _RUN_SIGNALS:
            num = getattr(signal, name, None)
            if num is None:
                continue
            try:
                self.saved[num] = signal.signal(num, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import threading

        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 3:
                _err("got 3 interrupts, exiting without waiting for the container")
                os._exit(130)
        name = signal.Signals(signum).name

        def send() -> None:
            try:
                self.client.post(f"/containers/{self.cid}/kill", {"signal": name})
            except Exception:
                pass

        threading.Thread(target=send, daemon=True).start()

    def restore(self) -> None:
        import signal

        for num, handler in self.saved.items():
            try:
                signal.signal(num, handler)
            except (ValueError, OSError, TypeError):
                pass


def _attach_wait_start(
    client: Client,
    cid: str,
    *,
    stdin: bool,
    tty: bool,
    auto_remove: bool,
    sig_proxy: bool,
    cmd: str,
) -> int:
    """docker's sequence: attach (hijacked) -> wait (headers now, body at exit) -> start
    -> copy streams -> exit status from wait."""
    from pallet.client import APIError, ClientError

    params = {"stream": 1, "stdin": 1 if stdin else None, "stdout": 1, "stderr": 1}
    try:
        conn = client.hijack("POST", f"/containers/{cid}/attach", params)
    except ClientError as exc:
        _run_error(str(exc), cmd)
        return 125
    wait_resp: Response | None = None
    wait_error: str | None = None
    try:
        wait_resp = client.request(
            "POST",
            f"/containers/{cid}/wait",
            {"condition": "removed" if auto_remove else "next-exit"},
        )
    except ClientError as exc:
        wait_error = str(exc)
    try:
        with conn:
            try:
                client.post(f"/containers/{cid}/start")
            except ClientError as exc:
                conn.close()
                _run_error(str(exc), cmd)
                if auto_remove and wait_resp is not None:
                    # the daemon removes it; give it a moment, as docker waits for that
                    try:
                        wait_resp.sock.settimeout(10)
                        wait_resp.read()
                    except (OSError, ClientError):
                        pass
                msg = exc.message if isinstance(exc, APIError) else str(exc)
                return _start_error_status(msg)
            proxy = _SignalProxy(client, cid) if sig_proxy and not tty else None
            try:
                if stdin:
                    import threading

                    threading.Thread(target=_stdin_pump, args=(conn,), daemon=True).start()
                _pump_output(conn, tty)
            finally:
                if proxy is not None:
                    proxy.restore()
        if wait_resp is None:
            _err(f"Error waiting for container: {wait_error}")
            return 125
        try:
            result = wait_resp.json() or {}
        except (OSError, ClientError) as exc:
            _err(f"Error waiting for container: {exc}")
            return 125
        error = result.get("Error") or {}
        if error.get("Message"):
            _err(f"Error waiting for container: {error['Message']}")
            return 125
        return int(result.get("StatusCode", 125))
    finally:
        if wait_resp is not None:
            wait_resp.close()


@cli.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]},
    short_help="Create and run a new container from an image.",
)
@_container_options
@click.option("-d", "--detach", is_flag=True, help="Run in the background, print the ID.")
@click.option(
    "--sig-proxy/--no-sig-proxy",
    default=True,
    help="Proxy received signals to the process (non-TTY mode only).",
)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image: str, command: tuple[str, ...], **opts: Any) -> None:
    """Create and run a new container from an image."""
    client = _client()
    body = build_create_body(image, command, **opts)
    cid = _create(client, body, opts.get("name"), "run")
    if opts["detach"]:
        from pallet.client import ClientError

        try:
            client.post(f"/containers/{cid}/start")
        except ClientError as exc:
            _run_error(str(exc))
            msg = getattr(exc, "message", str(exc))
            sys.exit(_start_error_status(msg))
        click.echo(cid)
        return
    code = _attach_wait_start(
        client,
        cid,
        stdin=opts["interactive"],
        tty=opts["tty"],
        auto_remove=opts["auto_remove"],
        sig_proxy=opts["sig_proxy"],
        cmd="run",
    )
    sys.exit(code)


@cli.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]},
)
@_container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(image: str, command: tuple[str, ...], **opts: Any) -> None:
    """Create a new container."""
    client = _client()
    body = build_create_body(image, command, **opts)
    click.echo(_create(client, body, opts.get("name"), "create"))


def _each(names: Iterable[str], action: Callable[[str], Any], summary: str | None = None) -> None:
    """Apply ``action`` to each name, reporting errors as docker does (exit 1 at the end)."""
    failed = []
    for name in names:
        try:
            action(name)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            _err(str(exc))
            failed.append(name)
    if failed:
        if summary:
            _err(f"Error: {summary}: {', '.join(failed)}")
        sys.exit(1)


@cli.command(short_help="Start one or more stopped containers.")
@click.option("-a", "--attach", is_flag=True, help="Attach STDOUT/STDERR and forward signals.")
@click.option("-i", "--interactive", is_flag=True, help="Attach container's STDIN.")
@click.argument("containers", nargs=-1, required=True)
def start(attach: bool, interactive: bool, containers: tuple[str, ...]) -> None:
    """Start one or more stopped containers."""
    client = _client()
    if attach or interactive:
        if len(containers) > 1:
            _fail("Error: you cannot start and attach multiple containers at once")
        info = client.get(f"/containers/{containers[0]}/json")
        config = info.get("Config") or {}
        host_config = info.get("HostConfig") or {}
        code = _attach_wait_start(
            client,
            info.get("Id") or containers[0],
            stdin=interactive and bool(config.get("OpenStdin")),
            tty=bool(config.get("Tty")),
            auto_remove=bool(host_config.get("AutoRemove")),
            sig_proxy=True,
            cmd="start",
        )
        sys.exit(code)

    def do(name: str) -> None:
        client.post(f"/containers/{name}/start")
        click.echo(name)

    _each(containers, do, "failed to start containers")


@cli.command(short_help="Stop one or more running containers.")
@click.option(
    "-t", "--time", "--timeout", "timeout", type=int, help="Seconds to wait before killing it."
)
@click.option("-s", "--signal", "sig", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def stop(timeout: int | None, sig: str | None, containers: tuple[str, ...]) -> None:
    """Stop one or more running containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/stop", {"t": timeout, "signal": sig})
        click.echo(name)

    _each(containers, do)


@cli.command(short_help="Restart one or more containers.")
@click.option(
    "-t", "--time", "--timeout", "timeout", type=int, help="Seconds to wait before killing it."
)
@click.option("-s", "--signal", "sig", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def restart(timeout: int | None, sig: str | None, containers: tuple[str, ...]) -> None:
    """Restart one or more containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/restart", {"t": timeout, "signal": sig})
        click.echo(name)

    _each(containers, do)


@cli.command(short_help="Kill one or more running containers.")
@click.option("-s", "--signal", "sig", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def kill(sig: str | None, containers: tuple[str, ...]) -> None:
    """Kill one or more running containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/kill", {"signal": sig})
        click.echo(name)

    _each(containers, do)


@cli.command(short_help="Remove one or more containers.")
@click.option("-f", "--force", is_flag=True, help="Force the removal of a running container.")
@click.option("-v", "--volumes", is_flag=True, help="Remove anonymous volumes too.")
@click.argument("containers", nargs=-1, required=True)
def rm(force: bool, volumes: bool, containers: tuple[str, ...]) -> None:
    """Remove one or more containers."""
    client = _client()

    def do(name: str) -> None:
        client.delete(f"/containers/{name}", {"force": force or None, "v": volumes or None})
        click.echo(name)

    _each(containers, do)


def _filters(items: tuple[str, ...]) -> dict[str, list[str]] | None:
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(
                f"bad format of filter (expected name=value): {item}", param_hint="--filter"
            )
        out.setdefault(key.strip().lower(), []).append(value)
    return out


def _ports(ports: list[dict[str, Any]] | None) -> str:
    out = []
    seen = set()
    for p in sorted(
        ports or [],
        key=lambda p: (p.get("Type", ""), p.get("PrivatePort", 0), p.get("IP", "")),
    ):
        private = f"{p.get('PrivatePort')}/{p.get('Type', 'tcp')}"
        if p.get("PublicPort"):
            ip = p.get("IP") or ""
            if ":" in ip:
                ip = f"[{ip}]"
            text = f"{ip}:{p['PublicPort']}->{private}"
        else:
            text = private
        if text not in seen:
            seen.add(text)
            out.append(text)
    return ", ".join(out)


_PS_HEADERS = {
    "ID": "CONTAINER ID",
    "Image": "IMAGE",
    "Command": "COMMAND",
    "CreatedAt": "CREATED AT",
    "RunningFor": "CREATED",
    "Ports": "PORTS",
    "State": "STATE",
    "Status": "STATUS",
    "Size": "SIZE",
    "Names": "NAMES",
    "Labels": "LABELS",
    "Mounts": "MOUNTS",
    "Networks": "NETWORKS",
}
_PS_TABLE = (
    "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
)


def _local_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(ts))


def _container_row(c: dict[str, Any], trunc: bool, now: float) -> dict[str, Any]:
    command = c.get("Command") or ""
    created = c.get("Created") or 0
    names = [n[1:] if n.startswith("/") else n for n in c.get("Names") or []]
    image = c.get("Image") or ""
    if trunc and image.startswith("sha256:"):
        image = short_id(image)
    status = c.get("Status") or str(c.get("State") or "").capitalize()
    networks = ((c.get("NetworkSettings") or {}).get("Networks") or {}).keys()
    mounts = [m.get("Name") or m.get("Source") or "" for m in c.get("Mounts") or []]
    labels = c.get("Labels") or {}
    size = ""
    if "SizeRw" in c or "SizeRootFs" in c:
        size = human_size(c.get("SizeRw") or 0)
        if c.get("SizeRootFs"):
            size += f" (virtual {human_size(c['SizeRootFs'])})"
    return {
        "ID": short_id(c.get("Id") or "", trunc),
        "Image": image,
        "Command": go_quote(ellipsis(command, 20) if trunc else command),
        "CreatedAt": _local_time(created) if created else "",
        "RunningFor": human_duration(now - created) + " ago" if created else "",
        "Ports": _ports(c.get("Ports")),
        "State": c.get("State") or "",
        "Status": status,
        "Size": size,
        "Names": ",".join(names),
        "Labels": ",".join(f"{k}={v}" for k, v in labels.items()),
        "Mounts": ",".join(mounts),
        "Networks": ",".join(networks),
    }


@cli.command(short_help="List containers.")
@click.option("-a", "--all", "all_", is_flag=True, help="Show all containers.")
@click.option("-q", "--quiet", is_flag=True, help="Only display container IDs.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("-n", "--last", type=int, default=-1, help="Show n last created containers.")
@click.option("-l", "--latest", is_flag=True, help="Show the latest created container.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes.")
@click.option("--format", "fmt", help="Format output using a Go template (or 'table ...').")
def ps(
    all_: bool,
    quiet: bool,
    no_trunc: bool,
    filters: tuple[str, ...],
    last: int,
    latest: bool,
    size: bool,
    fmt: str | None,
) -> None:
    """List containers."""
    limit = 1 if latest else last
    params: dict[str, Any] = {
        "all": 1 if all_ or limit > 0 else None,
        "limit": limit if limit > 0 else None,
        "size": 1 if size else None,
        "filters": _filters(filters),
    }
    containers = _client().get("/containers/json", params) or []
    now = time.time()
    rows = [_container_row(c, not no_trunc, now) for c in containers]
    if quiet:
        fmt = "{{.ID}}"
    elif not fmt or fmt == "table":
        fmt = _PS_TABLE + ("\t{{.Size}}" if size else "")
    click.echo(format_rows(fmt, rows, _PS_HEADERS), nl=False)


def _since(value: str | None) -> str | None:
    """docker's timetypes.GetTimestamp: a duration ("10m", "1h30m") back from now, a
    Unix timestamp, or an RFC 3339 date/time."""
    if not value:
        return value
    import re

    try:
        float(value)
        return value
    except ValueError:
        pass
    unit = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value)
    if parts and "".join(a + b for a, b in parts) == value:
        seconds = sum(float(a) * unit[b] for a, b in parts)
        return f"{time.time() - seconds:.9f}"
    from datetime import datetime

    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"invalid value for time: {value!r} (use a duration such as 10m, a Unix "
            "timestamp or an RFC 3339 date)"
        ) from None
    return f"{dt.timestamp():.9f}"


@cli.command(short_help="Fetch the logs of a container.")
@click.option("-f", "--follow", is_flag=True, help="Follow log output.")
@click.option("-n", "--tail", default="all", help="Number of lines to show from the end.")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("--since", help="Logs since timestamp or relative (e.g. 42m).")
@click.option("--until", help="Logs before timestamp or relative (e.g. 42m).")
@click.argument("container")
def logs(
    follow: bool,
    tail: str,
    timestamps: bool,
    since: str | None,
    until: str | None,
    container: str,
) -> None:
    """Fetch the logs of a container."""
    from pallet.streams import STDOUT, FrameDecoder

    client = _client()
    info = client.get(f"/containers/{container}/json")
    tty = bool((info.get("Config") or {}).get("Tty"))
    params = {
        "stdout": 1,
        "stderr": 1,
        "follow": 1 if follow else None,
        "tail": tail,
        "timestamps": 1 if timestamps else None,
        "since": _since(since),
        "until": _since(until),
    }
    out, err = _binary(sys.stdout), _binary(sys.stderr)
    with client.request("GET", f"/containers/{container}/logs", params) as resp:
        ctype = resp.headers.get("content-type", "")
        raw = tty and "multiplexed" not in ctype
        decoder = FrameDecoder()
        try:
            for data in resp.iter_raw():
                if raw:
                    out.write(data)
                    out.flush()
                    continue
                for stream, payload in decoder.feed(data):
                    target = out if stream == STDOUT else err
                    target.write(payload)
                    target.flush()
        except KeyboardInterrupt:
            sys.exit(130)


@cli.command(short_help="Block until containers stop, then print their exit codes.")
@click.argument("containers", nargs=-1, required=True)
def wait(containers: tuple[str, ...]) -> None:
    """Block until one or more containers stop, then print their exit codes."""
    client = _client()

    def do(name: str) -> None:
        result = client.post(f"/containers/{name}/wait") or {}
        error = result.get("Error") or {}
        if error.get("Message"):
            from pallet.client import ClientError

            raise ClientError(error["Message"])
        click.echo(result.get("StatusCode"))

    _each(containers, do)


@cli.command(short_help="Return low-level information on objects.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
@click.option(
    "--type", "kind", type=click.Choice(["container", "image"]), help="Only this kind of object."
)
@click.option("-s", "--size", is_flag=True, help="Display total file sizes (containers).")
@click.argument("names", nargs=-1, required=True)
def inspect(fmt: str | None, kind: str | None, size: bool, names: tuple[str, ...]) -> None:
    """Return low-level information on containers and images."""
    from pallet.client import APIError

    client = _client()
    tpl = _template(fmt) if fmt else None
    results: list[Any] = []
    failed = False
    for name in names:
        obj = None
        last_error: APIError | None = None
        routes: list[tuple[str, dict[str, Any] | None]] = []
        if kind in (None, "container"):
            routes.append((f"/containers/{name}/json", {"size": 1 if size else None}))
        if kind in (None, "image"):
            routes.append((f"/images/{name}/json", None))
        for path, params in routes:
            try:
                obj = client.get(path, params)
                break
            except APIError as exc:
                if exc.status != 404:
                    raise
                last_error = exc
        if obj is None:
            failed = True
            if kind is None or last_error is None:
                _err(f"Error: No such object: {name}")
            else:
                _err(f"Error: No such {kind}: {name}")
            continue
        if tpl is not None:
            click.echo(_render(tpl, obj))
        else:
            results.append(obj)
    if tpl is None and (results or not failed):
        import json

        click.echo(json.dumps(results, indent=4, ensure_ascii=False))
    if failed:
        sys.exit(1)


# --------------------------------------------------------------------------- images

_IMAGES_HEADERS = {
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "ID": "IMAGE ID",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
    "Containers": "CONTAINERS",
}
_IMAGES_TABLE = "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"


def _image_rows(images: list[dict[str, Any]], trunc: bool, now: float) -> list[dict[str, Any]]:
    rows = []
    for img in images:
        created = img.get("Created") or 0
        base = {
            "ID": short_id(img.get("Id") or "", trunc),
            "CreatedSince": human_duration(now - created) + " ago" if created else "N/A",
            "CreatedAt": _local_time(created) if created else "",
            "Size": human_size(img.get("Size") or 0),
            "Containers": "N/A"
            if (img.get("Containers") is None or img.get("Containers", -1) < 0)
            else str(img["Containers"]),
        }
        digests = [d for d in img.get("RepoDigests") or [] if "@" in d]
        digest_of = {d.partition("@")[0]: d.partition("@")[2] for d in digests}
        tags = [t for t in img.get("RepoTags") or [] if t != "<none>:<none>"]
        if not tags:
            if digests:
                for d in digests:
                    repo, _, digest = d.partition("@")
                    rows.append({**base, "Repository": repo, "Tag": "<none>", "Digest": digest})
            else:
                rows.append({**base, "Repository": "<none>", "Tag": "<none>", "Digest": "<none>"})
            continue
        for t in tags:
            repo, tag = split_reference(t)
            rows.append(
                {
                    **base,
                    "Repository": repo,
                    "Tag": tag or "<none>",
                    "Digest": digest_of.get(repo, "<none>"),
                }
            )
    return rows


@cli.command(short_help="List images.")
@click.option("-a", "--all", "all_", is_flag=True, help="Show all images.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("--digests", is_flag=True, help="Show digests.")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("--format", "fmt", help="Format output using a Go template (or 'table ...').")
@click.argument("reference", required=False)
def images(
    all_: bool,
    quiet: bool,
    no_trunc: bool,
    digests: bool,
    filters: tuple[str, ...],
    fmt: str | None,
    reference: str | None,
) -> None:
    """List images."""
    filt = _filters(filters) or {}
    if reference:
        filt.setdefault("reference", []).append(reference)
    params = {"all": 1 if all_ else None, "filters": filt or None}
    found = _client().get("/images/json", params) or []
    rows = _image_rows(found, not no_trunc, time.time())
    if quiet:
        fmt = "{{.ID}}"
    elif not fmt or fmt == "table":
        fmt = _IMAGES_TABLE
        if digests:
            fmt = fmt.replace("{{.Tag}}\t", "{{.Tag}}\t{{.Digest}}\t")
    click.echo(format_rows(fmt, rows, _IMAGES_HEADERS), nl=False)


@cli.command("import", short_help="Import the contents from a tarball to create an image.")
@click.option(
    "-c", "--change", "changes", multiple=True, help="Apply Dockerfile instruction to the image."
)
@click.option("-m", "--message", help="Set commit message for imported image.")
@click.option("--platform", help="Set platform if server is multi-platform capable.")
@click.argument("source")
@click.argument("reference", required=False)
def import_(
    changes: tuple[str, ...],
    message: str | None,
    platform: str | None,
    source: str,
    reference: str | None,
) -> None:
    """Import the contents from a tarball to create a filesystem image."""
    params: dict[str, Any] = {"fromSrc": "-"}
    if reference:
        repo, tag = split_reference(reference)
        params["repo"] = repo
        params["tag"] = tag or None
    if message:
        params["message"] = message
    if changes:
        params["changes"] = list(changes)
    if platform:
        params["platform"] = platform
    body: Any
    fh: IO[bytes] | None = None
    if source == "-":
        body = sys.stdin.buffer
    elif "://" in source:
        params["fromSrc"] = source
        body = None
    else:
        try:
            fh = open(source, "rb")
        except OSError as exc:
            _fail(f"open {source}: {exc.strerror.lower() if exc.strerror else exc}")
        body = fh
    headers = {"Content-Type": "application/x-tar"} if body is not None else None
    try:
        display_jsonmessages(
            _client().stream_json("POST", "/images/create", params, body=body, headers=headers),
            sys.stdout,
        )
    finally:
        if fh is not None:
            fh.close()


@cli.command(short_help="Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE.")
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE."""
    repo, tag_ = split_reference(target)
    _client().post(f"/images/{source}/tag", {"repo": repo, "tag": tag_ or "latest"})


@cli.command(short_help="Remove one or more images.")
@click.option("-f", "--force", is_flag=True, help="Force removal of the image.")
@click.option("--no-prune", is_flag=True, help="Do not delete untagged parents.")
@click.argument("images", nargs=-1, required=True)
def rmi(force: bool, no_prune: bool, images: tuple[str, ...]) -> None:
    """Remove one or more images."""
    client = _client()

    def do(name: str) -> None:
        result = client.delete(
            f"/images/{name}", {"force": force or None, "noprune": no_prune or None}
        )
        for item in result or []:
            if item.get("Untagged"):
                click.echo(f"Untagged: {item['Untagged']}")
            if item.get("Deleted"):
                click.echo(f"Deleted: {item['Deleted']}")

    _each(images, do)


# --------------------------------------------------------------------------- system


def _kv(lines: list[str], indent: int, key: str, value: Any) -> None:
    if value is None or value == "":
        return
    if isinstance(value, bool):
        value = "true" if value else "false"
    lines.append(f"{' ' * indent}{key}: {value}")


def format_info(info: dict[str, Any], host: str) -> str:
    """``pallet info``: docker's layout, plus pallet's plugins and why some were skipped."""
    from pallet import __version__

    lines = ["Client:", f" Version:    {__version__}", f" Host:       {host}", "", "Server:"]
    _kv(lines, 1, "Containers", info.get("Containers"))
    _kv(lines, 2, "Running", info.get("ContainersRunning"))
    _kv(lines, 2, "Paused", info.get("ContainersPaused"))
    _kv(lines, 2, "Stopped", info.get("ContainersStopped"))
    _kv(lines, 1, "Images", info.get("Images"))
    _kv(lines, 1, "Server Version", info.get("ServerVersion"))
    _kv(lines, 1, "Storage Driver", info.get("Driver"))
    for pair in info.get("DriverStatus") or []:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            lines.append(f"  {pair[0]}: {pair[1]}")
    _kv(lines, 1, "Logging Driver", info.get("LoggingDriver"))
    _kv(lines, 1, "Cgroup Driver", info.get("CgroupDriver"))
    _kv(lines, 1, "Cgroup Version", info.get("CgroupVersion"))
    plugins = info.get("Plugins")
    if isinstance(plugins, dict) and plugins:
        lines.append(" Plugins:")
        for kind in ("Volume", "Network", "Authorization", "Log"):
            if plugins.get(kind):
                lines.append(f"  {kind}: {' '.join(plugins[kind])}")
    pallet_plugins = info.get("PalletPlugins")
    if isinstance(pallet_plugins, list) and pallet_plugins:
        lines.append(" Pallet Plugins:")
        width = max(len(str(p.get("Name", ""))) for p in pallet_plugins if isinstance(p, dict))
        for p in pallet_plugins:
            if not isinstance(p, dict):
                continue
            text = f"  {str(p.get('Name', '')).ljust(width)}  {p.get('State', '')}"
            if p.get("Reason"):
                text += f" ({p['Reason']})"
            lines.append(text)
    runtimes = info.get("Runtimes")
    if isinstance(runtimes, dict) and runtimes:
        _kv(lines, 1, "Runtimes", " ".join(sorted(runtimes)))
    _kv(lines, 1, "Default Runtime", info.get("DefaultRuntime"))
    sec = info.get("SecurityOptions")
    if sec:
        lines.append(" Security Options:")
        for opt in sec:
            parts = dict(kv.partition("=")[::2] for kv in str(opt).split(","))
            lines.append(f"  {parts.pop('name', opt)}")
            for k, v in parts.items():
                lines.append(f"   {k.capitalize()}: {v}")
    _kv(lines, 1, "Kernel Version", info.get("KernelVersion"))
    _kv(lines, 1, "Operating System", info.get("OperatingSystem"))
    _kv(lines, 1, "OSType", info.get("OSType"))
    _kv(lines, 1, "Architecture", info.get("Architecture"))
    _kv(lines, 1, "CPUs", info.get("NCPU"))
    if info.get("MemTotal"):
        _kv(lines, 1, "Total Memory", bytes_size(info["MemTotal"]))
    _kv(lines, 1, "Name", info.get("Name"))
    _kv(lines, 1, "ID", info.get("ID"))
    _kv(lines, 1, "Pallet Root Dir", info.get("DockerRootDir"))
    _kv(lines, 1, "Debug Mode", info.get("Debug"))
    _kv(lines, 1, "Experimental", info.get("ExperimentalBuild"))
    registries = (info.get("RegistryConfig") or {}).get("IndexConfigs") or {}
    insecure = [k for k, v in registries.items() if isinstance(v, dict) and not v.get("Secure")]
    insecure += (info.get("RegistryConfig") or {}).get("InsecureRegistryCIDRs") or []
    if insecure:
        lines.append(" Insecure Registries:")
        lines.extend(f"  {r}" for r in insecure)
    mirrors = (info.get("RegistryConfig") or {}).get("Mirrors") or []
    if mirrors:
        lines.append(" Registry Mirrors:")
        lines.extend(f"  {m}" for m in mirrors)
    _kv(lines, 1, "Live Restore Enabled", info.get("LiveRestoreEnabled"))
    for warning in info.get("Warnings") or []:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines) + "\n"


@cli.command(short_help="Display system-wide information.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
def info(fmt: str | None) -> None:
    """Display system-wide information."""
    client = _client()
    data = client.get("/info") or {}
    if fmt:
        click.echo(_render(_template(fmt), data))
        return
    click.echo(format_info(data, client.host), nl=False)


def format_version(server: dict[str, Any] | None, error: str | None = None) -> str:
    import platform

    from pallet import __version__
    from pallet.client import API_VERSION

    lines = [
        "Client:",
        f" Version:           {__version__}",
        f" API version:       {API_VERSION}",
        f" Python version:    {platform.python_version()}",
        f" OS/Arch:           {sys.platform}/{_arch(platform.machine())}",
    ]
    if server is not None:
        lines += ["", f"Server: {server.get('Platform', {}).get('Name', '') or 'pallet'}"]
        components = server.get("Components") or [
            {"Name": "Engine", "Version": server.get("Version"), "Details": server}
        ]
        for comp in components:
            details = comp.get("Details") or {}
            lines.append(f" {comp.get('Name')}:")
            lines.append(f"  {'Version:':<18} {comp.get('Version', '')}")
            if comp.get("Name") == "Engine":
                api = server.get("ApiVersion") or details.get("ApiVersion", "")
                minimum = server.get("MinAPIVersion") or details.get("MinAPIVersion", "")
                lines.append(f"  {'API version:':<18} {api} (minimum version {minimum})")
                details = {
                    k: v
                    for k, v in details.items()
                    if k not in ("ApiVersion", "MinAPIVersion", "Os", "Arch")
                }
                for key in ("GitCommit", "GoVersion", "BuildTime", "KernelVersion"):
                    value = server.get(key) or details.pop(key, None)
                    details.pop(key, None)
                    if value:
                        label = {
                            "GitCommit": "Git commit",
                            "GoVersion": "Python version",
                            "BuildTime": "Built",
                            "KernelVersion": "Kernel version",
                        }[key]
                        lines.append(f"  {label + ':':<18} {value}")
                os_arch = f"{server.get('Os', '')}/{server.get('Arch', '')}"
                lines.append(f"  {'OS/Arch:':<18} {os_arch}")
                if "Experimental" in server:
                    lines.append(f"  {'Experimental:':<18} {_go_str(server['Experimental'])}")
            for key, value in details.items():
                if isinstance(value, str | int | float | bool):
                    lines.append(f"  {key + ':':<18} {_go_str(value)}")
    out = "\n".join(lines) + "\n"
    return out


def _arch(machine: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@cli.command(short_help="Show the pallet version information.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
def version(fmt: str | None) -> None:
    """Show the pallet version information."""
    from pallet.client import ClientError

    client = _client()
    server: dict[str, Any] | None = None
    error: ClientError | None = None
    try:
        server = client.get("/version")
    except ClientError as exc:
        error = exc
    if fmt:
        import platform

        from pallet import __version__
        from pallet.client import API_VERSION

        data = {
            "Client": {
                "Version": __version__,
                "ApiVersion": API_VERSION,
                "Os": sys.platform,
                "Arch": _arch(platform.machine()),
            },
            "Server": server,
        }
        click.echo(_render(_template(fmt), data))
    else:
        click.echo(format_version(server), nl=False)
    if error is not None:
        _fail(str(error))


if __name__ == "__main__":
    main()

"""Output formatting as the docker CLI does it: go-units' human durations and sizes,
Go's tabwriter, a subset of Go's text/template, and the jsonmessage progress stream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from pallet.cli._common import _fail
from pallet.units import human_duration as human_duration  # re-exported for the commands

# --------------------------------------------------------------------------- formatting


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


def _local_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(ts))


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

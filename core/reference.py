"""Docker image references: parsing, normalisation and the familiar (short) form.

This follows ``github.com/distribution/reference`` (what the Docker daemon and CLI use):

- :func:`parse_normalized` is ``ParseNormalizedNamed``: ``busybox`` becomes
  ``docker.io/library/busybox``, ``me/app:1`` becomes ``docker.io/me/app:1``,
  ``localhost:5000/a/b:tag`` keeps its registry.
- :func:`parse_any` is ``ParseAnyReference``: a bare 64-hex string or
  ``sha256:<64 hex>`` is a digest (an image ID), anything else a normalised name.
- :meth:`Reference.familiar` is ``FamiliarString`` (``busybox:latest``,
  ``myreg:5000/x:y``); ``str(ref)`` the full form.

Errors are :class:`~pallet.errors.InvalidArgument` carrying Docker's messages
(``invalid reference format``, ``invalid reference format: repository name must be
lowercase``, ``invalid tag format``...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from pallet.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

# --- the grammar (distribution/reference regexp.go) --------------------------------
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_NAME = rf"(?:{_DOMAIN}/)?{_REMOTE_NAME}"

REFERENCE_RE = re.compile(rf"^({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?$")
ANCHORED_NAME_RE = re.compile(rf"^(?:({_DOMAIN})/)?({_REMOTE_NAME})$")
TAG_RE = re.compile(rf"^{_TAG}$")
IDENTIFIER_RE = re.compile(r"^[a-f0-9]{64}$")
SHORT_IDENTIFIER_RE = re.compile(r"^[a-f0-9]{1,64}$")

_DIGEST_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}

ERR_INVALID_FORMAT = "invalid reference format"
ERR_UPPERCASE = "invalid reference format: repository name must be lowercase"
ERR_NAME_EMPTY = "invalid reference format: repository name must have at least one component"
ERR_NAME_TOO_LONG = (
    f"invalid reference format: repository name must not be more than "
    f"{NAME_TOTAL_LENGTH_MAX} characters"
)
ERR_TAG_FORMAT = "invalid tag format"


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``domain`` is empty only for an un-normalised :func:`parse`."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository name, full form: ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def familiar_name(self) -> str:
        """``FamiliarName``: ``busybox``, ``me/app``, ``localhost:5000/a/b``."""
        if self.domain == DEFAULT_DOMAIN:
            path = self.path
            if path.startswith(OFFICIAL_REPO_PREFIX):
                rest = path[len(OFFICIAL_REPO_PREFIX) :]
                if "/" not in rest:
                    path = rest
            return path
        return self.name

    def familiar(self) -> str:
        """``FamiliarString``: the short form Docker shows (``busybox:latest``)."""
        return self.familiar_name() + self._suffix()

    def _suffix(self) -> str:
        out = ""
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out

    def __str__(self) -> str:
        return self.name + self._suffix()

    def with_tag(self, tag: str) -> Reference:
        if not TAG_RE.match(tag):
            raise InvalidArgument(ERR_TAG_FORMAT)
        return replace(self, tag=tag)

    def with_default_tag(self) -> Reference:
        """``TagNameOnly``: add ``:latest`` when the reference has neither tag nor digest."""
        if self.tag is None and self.digest is None:
            return replace(self, tag=DEFAULT_TAG)
        return self

    def repository(self) -> Reference:
        """The name alone, without tag or digest."""
        return Reference(self.domain, self.path)

    @property
    def is_canonical(self) -> bool:
        """Has a digest (``name@sha256:...``)."""
        return self.digest is not None


def validate_digest(digest: str) -> str:
    """Validate ``algorithm:hex`` like go-digest; returns it unchanged."""
    alg, sep, hexpart = digest.partition(":")
    if not sep or not alg or not hexpart:
        raise InvalidArgument("invalid checksum digest format")
    if alg not in _DIGEST_HEX_LEN:
        if not re.match(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*$", alg):
            raise InvalidArgument("invalid checksum digest format")
        raise InvalidArgument("unsupported digest algorithm")
    if len(hexpart) != _DIGEST_HEX_LEN[alg]:
        raise InvalidArgument("invalid checksum digest length")
    if not re.match(r"^[a-f0-9]+$", hexpart):
        raise InvalidArgument("invalid checksum digest format")
    return digest


def parse(s: str) -> Reference:
    """``reference.Parse``: the grammar only, no normalisation (``busybox`` has no domain)."""
    m = REFERENCE_RE.match(s)
    if m is None:
        if s == "":
            raise InvalidArgument(ERR_NAME_EMPTY)
        if REFERENCE_RE.match(s.lower()) is not None:
            raise InvalidArgument(ERR_UPPERCASE)
        raise InvalidArgument(ERR_INVALID_FORMAT)
    name, tag, digest = m.group(1), m.group(2), m.group(3)
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(ERR_NAME_TOO_LONG)
    nm = ANCHORED_NAME_RE.match(name)
    if nm is None:  # pragma: no cover - REFERENCE_RE already matched the same grammar
        raise InvalidArgument(ERR_INVALID_FORMAT)
    if digest is not None:
        validate_digest(digest)
    return Reference(nm.group(1) or "", nm.group(2), tag, digest)


def _split_docker_domain(name: str) -> tuple[str, str]:
    i = name.find("/")
    if i == -1 or (
        not any(c in name[:i] for c in ".:")
        and name[:i] != "localhost"
        and name[:i].lower() == name[:i]
    ):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = name[:i], name[i + 1 :]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_normalized(s: str) -> Reference:
    """``ParseNormalizedNamed``: a name as users type it, normalised to the full form.

    No default tag is added; use :meth:`Reference.with_default_tag` (``TagNameOnly``).
    """
    if IDENTIFIER_RE.match(s):
        raise InvalidArgument(
            f"invalid repository name ({s}), cannot specify 64-byte hexadecimal strings"
        )
    domain, remainder = _split_docker_domain(s)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        raise InvalidArgument(ERR_UPPERCASE)
    ref = parse(domain + "/" + remainder)
    if not ref.domain:  # pragma: no cover - a domain is always prepended
        raise InvalidArgument(ERR_INVALID_FORMAT)
    return ref


def parse_tagged(s: str) -> Reference:
    """:func:`parse_normalized` then ``TagNameOnly`` (``busybox`` -> ``busybox:latest``)."""
    return parse_normalized(s).with_default_tag()


def parse_any(s: str) -> Reference | str:
    """``ParseAnyReference``: a digest string (``sha256:<hex>``) for an image ID given in
    full (with or without ``sha256:``), otherwise a normalised :class:`Reference`."""
    if IDENTIFIER_RE.match(s):
        return "sha256:" + s
    if s.startswith("sha256:") and IDENTIFIER_RE.match(s[7:]):
        return s
    return parse_normalized(s)


def repo_tag_reference(repo: str, tag: str | None) -> Reference:
    """What ``POST /images/{name}/tag``, ``import`` and ``commit`` do with ``repo`` and
    ``tag``: a normalised name with a tag (``latest`` by default), never a digest."""
    ref = parse_normalized(repo)
    if ref.digest is not None:
        raise InvalidArgument("cannot import digest reference")
    if tag:
        ref = Reference(ref.domain, ref.path).with_tag(tag)
    ref = ref.with_default_tag()
    if ref.familiar_name() == "sha256":
        raise InvalidArgument("refusing to create an ambiguous tag using digest algorithm as name")
    return ref


def familiar(s: str) -> str:
    """The familiar form of a full reference string (``docker.io/library/x:1`` -> ``x:1``)."""
    return parse_normalized(s).familiar()


def short_id(image_id: str) -> str:
    """``stringid.TruncateID``: 12 hex characters without the algorithm."""
    return image_id.split(":", 1)[-1][:12]


def _match_pattern(pattern: str) -> re.Pattern[str]:
    """Go's ``path.Match`` as a regular expression (``*`` and ``?`` never match ``/``)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = pattern.find("]", i + 2 if i + 1 < n and pattern[i + 1] == "^" else i + 1)
            if j == -1:
                raise InvalidArgument(f"syntax error in pattern {pattern!r}")
            body = pattern[i + 1 : j]
            neg = body.startswith("^")
            if neg:
                body = body[1:]
            body = body.replace("\\", "\\\\")
            out.append(f"[{'^/' if neg else ''}{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def familiar_match(pattern: str, ref: Reference) -> bool:
    """``reference.FamiliarMatch``: ``pattern`` against the familiar string, then name."""
    rx = _match_pattern(pattern)
    return bool(rx.match(ref.familiar()) or rx.match(ref.familiar_name()))

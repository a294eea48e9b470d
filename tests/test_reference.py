"""pallet.reference: Docker's reference grammar, normalisation and familiar form."""

from __future__ import annotations

import pytest
from pallet import reference
from pallet.errors import InvalidArgument

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("given", "full", "familiar"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("me/app:v1", "docker.io/me/app:v1", "me/app:v1"),
        ("docker.io/library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest"),
        ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("myreg:5000/x:y", "myreg:5000/x:y", "myreg:5000/x:y"),
        (
            "reg.example.com/team/app",
            "reg.example.com/team/app:latest",
            "reg.example.com/team/app:latest",
        ),
        ("Reg.Example.com/app", "Reg.Example.com/app:latest", "Reg.Example.com/app:latest"),
        ("[::1]:5000/app", "[::1]:5000/app:latest", "[::1]:5000/app:latest"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}", f"busybox@{DIGEST}"),
        (f"busybox:1@{DIGEST}", f"docker.io/library/busybox:1@{DIGEST}", f"busybox:1@{DIGEST}"),
        ("a_b.c-d__e---f", "docker.io/library/a_b.c-d__e---f:latest", "a_b.c-d__e---f:latest"),
    ],
)
def test_normalise(given: str, full: str, familiar: str) -> None:
    ref = reference.parse_tagged(given)
    assert str(ref) == full
    assert ref.familiar() == familiar
    assert reference.familiar(full) == familiar


def test_parts() -> None:
    ref = reference.parse_normalized("localhost:5000/a/b:tag")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "a/b", "tag", None)
    assert ref.name == "localhost:5000/a/b"
    assert ref.familiar_name() == "localhost:5000/a/b"
    ref = reference.parse_normalized(f"busybox@{DIGEST}")
    assert ref.is_canonical and ref.tag is None and ref.digest == DIGEST
    assert reference.parse_normalized("busybox").tag is None
    assert reference.parse("busybox").domain == ""


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "invalid reference format"),
        ("Busybox", "invalid reference format: repository name must be lowercase"),
        ("me/App:1", "invalid reference format: repository name must be lowercase"),
        ("busybox:", "invalid reference format"),
        ("busybox::1", "invalid reference format"),
        ("-busybox", "invalid reference format"),
        ("busybox-", "invalid reference format"),
        ("a//b", "invalid reference format"),
        ("busybox:" + "t" * 129, "invalid reference format"),
        ("busybox:bad!tag", "invalid reference format"),
        ("busybox@sha256:short", "invalid reference format"),
        ("busybox@sha256:" + "A" * 64, "invalid checksum digest format"),
        ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("busybox@sha256:" + "a" * 65, "invalid checksum digest length"),
        ("a" * 64, "cannot specify 64-byte hexadecimal strings"),
        ("x/" * 128 + "y", "must not be more than 255 characters"),
        ("has space", "invalid reference format"),
    ],
)
def test_invalid(bad: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        reference.parse_normalized(bad)
    assert message in e.value.message


def test_parse_any() -> None:
    assert reference.parse_any("a" * 64) == "sha256:" + "a" * 64
    assert reference.parse_any("sha256:" + "b" * 64) == "sha256:" + "b" * 64
    ref = reference.parse_any("abc123")
    assert isinstance(ref, reference.Reference) and str(ref) == "docker.io/library/abc123"


def test_repo_tag_reference() -> None:
    assert str(reference.repo_tag_reference("busybox", None)) == "docker.io/library/busybox:latest"
    assert str(reference.repo_tag_reference("busybox", "2")) == "docker.io/library/busybox:2"
    assert str(reference.repo_tag_reference("busybox:1", "2")) == "docker.io/library/busybox:2"
    assert str(reference.repo_tag_reference("busybox:1", None)) == "docker.io/library/busybox:1"
    with pytest.raises(InvalidArgument, match="invalid tag format"):
        reference.repo_tag_reference("busybox", "bad tag")
    with pytest.raises(InvalidArgument, match="cannot import digest reference"):
        reference.repo_tag_reference(f"busybox@{DIGEST}", None)
    with pytest.raises(InvalidArgument, match="ambiguous tag"):
        reference.repo_tag_reference("sha256", "x")


def test_short_id() -> None:
    assert reference.short_id("sha256:" + "0123456789ab" + "f" * 52) == "0123456789ab"


@pytest.mark.parametrize(
    ("pattern", "ref", "matches"),
    [
        ("busybox", "busybox:latest", True),
        ("busybox:*", "busybox:1.36", True),
        ("busy*", "busybox:latest", True),
        ("*", "me/app:1", False),  # '*' does not cross '/'
        ("*/*", "me/app:1", True),
        ("me/app:v?", "me/app:v1", True),
        ("me/app:[a-c]*", "me/app:b2", True),
        ("me/app:[^a-c]*", "me/app:b2", False),
        ("localhost:5000/*", "localhost:5000/x:1", True),
        ("other", "busybox:latest", False),
    ],
)
def test_familiar_match(pattern: str, ref: str, matches: bool) -> None:
    assert reference.familiar_match(pattern, reference.parse_tagged(ref)) is matches

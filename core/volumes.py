"""Volumes and a container's mounts: named volumes (the ``local`` driver: a directory
``<data-root>/volumes/<name>/_data``), bind mounts, tmpfs mounts.

- ``-v name:/path``, ``-v /path`` (anonymous) and ``--mount type=volume`` create the
  volume on demand at container create; at start a volume still empty gets the image's
  content at that path copied in (unless ``nocopy``), as Docker does.
- ``-v /host:/ctr[:ro]`` creates a missing host directory (Docker's ``-v``);
  ``--mount type=bind`` refuses a missing source.
- The container's record keeps the resolved mounts in Docker's inspect form
  (``Mounts``); which containers use a volume is read from there.
- Volume records live in SQLite; the directory is made before the row commits and
  removed after it is deleted, so a crash leaves at worst an orphan directory, which
  :meth:`Volumes.cleanup` removes at start.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.errors import Conflict, InvalidArgument, NotFound
from pallet.store import Store

if TYPE_CHECKING:
    from pallet.spec import Mount

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
ANONYMOUS_LABEL = "com.docker.volume.anonymous"
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS volumes (
        name TEXT PRIMARY KEY, created TEXT NOT NULL, doc TEXT NOT NULL)""",
]
_PROPAGATIONS = {"shared", "rshared", "slave", "rslave", "private", "rprivate"}
_MODES = {"ro", "rw", "z", "Z", "nocopy", *_PROPAGATIONS}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _vol_spec_error(spec: str, why: str = "") -> InvalidArgument:
    return InvalidArgument(f"invalid volume specification: '{spec}'" + (f": {why}" if why else ""))


class MountPoint:
    """One resolved mount of a container (what inspect's ``Mounts`` shows, plus how to
    mount it)."""

    def __init__(
        self,
        kind: str,
        destination: str,
        *,
        source: str = "",
        name: str = "",
        rw: bool = True,
        mode: str = "",
        propagation: str = "",
        nocopy: bool = False,
        tmpfs_options: list[str] | None = None,
    ) -> None:
        self.kind = kind
        self.destination = destination
        self.source = source
        self.name = name
        self.rw = rw
        self.mode = mode
        self.propagation = propagation
        self.nocopy = nocopy
        self.tmpfs_options = tmpfs_options or []

    def inspect(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"Type": self.kind}
        if self.kind == "volume":
            doc["Name"] = self.name
        doc.update(Source=self.source, Destination=self.destination)
        if self.kind == "volume":
            doc["Driver"] = "local"
        doc.update(Mode=self.mode, RW=self.rw, Propagation=self.propagation)
        return doc


def parse_bind(spec: str) -> MountPoint:
    """``-v`` / ``Binds``: ``src:dst[:mode]`` or ``dst`` (anonymous volume)."""
    parts = spec.split(":")
    if len(parts) == 1:
        src, dst, mode = "", parts[0], ""
    elif len(parts) == 2:
        src, dst, mode = parts[0], parts[1], ""
    elif len(parts) == 3:
        src, dst, mode = parts
    else:
        raise _vol_spec_error(spec)
    if not dst:
        raise _vol_spec_error(spec)
    if not dst.startswith("/"):
        raise _vol_spec_error(
            spec,
            f'invalid mount config for type "{"bind" if src.startswith("/") else "volume"}": '
            f"invalid mount path: '{dst}' mount path must be absolute",
        )
    if os.path.normpath(dst) == "/":
        raise InvalidArgument("invalid specification: destination can't be '/'")
    modes = [m for m in mode.split(",") if m]
    for m in modes:
        if m not in _MODES:
            raise InvalidArgument(f"invalid mode: {mode}")
    if "ro" in modes and "rw" in modes:
        raise InvalidArgument(f"invalid mode: {mode}")
    rw = "ro" not in modes
    propagation = next((m for m in modes if m in _PROPAGATIONS), "")
    dst = os.path.normpath(dst)
    if src.startswith("/"):
        if "nocopy" in modes:
            raise InvalidArgument(f"invalid mode: {mode}")
        return MountPoint(
            "bind",
            dst,
            source=os.path.normpath(src),
            rw=rw,
            mode=mode,
            propagation=propagation or "rprivate",
        )
    if src and not NAME_RE.match(src):
        raise InvalidArgument(
            f'create {src}: "{src}" includes invalid characters for a local volume name, only '
            '"[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you intended to pass a host directory, '
            "use absolute path"
        )
    if propagation:
        raise InvalidArgument(f"invalid mode: {mode}")
    return MountPoint("volume", dst, name=src, rw=rw, mode=mode, nocopy="nocopy" in modes)


def parse_api_mount(m: dict[str, Any]) -> MountPoint:
    """``--mount`` / ``HostConfig.Mounts`` (Docker's mount.Mount)."""
    kind = str(m.get("Type") or "")
    target = str(m.get("Target") or "")
    source = str(m.get("Source") or "")
    where = f'invalid mount config for type "{kind}"'
    if kind not in ("bind", "volume", "tmpfs"):
        raise InvalidArgument(f'invalid mount config: mount type unknown: "{kind}"')
    if not target:
        raise InvalidArgument(f"{where}: field Target must not be empty")
    if not target.startswith("/"):
        raise InvalidArgument(
            f"{where}: invalid mount path: '{target}' mount path must be absolute"
        )
    target = os.path.normpath(target)
    rw = not m.get("ReadOnly")
    if kind == "bind":
        if not source:
            raise InvalidArgument(f"{where}: field Source must not be empty")
        if not source.startswith("/"):
            raise InvalidArgument(
                f"{where}: invalid mount path: '{source}' mount path must be absolute"
            )
        if not os.path.exists(source):
            raise InvalidArgument(f"{where}: bind source path does not exist: {source}")
        prop = str((m.get("BindOptions") or {}).get("Propagation") or "rprivate")
        if prop not in _PROPAGATIONS:
            raise InvalidArgument(f"{where}: invalid propagation mode: {prop}")
        return MountPoint("bind", target, source=os.path.normpath(source), rw=rw, propagation=prop)
    if kind == "volume":
        if source and not NAME_RE.match(source):
            raise InvalidArgument(
                f'{where}: invalid volume name "{source}": only "[a-zA-Z0-9][a-zA-Z0-9_.-]" '
                "are allowed"
            )
        nocopy = bool((m.get("VolumeOptions") or {}).get("NoCopy"))
        return MountPoint("volume", target, name=source, rw=rw, mode="z", nocopy=nocopy)
    if source:
        raise InvalidArgument(f"{where}: field Source must not be specified")
    opts = []
    t = m.get("TmpfsOptions") or {}
    if t.get("SizeBytes"):
        opts.append(f"size={int(t['SizeBytes'])}")
    if t.get("Mode"):
        opts.append(f"mode={int(t['Mode']):o}")
    if not rw:
        opts.append("ro")
    return MountPoint("tmpfs", target, rw=rw, tmpfs_options=opts)


def parse_container_mounts(
    host_config: dict[str, Any], config_volumes: dict[str, Any] | None
) -> list[MountPoint]:
    """Every mount a container asks for, checked (duplicates refused as Docker does)."""
    found: list[MountPoint] = []
    for spec in host_config.get("Binds") or []:
        found.append(parse_bind(spec))
    for m in host_config.get("Mounts") or []:
        found.append(parse_api_mount(m))
    seen: set[str] = set()
    for mp in found:
        if mp.destination in seen:
            raise InvalidArgument(f"Duplicate mount point: {mp.destination}")
        seen.add(mp.destination)
    for target in config_volumes or {}:
        dst = os.path.normpath(target)
        if not target.startswith("/"):
            raise InvalidArgument(
                f"invalid volume specification: '{target}': invalid mount config for type "
                f"\"volume\": invalid mount path: '{target}' mount path must be absolute"
            )
        if dst not in seen:  # anonymous, unless a bind or named volume covers it
            found.append(MountPoint("volume", dst, mode=""))
            seen.add(dst)
    for target in host_config.get("Tmpfs") or {}:
        if os.path.normpath(target) in seen:
            raise InvalidArgument(f"Duplicate mount point: {os.path.normpath(target)}")
    return found


class Volumes:
    """The volume service (the ``local`` driver)."""

    def __init__(self, data_root: Path, containers: Any = None) -> None:
        self.root = data_root / "volumes"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o701)
        self.store = Store(self.root / "metadata.db", SCHEMA)
        self.containers = containers  # pallet.containers.Containers, for usage

    # --- records ---------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.root / name / "_data"

    def _doc(self, name: str) -> dict[str, Any] | None:
        row = self.store.one("SELECT doc FROM volumes WHERE name = ?", (name,))
        return json.loads(row["doc"]) if row else None

    def cleanup(self) -> None:
        """Directories without a record (a crash between mkdir and commit)."""
        known = {r["name"] for r in self.store.query("SELECT name FROM volumes")}
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)

    def create(
        self,
        name: str | None = None,
        driver: str = "local",
        labels: dict[str, str] | None = None,
        options: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create (or return the existing) volume, as ``POST /volumes/create``."""
        if driver not in ("", "local"):
            raise NotFound(f'error looking up volume plugin {driver}: plugin "{driver}" not found')
        check_local_options(options or {})
        anonymous = not name
        if not name:
            name = secrets.token_hex(32)
        if not NAME_RE.match(name):
            raise InvalidArgument(
                f'create {name}: "{name}" includes invalid characters for a local volume name, '
                'only "[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you intended to pass a host '
                "directory, use absolute path"
            )
        existing = self._doc(name)
        if existing is not None:
            return existing
        labels = dict(labels or {})
        if anonymous:
            labels[ANONYMOUS_LABEL] = ""
        doc = {
            "CreatedAt": _now(),
            "Driver": "local",
            "Labels": labels,
            "Mountpoint": str(self.path(name)),
            "Name": name,
            "Options": options or None,
            "Scope": "local",
        }
        self.path(name).mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            with self.store.transaction() as db:
                db.execute(
                    "INSERT OR IGNORE INTO volumes (name, created, doc) VALUES (?,?,?)",
                    (name, doc["CreatedAt"], json.dumps(doc)),
                )
        except BaseException:
            shutil.rmtree(self.root / name, ignore_errors=True)
            raise
        return self._doc(name) or doc

    def get(self, name: str) -> dict[str, Any]:
        doc = self._doc(name)
        if doc is None:
            raise NotFound(f"get {name}: no such volume")
        return doc

    def users(self, name: str) -> list[str]:
        if self.containers is None:
            return []
        return [
            c.id
            for c in self.containers.by_id.values()
            if any(m.get("Type") == "volume" and m.get("Name") == name for m in c.doc["Mounts"])
        ]

    def list_volumes(self, filters: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
        out = []
        for row in self.store.query("SELECT doc FROM volumes ORDER BY name"):
            doc = json.loads(row["doc"])
            if self._matches(doc, filters or {}):
                out.append(doc)
        return out

    def _matches(self, doc: dict[str, Any], filters: dict[str, list[str]]) -> bool:
        for key, values in filters.items():
            if key == "name":
                if not any(v in doc["Name"] for v in values):
                    return False
            elif key == "driver":
                if doc["Driver"] not in values:
                    return False
            elif key == "label":
                labels = doc.get("Labels") or {}
                for v in values:
                    k, sep, val = v.partition("=")
                    if k not in labels or (sep and labels[k] != val):
                        return False
            elif key == "dangling":
                want = values[-1].lower() in ("1", "true")
                if bool(self.users(doc["Name"])) == want:
                    return False
            elif key == "all":
                continue
            else:
                raise InvalidArgument(f"invalid filter '{key}'")
        return True

    def remove(self, name: str, force: bool = False) -> None:
        doc = self._doc(name)
        if doc is None:
            if force:
                return
            raise NotFound(f"get {name}: no such volume")
        users = self.users(name)
        if users:
            raise Conflict(f"remove {name}: volume is in use - [{', '.join(users)}]")
        from pallet.mount import is_mountpoint, unmount

        if is_mountpoint(str(self.path(name))):
            unmount(str(self.path(name)))
        self.store.execute("DELETE FROM volumes WHERE name = ?", (name,))
        shutil.rmtree(self.root / name, ignore_errors=True)

    def prune(self, filters: dict[str, list[str]]) -> dict[str, Any]:
        """Unused volumes; only anonymous ones unless ``all=true`` (API >= 1.42)."""
        everything = (filters.get("all") or ["false"])[-1].lower() in ("1", "true")
        rest = {k: v for k, v in filters.items() if k != "all"}
        deleted, reclaimed = [], 0
        for doc in self.list_volumes(rest):
            if not everything and ANONYMOUS_LABEL not in (doc.get("Labels") or {}):
                continue
            if self.users(doc["Name"]):
                continue
            reclaimed += _du(self.path(doc["Name"]))
            self.remove(doc["Name"])
            deleted.append(doc["Name"])
        return {"VolumesDeleted": deleted or None, "SpaceReclaimed": reclaimed}

    def usage(self, name: str) -> dict[str, int]:
        return {"Size": _du(self.path(name)), "RefCount": len(self.users(name))}

    # --- containers --------------------------------------------------------------------

    def setup_container(
        self, host_config: dict[str, Any], config_volumes: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """At create: check every mount, create host dirs for ``-v`` binds and the named
        or anonymous volumes; returns inspect's ``Mounts``. Volumes it created are removed
        again if a later one fails."""
        points = parse_container_mounts(host_config, config_volumes)
        made: list[str] = []
        try:
            for mp in points:
                if mp.kind == "bind" and not os.path.exists(mp.source):
                    os.makedirs(mp.source, 0o755, exist_ok=True)  # docker -v creates it
                elif mp.kind == "volume":
                    existed = bool(mp.name) and self._doc(mp.name) is not None
                    doc = self.create(mp.name or None)
                    if not existed:
                        made.append(doc["Name"])
                    mp.name, mp.source = doc["Name"], doc["Mountpoint"]
        except BaseException:
            for name in made:
                self.store.execute("DELETE FROM volumes WHERE name = ?", (name,))
                shutil.rmtree(self.root / name, ignore_errors=True)
            raise
        out = []
        for mp in points:
            doc = mp.inspect()
            if mp.nocopy:
                doc["_NoCopy"] = True
            out.append(doc)
        return out

    def container_mounts(
        self, mounts: list[dict[str, Any]], host_config: dict[str, Any], rootfs: Path
    ) -> list[Mount]:
        """At start: OCI mounts for inspect's ``Mounts`` (and ``--mount type=tmpfs``);
        empty volumes get the image's content at their path first."""
        from pallet.spec import Mount

        out: list[Mount] = tmpfs_mounts(host_config)
        for m in mounts:
            dst = str(m["Destination"])
            if m["Type"] == "tmpfs":
                continue
            src = str(m["Source"])
            if m["Type"] == "volume":
                doc = self._doc(str(m["Name"]))
                if doc is None:
                    raise NotFound(f"get {m['Name']}: no such volume")
                self.mount_volume(doc)
                if not m.get("_NoCopy"):
                    copy_image_content(rootfs, dst, Path(src))
            elif not os.path.exists(src):
                raise InvalidArgument(
                    f'error while creating mount source path "{src}": the path is gone'
                )
            opts = ["rbind", "rw" if m["RW"] else "ro"]
            opts.append(str(m.get("Propagation") or "rprivate"))
            out.append(Mount(destination=dst, type="bind", source=src, options=opts))
        return out

    # --- volumes with mount options (-o type= device= o=) ---------------------------------

    def mount_volume(self, doc: dict[str, Any]) -> None:
        """Mount a volume that has options on its directory, once (the first user)."""
        from pallet import linux
        from pallet.mount import is_mountpoint

        opts = doc.get("Options") or {}
        if not opts.get("type"):
            return
        path = self.path(doc["Name"])
        if is_mountpoint(str(path)):
            return
        flags, data = _mount_options(str(opts.get("o") or ""))
        kind = str(opts["type"])
        device = str(opts["device"])
        if kind == "none" or "bind" in str(opts.get("o") or "").split(","):
            kind, flags = "", flags | linux.MS_BIND
        try:
            linux.mount(device, str(path), kind or None, flags, data or None)
        except OSError as e:
            raise InvalidArgument(
                f"error while mounting volume '{path}': failed to mount local volume: "
                f"mount {device}:{path}, data: {data}: {(e.strerror or str(e)).lower()}"
            ) from None

    def unmount_unused(self, mounts: list[dict[str, Any]] | None = None) -> None:
        """Unmount volumes with options that no running container uses (``mounts``: only
        those; None: all)."""
        from pallet.mount import is_mountpoint, unmount

        names = (
            {str(m.get("Name")) for m in mounts if m.get("Type") == "volume"}
            if mounts is not None
            else {r["name"] for r in self.store.query("SELECT name FROM volumes")}
        )
        running = set()
        if self.containers is not None:
            for c in self.containers.by_id.values():
                if c.running:
                    running |= {
                        str(m.get("Name")) for m in c.doc["Mounts"] if m.get("Type") == "volume"
                    }
        for name in names - running:
            path = self.path(name)
            if path.exists() and is_mountpoint(str(path)):
                unmount(str(path))

    def release(self, mounts: list[dict[str, Any]], remove_anonymous: bool) -> None:
        """After the container is removed: its anonymous volumes go with ``rm -v``."""
        if not remove_anonymous:
            return
        for m in mounts:
            if m.get("Type") != "volume":
                continue
            doc = self._doc(str(m.get("Name")))
            if doc and ANONYMOUS_LABEL in (doc.get("Labels") or {}) and not self.users(doc["Name"]):
                self.remove(doc["Name"])

    def close(self) -> None:
        self.store.close()


LOCAL_OPTIONS = {"type", "device", "o"}


def check_local_options(options: dict[str, str]) -> None:
    """The local driver's ``-o type=... -o device=... -o o=...`` (mount(8)'s -t, device
    and -o), checked as Docker's local driver does."""
    unknown = sorted(set(options) - LOCAL_OPTIONS)
    if unknown:
        raise InvalidArgument(f"invalid option: {unknown[0]!r}")
    if options.get("type") and not options.get("device"):
        raise InvalidArgument('missing required option: "device"')
    if options.get("device") and not options.get("type"):
        raise InvalidArgument('missing required option: "type"')


def _mount_options(text: str) -> tuple[int, str]:
    from pallet.mount import split_options

    return split_options([o for o in text.split(",") if o])


def tmpfs_mounts(host_config: dict[str, Any]) -> list[Mount]:
    """``--mount type=tmpfs`` entries as OCI mounts."""
    from pallet.spec import Mount

    out = []
    for m in host_config.get("Mounts") or []:
        if m.get("Type") == "tmpfs":
            mp = parse_api_mount(m)
            out.append(
                Mount(
                    destination=mp.destination,
                    type="tmpfs",
                    source="tmpfs",
                    options=["nosuid", "nodev", "noexec", *mp.tmpfs_options],
                )
            )
    return out


def copy_image_content(rootfs: Path, path: str, volume: Path) -> None:
    """Docker's copy-up: the image's files at ``path`` into an empty volume (owners,
    modes, links kept), resolving ``path`` inside the rootfs only."""
    from pallet.archive import open_dir_in_root

    if any(volume.iterdir()):
        return
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = open_dir_in_root(root_fd, path.lstrip("/"))
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            src = f"/proc/self/fd/{fd}"
            st = os.fstat(fd)
            if any(os.scandir(src)):
                subprocess.run(
                    ["cp", "-a", "--", f"{src}/.", str(volume)],
                    check=True,
                    capture_output=True,
                    pass_fds=(fd,),
                )
            os.chown(volume, st.st_uid, st.st_gid)
            os.chmod(volume, st.st_mode & 0o7777)
        except subprocess.CalledProcessError as e:
            raise InvalidArgument(
                f"copying the image's content of {path} into the volume: "
                f"{e.stderr.decode(errors='replace').strip()}"
            ) from None
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                continue
    return total

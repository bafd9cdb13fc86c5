"""One filesystem view of the lakehouse root: a local folder or Azure Blob (az://).

Everything that touches lakehouse storage goes through `Lakehouse`, so the commit protocol
(create-only writes, listing committed batches) is the same for both backends.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from tasks.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 4 << 20


class StorageError(UserError, RuntimeError):
    """Storage could not be reached or refused the request; the message says what to do."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        # Wrong credentials or a missing container will not heal by waiting: fail fast.
        self.retryable = retryable


class Lakehouse:
    """A lakehouse root. Paths given to methods are relative to the root ("bronze/x/...")."""

    def __init__(
        self,
        root: str,
        fs: fsspec.AbstractFileSystem,
        base: str,
        storage_options: dict[str, str] | None = None,
    ):
        self.root = root
        self.fs = fs
        self.base = base.rstrip("/")
        self.is_local = not root.startswith("az://")
        # delta-rs options for the same credentials (Azure); never logged or passed on.
        self.storage_options = dict(storage_options or {})

    def table_uri(self, rel: str) -> str:
        """URI of a Delta table under the root: a local path, or az://container/path."""
        return self.path(rel) if self.is_local else f"az://{self.path(rel)}"

    def __repr__(self) -> str:  # no credentials in reprs (tracebacks, logs)
        return f"Lakehouse({self.root!r})"

    # -- naming -----------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Filesystem path (no scheme) of `rel`."""
        rel = rel.strip("/")
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, rel: str = "") -> str:
        """Full URI of `rel`, as users see it."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def rel(self, path: str) -> str:
        """Relative path from a filesystem path or URI under this root."""
        p = path.split("://", 1)[1] if "://" in path else path
        if self.is_local:
            p = str(Path(p).resolve())
        if not p.startswith(self.base):
            raise ValueError(f"{path} is not under the lakehouse root {self.root}")
        return p[len(self.base) :].strip("/")

    # -- reads ------------------------------------------------------------------------------
    def _fresh(self) -> None:
        # adlfs caches listings per instance (and ignores `refresh=`): another process's commit
        # would stay invisible to a long-lived run, so every listing reads the service again.
        if not self.is_local:
            self.fs.invalidate_cache()

    def exists(self, rel: str) -> bool:
        self._fresh()
        return self._call(self.fs.exists, self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self._call(self.fs.cat_file, self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`; empty when it does not exist."""
        p = self.path(rel)
        self._fresh()
        try:
            entries = self._call(self.fs.ls, p, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def info(self, rel: str) -> dict[str, Any]:
        self._fresh()
        return self._call(self.fs.info, self.path(rel))

    def find(self, rel: str) -> list[str]:
        """All files under `rel`, as relative paths."""
        self._fresh()
        try:
            found = self._call(self.fs.find, self.path(rel))
        except FileNotFoundError:
            return []
        return sorted(self.rel(f) for f in found)

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def local_path(self, rel: str) -> Path | None:
        """The local path when the lakehouse is a folder (Spark reads it directly)."""
        return Path(self.path(rel)) if self.is_local else None

    # -- writes -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write (overwrite) a file; parents are created as needed."""
        p = self.path(rel)
        if self.is_local:
            os.replace(_write_aside(p, data), p)
        else:
            self._call(self.fs.pipe_file, p, data)

    def create_only(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if absent. True if we wrote it, False if identical content exists.

        Raises FileExistsError when different content is already there. A retry after a lost
        response finds its own bytes and counts that as success, not as a conflict.
        """
        p = self.path(rel)
        try:
            if self.is_local:
                # Write aside, then link: the name appears atomically with full content.
                tmp = _write_aside(p, data)
                try:
                    os.link(tmp, p)
                finally:
                    os.unlink(tmp)
            else:
                self._call(self.fs.pipe_file, p, data, overwrite=False)
            return True
        except FileExistsError:
            existing = self.read_bytes(rel)
            if existing == data:
                return False
            raise

    def put_file(self, local: str | Path, rel: str) -> None:
        """Upload a local file."""
        p = self.path(rel)
        if self.is_local:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            if Path(local).resolve() != Path(p).resolve():
                shutil.copyfile(local, p)
        else:
            self._call(self.fs.put_file, str(local), p)

    def get_file(self, rel: str, local: str | Path) -> None:
        """Download to a local file."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._call(self.fs.get_file, self.path(rel), str(local))

    def rm(self, rel: str, recursive: bool = True) -> None:
        p = self.path(rel)
        try:
            self._call(self.fs.rm, p, recursive=recursive)
        except FileNotFoundError:
            pass

    # -- errors -----------------------------------------------------------------------------
    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            if "No such container" in str(exc):  # adlfs' words for ContainerNotFound
                raise translate_storage_error(ValueError("ContainerNotFound"), self.root) from None
            raise
        except (FileExistsError, IsADirectoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - translate SDK errors to an actionable one
            raise translate_storage_error(exc, self.root) from exc


def translate_storage_error(exc: Exception, root: str) -> Exception:
    """Turn Azure SDK / network errors into a StorageError that says what to do."""
    name = type(exc).__name__
    text = str(exc)
    status = getattr(exc, "status_code", None)
    auth_markers = (
        "AuthenticationFailed",
        "AuthorizationFailure",
        "failed to authenticate",
        "CredentialUnavailable",
        "AuthorizationPermissionMismatch",
    )
    if (
        name in {"ClientAuthenticationError", "CredentialUnavailableError"}
        or status in (401, 403)
        or any(m in text for m in auth_markers)
    ):
        return StorageError(
            f"Storage at {root} refused the credentials ({name}). Check the "
            "AzureBlobStorageCredentials block referenced by lakehouse.block "
            "(`python -m blocks create` re-creates it from the environment).",
            retryable=False,
        )
    if "ContainerNotFound" in text:
        return StorageError(
            f"Container of {root} does not exist. Create it (az storage container create) "
            "or run `python -m blocks create --create-container`.",
            retryable=False,
        )
    network = {"ServiceRequestError", "ServiceResponseError", "ConnectionError", "TimeoutError"}
    if name in network or (
        "Connection refused" in text or "Failed to establish" in text or "timed out" in text
    ):
        return StorageError(
            f"Storage at {root} is unreachable ({name}). Check the account URL / endpoint in "
            "the credentials block and that the service is up; the task will retry."
        )
    if isinstance(exc, OSError | StorageError):
        return exc
    return StorageError(f"Storage error at {root}: {name}: {text.splitlines()[0] if text else ''}")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _azure_filesystem(block: str | None) -> tuple[fsspec.AbstractFileSystem, dict[str, str]]:
    """adlfs filesystem and delta-rs storage options from a LakehouseStorage block."""
    if not block:
        raise StorageError(
            "An az:// lakehouse.root needs lakehouse.block: the name of a LakehouseStorage "
            "block (create it with `python -m blocks create`)."
        )
    from blocks.lakehouse import load_lakehouse_block

    try:
        storage = load_lakehouse_block(block)
    except ValueError as exc:
        raise StorageError(str(exc), retryable=False) from None
    try:
        return storage.filesystem(), storage.delta_storage_options()
    except ValueError as exc:
        raise StorageError(str(exc), retryable=False) from None


@functools.lru_cache(maxsize=16)
def open_lakehouse(root: str, block: str | None = None) -> Lakehouse:
    """Open a lakehouse root; Azure roots take their credentials from the named block."""
    if root.startswith("az://"):
        fs, options = _azure_filesystem(block)
        return Lakehouse(root, fs, root.split("://", 1)[1], options)
    local = root[len("file://") :] if root.startswith("file://") else root
    base = Path(local).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    return Lakehouse(str(base), fsspec.filesystem("file"), str(base))


def iter_local_files(pattern: str) -> Iterator[Path]:
    """Files for a path, glob or folder (recursive for folders), sorted."""
    import glob

    p = Path(pattern).expanduser()
    if p.is_dir():
        yield from sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith("."))
    elif any(ch in pattern for ch in "*?["):
        yield from sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())
    elif p.is_file():
        yield p


def _write_aside(path: str, data: bytes) -> str:
    """`data` fsynced into a fresh temporary file beside `path` (parents created); its name."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp

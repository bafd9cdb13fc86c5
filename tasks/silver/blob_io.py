"""Lakehouse files from inside Spark's Python workers: a local path, or Azure Blob via adlfs.

Spark here has no JVM Azure connector (hadoop-azure): on an Azure lakehouse the executors read
the bronze files and write the silver parts themselves, in Python, through fsspec/adlfs.
Their credential is a short-lived SAS scoped to the lakehouse container, which the driver
issues from the storage block (`executor_access`); the account key never leaves the driver.
The SAS reaches the executors as a Spark broadcast variable, so it is in no task closure, no
Spark configuration and no executor environment. On Spark Connect (no broadcast) the executors
use the cluster's own identity (DefaultAzureCredential: a Databricks cluster's managed identity
or service principal) and the driver sends no credential at all.

Plain module (fsspec, pyarrow; adlfs for Azure): Spark's Python workers import it without the
rest of the project.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


@dataclass(frozen=True)
class BlobAccess:
    """What an executor needs to reach the lakehouse container: never the account key."""

    account_name: str
    endpoint: str  # the blob endpoint (https://<account>.blob.core.windows.net, or Azurite's)
    sas_token: str | None = field(default=None, repr=False)  # None: the cluster's identity
    expires: str | None = None  # ISO time the SAS stops working (for error messages)


def executor_access(
    storage_options: dict[str, str], container: str, *, minutes: int, with_sas: bool = True
) -> BlobAccess:
    """Executor access to `container` from a lakehouse's delta-rs storage options (driver side).

    With the account key: a container SAS (read, add, create, write, list) valid for `minutes`.
    A block that holds a SAS passes it on as it is (already scoped by whoever issued it). With
    neither (service principal, CLI, managed identity), or `with_sas=False` (Spark Connect), the
    executors use the cluster's own identity.
    """
    account = storage_options.get("account_name", "")
    endpoint = storage_options.get("endpoint") or f"https://{account}.blob.core.windows.net"
    if not with_sas:
        return BlobAccess(account, endpoint)
    if storage_options.get("account_key"):
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        expiry = datetime.now(UTC) + timedelta(minutes=minutes)
        sas = generate_container_sas(
            account,
            container,
            account_key=storage_options["account_key"],
            permission=ContainerSasPermissions(
                read=True, add=True, create=True, write=True, list=True
            ),
            expiry=expiry,
            start=datetime.now(UTC) - timedelta(minutes=5),  # clock skew between machines
        )
        return BlobAccess(account, endpoint, sas, expiry.isoformat(timespec="seconds"))
    if storage_options.get("sas_token"):
        return BlobAccess(account, endpoint, storage_options["sas_token"].lstrip("?"))
    return BlobAccess(account, endpoint)


def resolved(access: Any) -> BlobAccess | None:
    """The BlobAccess behind a Spark broadcast variable (or given as is; None: local files)."""
    return access.value if hasattr(access, "value") else access


def filesystem(access: BlobAccess | None) -> fsspec.AbstractFileSystem:
    """The filesystem of the lakehouse as an executor sees it."""
    if access is None:
        return fsspec.filesystem("file")
    from adlfs import AzureBlobFileSystem

    if access.sas_token:
        conn = f"BlobEndpoint={access.endpoint};SharedAccessSignature={access.sas_token}"
        return AzureBlobFileSystem(connection_string=conn, skip_instance_cache=True)
    # The cluster's identity (environment, managed identity, workload identity).
    return AzureBlobFileSystem(
        account_name=access.account_name, anon=False, skip_instance_cache=True
    )


def read_parquet_files(
    batches: Iterable[pa.RecordBatch],
    *,
    access: Any,
    schema: pa.Schema,
    keep_batches: list[str] | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: read the parquet files named in column `path`, in `schema` (columns a
    file lacks are nulls), streamed `batch_rows` rows at a time; with `keep_batches`, only the
    rows whose `_batch_id` is one of them."""
    fs = filesystem(resolved(access))
    keep = pa.array(keep_batches, pa.string()) if keep_batches is not None else None
    for batch in batches:
        for path in batch.column("path").to_pylist():
            with fs.open(path, "rb") as fh:
                parquet = pq.ParquetFile(fh)
                present = [n for n in schema.names if n in parquet.schema_arrow.names]
                for rows in parquet.iter_batches(batch_size=batch_rows, columns=present):
                    if keep is not None:
                        rows = rows.filter(pc.is_in(rows.column("_batch_id"), value_set=keep))
                    if rows.num_rows:
                        yield _in_schema(rows, schema)


def _in_schema(rows: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    columns = [
        rows.column(n).cast(f.type) if n in rows.schema.names else pa.nulls(rows.num_rows, f.type)
        for n, f in zip(schema.names, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class PartFile:
    """One part file being written: straight into a local folder, or into a local temporary
    file that is uploaded whole when closed (Azure: a part appears complete or not at all)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str, name: str, local: bool):
        self.fs, self.local = fs, local
        self.path = f"{folder.rstrip('/')}/{name}"
        if local:
            os.makedirs(folder, exist_ok=True)
            self.scratch = self.path
        else:
            import tempfile

            handle, self.scratch = tempfile.mkstemp(prefix="silver-part-", suffix=".parquet")
            os.close(handle)

    def publish(self) -> int:
        """Put the closed file in place; its size in bytes."""
        size = os.path.getsize(self.scratch)
        if not self.local:
            try:
                self.fs.put_file(self.scratch, self.path)
            finally:
                os.unlink(self.scratch)
        return size

    def discard(self) -> None:
        if not self.local and os.path.exists(self.scratch):
            os.unlink(self.scratch)

"""Prefect block for a lakehouse on Azure Blob Storage."""

from __future__ import annotations

from typing import Any

from prefect.filesystems import WritableFileSystem
from prefect_azure.credentials import AzureBlobStorageCredentials
from pydantic import Field


class LakehouseStorage(WritableFileSystem):
    """A lakehouse root on Azure Blob Storage: credentials plus container and prefix.

    Example:
        ```python
        from blocks.lakehouse import LakehouseStorage
        storage = LakehouseStorage.load("lakehouse")
        fs = storage.filesystem()          # adlfs, credentials from the referenced block
        storage.root_uri()                 # "az://lakehouse/demo"
        ```
    """

    _block_type_name = "Lakehouse Storage"
    _block_type_slug = "lakehouse-storage"
    _description = "Lakehouse root (container and prefix) on Azure Blob Storage."

    credentials: AzureBlobStorageCredentials = Field(
        ...,
        description="prefect-azure credentials: a connection string, or an account URL "
        "(DefaultAzureCredential or a service principal).",
    )
    container: str = Field(..., description="Blob container holding the lakehouse.")
    prefix: str = Field("", description="Folder inside the container; empty for the root.")
    retry_total: int = Field(
        3, ge=0, description="Azure SDK retries per request (the Prefect tasks retry on top)."
    )
    retry_backoff_seconds: float = Field(
        1.0, ge=0, description="First Azure SDK retry delay; later ones grow exponentially."
    )
    connection_timeout: int = Field(20, ge=1, description="Seconds to wait for a connection.")

    def root_uri(self) -> str:
        """The lakehouse root as az://container/prefix."""
        prefix = self.prefix.strip("/")
        return f"az://{self.container}/{prefix}" if prefix else f"az://{self.container}"

    def filesystem(self) -> Any:
        """An adlfs filesystem authenticated with the referenced credentials."""
        from adlfs import AzureBlobFileSystem

        creds = self.credentials
        if creds.connection_string is not None:
            conn = creds.connection_string.get_secret_value()
            fs = AzureBlobFileSystem(connection_string=conn, skip_instance_cache=True)
            fs.service_client = self._service_client(conn_str=conn)
            return fs
        if not creds.account_url:
            raise ValueError(
                "The AzureBlobStorageCredentials block has neither connection_string nor "
                "account_url: set one of them."
            )
        account = creds.account_url.split("//", 1)[-1].split(".", 1)[0]
        if creds.client_id and creds.tenant_id and creds.client_secret:
            fs = AzureBlobFileSystem(
                account_name=account,
                client_id=creds.client_id,
                tenant_id=creds.tenant_id,
                client_secret=creds.client_secret.get_secret_value(),
                skip_instance_cache=True,
            )
        else:
            from azure.identity.aio import DefaultAzureCredential

            fs = AzureBlobFileSystem(
                account_name=account,
                credential=DefaultAzureCredential(),
                anon=False,
                skip_instance_cache=True,
            )
        # The block's account URL, not one rebuilt from the account name: custom hosts work.
        fs.service_client = self._service_client(
            account_url=creds.account_url, credential=fs.credential
        )
        return fs

    def delta_storage_options(self) -> dict[str, str]:
        """delta-rs (object_store) options for the same credentials; never logged.

        Connection string -> account name + key (or SAS) + endpoint; account URL with a service
        principal -> client id/secret/tenant; otherwise the environment / managed identity.
        """
        # The same bounded retries as the Azure SDK's (the Prefect tasks retry with backoff).
        limits = {
            "max_retries": str(self.retry_total),
            "connect_timeout": f"{self.connection_timeout}s",
        }
        creds = self.credentials
        if creds.connection_string is not None:
            conn = creds.connection_string.get_secret_value()
            return {**delta_options_from_connection_string(conn), **limits}
        if not creds.account_url:
            raise ValueError(
                "The AzureBlobStorageCredentials block has neither connection_string nor "
                "account_url: set one of them."
            )
        host = creds.account_url.split("//", 1)[-1].split("/", 1)[0]
        opts = {"account_name": host.split(".", 1)[0], **limits}
        if not host.endswith(".blob.core.windows.net"):
            opts["endpoint"] = creds.account_url.rstrip("/")
        if creds.client_id and creds.tenant_id and creds.client_secret:
            opts.update(
                client_id=creds.client_id,
                tenant_id=creds.tenant_id,
                client_secret=creds.client_secret.get_secret_value(),
            )
        # Otherwise no credential option: delta-rs then takes AZURE_* variables or the managed
        # identity (use_azure_cli=true would fail where the az CLI is not installed).
        return opts

    def _service_client(
        self, conn_str: str | None = None, account_url: str | None = None, credential: Any = None
    ) -> Any:
        """An async BlobServiceClient with bounded retries.

        The SDK default (3 retries from 15 s) keeps an unreachable endpoint busy for minutes
        per call; the Prefect tasks already retry with backoff, so the SDK retries briefly.
        """
        from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

        options: dict[str, Any] = {
            "retry_policy": ExponentialRetry(
                initial_backoff=self.retry_backoff_seconds,
                increment_base=2,
                retry_total=self.retry_total,
                random_jitter_range=0,
            ),
            "connection_timeout": self.connection_timeout,
        }
        if conn_str is not None:
            return BlobServiceClient.from_connection_string(conn_str, **options)
        return BlobServiceClient(account_url=account_url, credential=credential, **options)

    # WritableFileSystem: lets Prefect persist task results next to the lakehouse
    # (`result_storage=LakehouseStorage.load(...)`), under <prefix>/_prefect/results.
    def _result_path(self, path: str) -> str:
        prefix = "/".join(p for p in (self.container, self.prefix.strip("/")) if p)
        return f"{prefix}/_prefect/results/{path.lstrip('/')}"

    async def read_path(self, path: str) -> bytes:
        import asyncio

        return await asyncio.to_thread(self.filesystem().cat_file, self._result_path(path))

    async def write_path(self, path: str, content: bytes) -> None:
        import asyncio

        await asyncio.to_thread(self.filesystem().pipe_file, self._result_path(path), content)

    def ensure_container(self) -> None:
        """Create the container if missing (Azurite starts empty)."""
        from azure.core.exceptions import ResourceExistsError

        fs = self.filesystem()
        try:
            fs.mkdir(self.container)
        except (FileExistsError, ResourceExistsError):
            pass


def load_lakehouse_block(name: str) -> LakehouseStorage:
    """Load a saved LakehouseStorage block, with a clear error when it is missing."""
    try:
        return LakehouseStorage.load(name)
    except ValueError as exc:
        if "Unable to find block document" in str(exc) or "not found" in str(exc).lower():
            raise ValueError(
                f"lakehouse.block={name!r}: no such LakehouseStorage block on the Prefect API. "
                "Create it with `python -m blocks create` (reads AZURE_STORAGE_CONNECTION_STRING "
                "or AZURE_STORAGE_ACCOUNT_URL, LAKEHOUSE_CONTAINER, LAKEHOUSE_PREFIX)."
            ) from None
        raise


def delta_options_from_connection_string(conn: str) -> dict[str, str]:
    """delta-rs storage options from an Azure connection string (Azurite's included)."""
    parts = dict(kv.split("=", 1) for kv in conn.strip().strip(";").split(";") if "=" in kv)
    if parts.get("UseDevelopmentStorage", "").lower() == "true":
        parts = {
            "AccountName": "devstoreaccount1",
            "AccountKey": AZURITE_DEV_KEY,
            "BlobEndpoint": "http://127.0.0.1:10000/devstoreaccount1",
        }
    opts = {"account_name": parts.get("AccountName", "")}
    if parts.get("AccountKey"):
        opts["account_key"] = parts["AccountKey"]
    if parts.get("SharedAccessSignature"):
        opts["sas_token"] = parts["SharedAccessSignature"]
    endpoint = parts.get("BlobEndpoint")
    if endpoint:
        opts["endpoint"] = endpoint.rstrip("/")
        if not opts["account_name"]:
            opts["account_name"] = endpoint.rstrip("/").rsplit("/", 1)[-1]
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    return opts


# Microsoft's published Azurite development key (not a secret: it only opens the emulator).
AZURITE_DEV_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

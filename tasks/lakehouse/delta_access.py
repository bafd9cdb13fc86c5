"""How delta-rs reaches lakehouse storage: options from credentials, errors without secrets.

Plain module (no Prefect): Spark workers and training ranks import it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from deltalake.exceptions import CommitFailedError, DeltaError

from tasks.lakehouse.storage import StorageError

_SECRET_KEYS = {
    "account_key",
    "access_key",
    "sas_token",
    "sas_key",
    "client_secret",
    "token",
    "bearer_token",
    "azure_storage_account_key",
    "azure_storage_sas_key",
    "azure_storage_sas_token",
    "azure_storage_client_secret",
    "azure_storage_token",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_AUTH = (
    "403 Forbidden",
    "401 Unauthorized",
    "AuthorizationFailure",
    "AuthenticationFailed",
    "lacked the necessary privileges",
    "token request",
    "Azure Cli",
    "federated token",
)
_NETWORK = (
    "Connection refused",
    "Connection reset",
    "error sending request",
    "timed out",
    "tcp connect",
    "dns error",
)


class TableError(StorageError):
    """A table cannot be used or reached as asked; the message names the path and what to do.

    A StorageError, so the tasks' retry rule applies: only transient trouble (network, commit
    races) is retried.
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message, retryable=retryable)


class StorageOptions(dict):
    """delta-rs storage options; its repr never shows a value (tracebacks, logs)."""

    def __repr__(self) -> str:
        return f"StorageOptions(keys={sorted(self)})"

    __str__ = __repr__


@dataclass(frozen=True)
class AzureAccess:
    """Resolved Azure Blob settings of a lakehouse (from its storage block); secrets never shown.

    Authentication, first set wins: `account_key`, `sas_token`, a service principal
    (`client_id` + `client_secret` + `tenant_id`), `use_azure_cli`. With none of them delta-rs
    (object_store) uses managed identity (`client_id` picks a user-assigned one), after any
    AZURE_* environment variables. `use_azure_cli` uses the CLI only: no fallback.

    Example:
        `AzureAccess(account_name="devstoreaccount1", account_key=KEY,
        endpoint="http://127.0.0.1:10000/devstoreaccount1")` for Azurite.
    """

    account_name: str
    account_key: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    tenant_id: str | None = None
    use_azure_cli: bool = False
    endpoint: str | None = None  # blob endpoint for Azurite or custom hosts, path style
    max_retries: int | None = None
    timeout_seconds: int | None = None


def delta_storage_options(access: AzureAccess | None) -> StorageOptions:
    """delta-rs (object_store) options for Azure access; empty for a local folder.

    Args:
        access: resolved Azure settings, or None for a local lakehouse.

    Returns:
        Options for the `storage_options=` of `tasks.lakehouse.tables`.

    Raises:
        TableError: a service principal without its client or tenant id.
    """
    if access is None:
        return StorageOptions()
    opts = StorageOptions(account_name=access.account_name)
    if access.account_key:
        opts["account_key"] = access.account_key
    elif access.sas_token:
        opts["sas_token"] = access.sas_token.lstrip("?")
    elif access.client_secret:
        if not (access.client_id and access.tenant_id):
            raise TableError("An Azure service principal needs client_id and tenant_id too.")
        opts.update(
            client_id=access.client_id,
            client_secret=access.client_secret,
            tenant_id=access.tenant_id,
        )
    elif access.use_azure_cli:
        opts["use_azure_cli"] = "true"
    elif access.client_id:
        opts["client_id"] = access.client_id
    if access.endpoint:
        opts["endpoint"] = access.endpoint.rstrip("/")
        if access.endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    if access.max_retries is not None:
        opts["max_retries"] = str(access.max_retries)
    if access.timeout_seconds is not None:
        opts["timeout"] = f"{access.timeout_seconds}s"
    return opts


def plain_options(storage_options: Mapping[str, str] | None) -> dict[str, str] | None:
    """The dict delta-rs takes (None for a local folder)."""
    return dict(storage_options) if storage_options else None


def secret_values(storage_options: Mapping[str, str] | None) -> list[str]:
    """The credential values in `storage_options` (and a SAS token's signature alone)."""
    values = [v for k, v in (storage_options or {}).items() if k.lower() in _SECRET_KEYS and v]
    return values + [s.split("sig=", 1)[1].split("&")[0] for s in values if "sig=" in s]


def scrub(text: str, storage_options: Mapping[str, str] | None) -> str:
    """`text` without ANSI colours, credential values or SAS signatures."""
    text = _ANSI.sub("", text)
    for secret in secret_values(storage_options):
        text = text.replace(secret, "***")
    return re.sub(r"sig=[^&\s\"']+", "sig=***", text)


def _line(text: str, markers: tuple[str, ...] = ()) -> str:
    """The most telling line of a delta-rs error chain (they nest with '↳')."""
    lines = [ln.strip(" ↳") for ln in text.splitlines() if ln.strip(" ↳")]
    hits = [ln for ln in lines if any(m in ln for m in markers)]
    return (hits or lines or [""])[0][:300]


@contextlib.contextmanager
def delta_errors(uri: str, storage_options: Mapping[str, str] | None) -> Iterator[None]:
    """Storage errors of delta-rs as TableErrors that say what to do, credentials scrubbed.

    TableError, ValueError and CommitFailedError pass unchanged (callers handle them).
    """
    try:
        yield
    except (TableError, ValueError, CommitFailedError):
        raise
    except Exception as exc:  # noqa: BLE001 - delta-rs raises OSError, DeltaError, Exception
        raw = str(exc)
        text = scrub(raw, storage_options)
        if "Unsupported: Feature" in text:
            raise TableError(
                f"Table {uri} needs a Delta feature that deltalake cannot handle "
                f"({_line(text, ('Unsupported',))}). Use another table path."
            ) from None
        if any(m in text for m in _AUTH):
            raise TableError(
                f"Storage at {uri} refused the credentials ({_line(text, _AUTH)}). Check the "
                "AzureBlobStorageCredentials block referenced by lakehouse.block "
                "(`python -m blocks create` re-creates it from the environment).",
            ) from None
        if "ContainerNotFound" in text:
            raise TableError(
                f"The container of {uri} does not exist: create it "
                "(`python -m blocks create --create-container`)."
            ) from None
        if any(m in text for m in _NETWORK):
            raise TableError(
                f"Storage at {uri} is unreachable ({_line(text, _NETWORK)}); check the "
                "endpoint and that the service is up. The task will retry.",
                retryable=True,
            ) from None
        if isinstance(exc, DeltaError | OSError) or text != _ANSI.sub("", raw):
            raise TableError(f"Table {uri}: {_line(text)}") from None
        raise

"""`python -m blocks create|register`: build and save the project's blocks from environment.

Environment:
    AZURE_STORAGE_CONNECTION_STRING  or  AZURE_STORAGE_ACCOUNT_URL (DefaultAzureCredential)
    AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET   (optional service principal)
    LAKEHOUSE_CONTAINER (default "lakehouse"), LAKEHOUSE_PREFIX (default "")
    LAKEHOUSE_BLOCK (default "lakehouse"), AZURE_CREDENTIALS_BLOCK (default "azure-credentials")
    HF_TOKEN -> Secret block "hf-token";  MLFLOW_TRACKING_TOKEN -> Secret block "mlflow-token"
"""

from __future__ import annotations

import argparse
import os
import sys


def register() -> None:
    """Register the block types with the Prefect API (they then appear in the UI)."""
    from prefect.blocks.system import Secret
    from prefect_azure.credentials import AzureBlobStorageCredentials

    from blocks.lakehouse import LakehouseStorage

    for block_type in (AzureBlobStorageCredentials, LakehouseStorage, Secret):
        block_type.register_type_and_schema()
    print("registered block types: azure-blob-storage-credentials, lakehouse-storage, secret")


def create(create_container: bool = False) -> list[str]:
    """Create (overwrite) blocks from the environment; returns the names saved."""
    from prefect.blocks.system import Secret
    from prefect_azure.credentials import AzureBlobStorageCredentials

    from blocks.lakehouse import LakehouseStorage

    saved: list[str] = []
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    url = os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
    if conn or url:
        creds = AzureBlobStorageCredentials(
            connection_string=conn or None,
            account_url=None if conn else url,
            client_id=os.environ.get("AZURE_CLIENT_ID"),
            tenant_id=os.environ.get("AZURE_TENANT_ID"),
            client_secret=os.environ.get("AZURE_CLIENT_SECRET"),
        )
        creds_name = os.environ.get("AZURE_CREDENTIALS_BLOCK", "azure-credentials")
        creds.save(creds_name, overwrite=True)
        saved.append(f"azure-blob-storage-credentials/{creds_name}")
        storage = LakehouseStorage(
            credentials=AzureBlobStorageCredentials.load(creds_name),
            container=os.environ.get("LAKEHOUSE_CONTAINER", "lakehouse"),
            prefix=os.environ.get("LAKEHOUSE_PREFIX", ""),
        )
        if create_container:
            storage.ensure_container()
        name = os.environ.get("LAKEHOUSE_BLOCK", "lakehouse")
        storage.save(name, overwrite=True)
        saved.append(f"lakehouse-storage/{name} -> {storage.root_uri()}")
    for env, block_name in (("HF_TOKEN", "hf-token"), ("MLFLOW_TRACKING_TOKEN", "mlflow-token")):
        if os.environ.get(env):
            Secret(value=os.environ[env]).save(block_name, overwrite=True)
            saved.append(f"secret/{block_name}")
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blocks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create blocks from environment variables")
    c.add_argument(
        "--create-container", action="store_true", help="also create the blob container if missing"
    )
    sub.add_parser("register", help="register block types with the Prefect API")
    args = parser.parse_args(argv)
    if args.cmd == "register":
        register()
        return 0
    saved = create(create_container=args.create_container)
    if not saved:
        print(
            "nothing to create: set AZURE_STORAGE_CONNECTION_STRING or "
            "AZURE_STORAGE_ACCOUNT_URL (and HF_TOKEN / MLFLOW_TRACKING_TOKEN)",
            file=sys.stderr,
        )
        return 1
    for line in saved:
        print(f"saved {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

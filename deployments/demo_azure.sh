#!/usr/bin/env bash
# `make demo-azure`: the demo pipeline against Azurite (local Azure Blob) through the blocks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${AZURITE_PORT:-10000}
DATA=.work/azurite
mkdir -p "$DATA"
if ! (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then
  echo "starting Azurite on 127.0.0.1:$PORT (data in $DATA)"
  nohup .tools/node_modules/.bin/azurite-blob --silent --disableTelemetry --location "$DATA" \
    --blobHost 127.0.0.1 --blobPort "$PORT" --skipApiVersionCheck --loose \
    > .work/azurite.log 2>&1 &
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
fi
# Azurite's published development account (Microsoft docs), not a secret. Real Azure: export
# AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_URL yourself and skip this script.
export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$PORT/devstoreaccount1;"
export LAKEHOUSE_CONTAINER=lakehouse LAKEHOUSE_PREFIX=demo LAKEHOUSE_BLOCK=lakehouse
$PY -m blocks create --create-container
unset AZURE_STORAGE_CONNECTION_STRING   # the flows read the block, not the environment
$PY -m flows pipeline --config configs/azure.yaml --json | tee .work/demo-azure-result.log
tail -n 1 .work/demo-azure-result.log > .work/demo-azure-result.json
$PY -m flows.where --config configs/azure.yaml --result .work/demo-azure-result.json

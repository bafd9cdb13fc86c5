#!/usr/bin/env bash
# Build the project image with podman:
#   localhost/lakehouse-seq2seq:<git short sha>[-dirty]  and  :latest
# (with TORCH_FLAVOUR other than cpu: :<sha>-<flavour> and :<flavour>).
#
# Offline-friendly: the base image is the local Debian one from setup-podman.sh, and this
# machine's pip settings (index URLs, find-links, CA bundle) reach the pip steps only at build
# time, as build secrets (local folders are served on 127.0.0.1 while the build runs).
# Nothing machine-specific lands in the image or its history. pip's cache lives in a
# build cache mount (RUN --mount=type=cache), so re-builds after a pin change are fast too.
#
# Environment knobs:
#   IMAGE          repository name         (default localhost/lakehouse-seq2seq)
#   BASE_IMAGE     base for both stages    (default localhost/bookworm-python:3.11)
#   TORCH_FLAVOUR  cpu | cu126 | cu128 ... (default cpu)
#   NO_CACHE=1     ignore the layer cache (a cold build; pip's cache mount is kept)
#   EXTRA_BUILD_ARGS  more arguments for `podman build`
# Prints the built image reference as the last stdout line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
IMAGE="${IMAGE:-localhost/lakehouse-seq2seq}"
BASE_IMAGE="${BASE_IMAGE:-localhost/bookworm-python:3.11}"
TORCH_FLAVOUR="${TORCH_FLAVOUR:-cpu}"
WORK="$ROOT/.work/podman"
log() { echo "[build-image] $*" >&2; }

command -v podman >/dev/null || { log "podman missing: run deployments/engine/setup-podman.sh"; exit 1; }
if [[ "$BASE_IMAGE" == localhost/* ]] && ! podman image exists "$BASE_IMAGE"; then
  log "base image $BASE_IMAGE missing: run deployments/engine/setup-podman.sh"; exit 1
fi

# --- tags ---------------------------------------------------------------------------------------
if sha="$(git rev-parse --short HEAD 2>/dev/null)"; then
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && sha="$sha-dirty"
else
  sha="dev"   # no commit yet
fi
suffix=""; [ "$TORCH_FLAVOUR" != cpu ] && suffix="-$TORCH_FLAVOUR"
TAG="$sha$suffix"
LATEST="latest"; [ -n "$suffix" ] && LATEST="$TORCH_FLAVOUR"

# --- this machine's pip settings -> build secrets + a loopback file server ----------------------
# pip reads the settings from the build secret `pipconf` (a pip.conf) and the CA bundle from the
# secret `cacert`; local folders it names (find-links, file:// indexes) are served read-only over
# HTTP on 127.0.0.1 for the duration of the build (the build runs with --network=host). Secrets
# leave no trace in layers or history; bind mounts (`podman build -v`) would leave their empty
# mount points (/opt/wheels, ...) in every layer a RUN step makes, in both stages.
mkdir -p "$WORK"
PIP=(python3 -m pip); [ -x "$ROOT/.venv/bin/pip" ] && PIP=("$ROOT/.venv/bin/pip")
HOSTPIP="$WORK/host-pip.conf"
# `pip config list` shows files and PIP_* variables in load order; later entries win.
"${PIP[@]}" config list 2>/dev/null | python3 -c '
import ast, sys
keep = ("index-url", "extra-index-url", "find-links", "cert",
        "trusted-host", "default-timeout", "retries", "timeout", "proxy")
opts = {}
for line in sys.stdin:
    key, _, val = line.strip().partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in keep and val:
        opts[name] = ast.literal_eval(val)
for k, v in opts.items():
    print(f"{k} = {v}")
' > "$HOSTPIP"

SERVE="$WORK/pip-serve"       # symlinks to the local folders that pip needs
rm -rf "$SERVE"; mkdir -p "$SERVE"
PORT_FILE="$WORK/pip-serve.port"; rm -f "$PORT_FILE"
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
  rm -rf "$SERVE" "$PORT_FILE" "$HOSTPIP" "$WORK/pip.conf"
}
trap cleanup EXIT
python3 - "$SERVE" "$PORT_FILE" >"$WORK/pip-serve.log" 2>&1 <<'PY' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
srv.serve_forever()
PY
SERVER_PID=$!
for _ in $(seq 1 50); do [ -s "$PORT_FILE" ] && break; sleep 0.1; done
[ -s "$PORT_FILE" ] || { log "local file server did not start; see $WORK/pip-serve.log"; exit 1; }
BASE_URL="http://127.0.0.1:$(cat "$PORT_FILE")"

PIPCONF="$WORK/pip.conf"
SECRETS=(--secret "id=pipconf,src=$PIPCONF")
n=0
serve() {  # serve PATH: link it under the loopback server; sets URL (no subshell: n must stick)
  local p="$1" root="$1" rest=""
  # a PEP 503 file index (/x/simple) links to ../files: serve the folder above it
  if [ "$(basename "$p")" = simple ]; then root="$(dirname "$p")"; rest="/simple"; fi
  n=$((n + 1)); ln -sfn "$root" "$SERVE/$n"
  URL="$BASE_URL/$n$rest/"
}
{
  echo "[global]"
  while read -r key val; do
    case "$key" in
      cert)
        [ -f "$val" ] || continue
        SECRETS+=(--secret "id=cacert,src=$val")
        echo "cert = /run/secrets/cacert" ;;
      find-links|index-url|extra-index-url)
        out=()
        for v in $val; do
          p="${v#file://}"
          if [ "$p" = "$v" ] && [ "${v#/}" = "$v" ]; then out+=("$v")   # remote URL
          elif [ -e "$p" ]; then serve "$p"; out+=("$URL")
          fi
        done
        [ "${#out[@]}" -gt 0 ] && echo "$key = ${out[*]}" ;;
      *) echo "$key = $val" ;;
    esac
  done < <(sed -n 's/^\([a-z-]*\) = \(.*\)$/\1 \2/p' "$HOSTPIP")
  echo "trusted-host = 127.0.0.1"
} > "$PIPCONF"
chmod 600 "$PIPCONF"

# torch from a local wheel folder? then skip the (unreachable here) PyTorch index
TORCH_PIN="$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
TORCH_ARGS=(--build-arg "TORCH_FLAVOUR=$TORCH_FLAVOUR")
for d in $(sed -n 's/^find-links = //p' "$HOSTPIP"); do
  if compgen -G "${d#file://}/torch-${TORCH_PIN}+${TORCH_FLAVOUR}-*.whl" >/dev/null; then
    log "torch $TORCH_PIN+$TORCH_FLAVOUR found in $d; not using the PyTorch index"
    TORCH_ARGS+=(--build-arg "TORCH_INDEX_URL=")
    break
  fi
done

# --- podman's rlimits: see setup-podman.sh (podman caps its own nproc at 32768) ----------------
nofile="$(ulimit -n)"; nproc="$(ulimit -u)"
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
[ "$nofile" = unlimited ] && nofile=1048576

BUILD=(podman build --network=host --layers --format docker
       --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
       --build-arg "BASE_IMAGE=$BASE_IMAGE" "${TORCH_ARGS[@]}"
       "${SECRETS[@]}"
       --label "org.opencontainers.image.revision=$sha"
       --label "org.opencontainers.image.title=lakehouse-seq2seq"
       -t "$IMAGE:$TAG" -t "$IMAGE:$LATEST" -f Dockerfile)
[[ "$BASE_IMAGE" == localhost/* ]] && BUILD+=(--pull=never)
[ "${NO_CACHE:-0}" = 1 ] && BUILD+=(--no-cache)
# shellcheck disable=SC2206
[ -n "${EXTRA_BUILD_ARGS:-}" ] && BUILD+=($EXTRA_BUILD_ARGS)

log "${BUILD[*]} ."
start=$(date +%s)
"${BUILD[@]}" . >&2
log "built $IMAGE:$TAG (+ :$LATEST) in $(( $(date +%s) - start ))s," \
    "$(podman image inspect --format '{{.Size}}' "$IMAGE:$TAG" | awk '{printf "%.2f GB", $1/1e9}')"
echo "$IMAGE:$TAG"

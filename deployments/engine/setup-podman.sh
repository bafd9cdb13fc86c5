#!/usr/bin/env bash
# Set up a local container engine for the image build and the docker-marked tests:
#   podman + runc (Debian packages), a system containers.conf the OCI runtime accepts on this
#   machine, a locally built Debian base image (no registry needed), and podman's Docker-API
#   service on a project-local unix socket.
# Idempotent and fast when everything is already in place. The last stdout line is
#   DOCKER_HOST=unix://<socket>
# so callers can do: export "$(deployments/engine/setup-podman.sh | tail -n1)"
#
# Environment knobs:
#   BASE_IMAGE     local base image to build   (default localhost/bookworm-python:3.11)
#   PODMAN_DIR     project-local state folder  (default <repo>/.work/podman)
#   DEBIAN_MIRROR  Debian mirror for debootstrap (default: the first bookworm source apt uses)
#   REBUILD_BASE=1 rebuild the base image even if it exists
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-localhost/bookworm-python:3.11}"
MINBASE_IMAGE="localhost/bookworm-minbase:12"
PODMAN_DIR="${PODMAN_DIR:-$ROOT/.work/podman}"
SOCK="$PODMAN_DIR/podman.sock"
CONF=/etc/containers/containers.conf

log() { echo "[setup-podman] $*" >&2; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "needs root (or sudo) to install packages and write $CONF"; exit 1
  fi
fi

# 1. packages ---------------------------------------------------------------------------------
PKGS=(podman runc debootstrap)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Only refresh the package lists when they do not know the packages or are stale (404s).
  if ! apt-cache policy "${missing[@]}" 2>/dev/null | grep -q 'Candidate: [0-9]' \
     || ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    $SUDO apt-get update >&2
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
fi

# 2. containers.conf --------------------------------------------------------------------------
# The OCI runtime refuses to start a container whose rlimits exceed the caller's own, and
# podman's defaults (nofile=1048576, nproc=4194304) are higher than this machine allows.
lim() { local v; v="$(ulimit "$1")"; [ "$v" = unlimited ] && v="$2"; echo "$v"; }
NOFILE="$(lim -n 1048576)"
NPROC="$(lim -u 4194304)"
# podman itself lowers its own RLIMIT_NPROC to 32768 at start-up (strace: setrlimit(RLIMIT_NPROC,
# 32*1024)), and without CAP_SYS_RESOURCE its children cannot go back above that.
[ "$NPROC" -gt 32768 ] && NPROC=32768
want_conf="$(cat <<CONF
# Written by deployments/engine/setup-podman.sh (re-run it to refresh; edits are overwritten).
[containers]
# no higher than this machine's own limits (ulimit -n / ulimit -u, and 32768 for nproc, which
# podman caps itself to), or runc refuses to start the container
default_ulimits = [
  "nofile=${NOFILE}:${NOFILE}",
  "nproc=${NPROC}:${NPROC}",
]
# no journald on this machine
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
)"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$want_conf" ]; then
  log "writing $CONF (nofile=$NOFILE nproc=$NPROC)"
  $SUDO mkdir -p /etc/containers
  printf '%s\n' "$want_conf" | $SUDO tee "$CONF" >/dev/null
fi

# 3. base image -------------------------------------------------------------------------------
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  # deb822 (.sources) first, then one-line sources; first bookworm main archive wins
  m="$(grep -h -A3 '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/{u=$2} /^Suites:.*bookworm( |$)/{print u; exit}')"
  [ -z "$m" ] && m="$(grep -h -E '^deb\s+\S+\s+bookworm\s' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2; exit}')"
  if [ -z "$m" ]; then
    echo "no bookworm mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR=<mirror URL>" >&2
    return 1
  fi
  echo "$m"
}

if [ "${REBUILD_BASE:-0}" = 1 ] || ! $SUDO podman image exists "$BASE_IMAGE"; then
  if ! $SUDO podman image exists "$MINBASE_IMAGE"; then
    MIRROR="$(debian_mirror)"
    log "debootstrap minbase bookworm from $MIRROR"
    tmp="$(mktemp -d /tmp/bookworm-rootfs.XXXXXX)"
    trap '$SUDO rm -rf "$tmp"' EXIT
    $SUDO debootstrap --variant=minbase bookworm "$tmp" "$MIRROR" >&2
    # security + updates suites, like the public images; no package lists baked in
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
      "$MIRROR" "$MIRROR" "${MIRROR%/debian}/debian" | $SUDO tee "$tmp/etc/apt/sources.list" >/dev/null
    $SUDO rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/archives/*.deb
    $SUDO tar -C "$tmp" -c . | $SUDO podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$MINBASE_IMAGE" >&2
    $SUDO rm -rf "$tmp"; trap - EXIT
  fi
  log "building $BASE_IMAGE"
  $SUDO podman build --network=host --layers \
    --build-arg "MINBASE=$MINBASE_IMAGE" \
    -t "$BASE_IMAGE" -f "$ROOT/deployments/engine/base.Containerfile" "$ROOT/deployments/engine" >&2
fi

# 4. Docker API service -----------------------------------------------------------------------
answering() { curl -fsS --max-time 5 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }
mkdir -p "$PODMAN_DIR"
if ! answering; then
  if [ -f "$PODMAN_DIR/service.pid" ] && kill -0 "$(cat "$PODMAN_DIR/service.pid")" 2>/dev/null; then
    log "stale service pid $(cat "$PODMAN_DIR/service.pid") not answering; restarting it"
    kill "$(cat "$PODMAN_DIR/service.pid")" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$SOCK"
  log "starting podman system service on $SOCK (log: $PODMAN_DIR/service.log)"
  # setsid + nohup: the service outlives this script and the shell that ran it
  setsid nohup $SUDO podman system service --time=0 "unix://$SOCK" \
    >"$PODMAN_DIR/service.log" 2>&1 < /dev/null &
  echo $! > "$PODMAN_DIR/service.pid"
  for _ in $(seq 1 50); do answering && break; sleep 0.2; done
  answering || { log "service did not answer on $SOCK; see $PODMAN_DIR/service.log"; exit 1; }
fi

echo "DOCKER_HOST=unix://$SOCK"

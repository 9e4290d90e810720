#!/usr/bin/env bash
# Start a private Docker engine for CI on a machine with no systemd, no bridge and no registry
# (Debian's docker.io; --iptables=false --bridge=none, so every build and run needs --network host).
# Idempotent: installs docker.io only if dockerd is missing, starts the engine only if its socket does not answer.
# Prints the line to eval: export DOCKER_HOST=unix://$DOCKER_STATE/docker.sock
set -euo pipefail

STATE="${DOCKER_STATE:-/var/lib/private-docker}"
SOCK="$STATE/docker.sock"
HOST="unix://$SOCK"

log() { printf 'dockerd-up: %s\n' "$*" >&2; }

# is_live PID NAME: PID is a running (not zombie) process named NAME.
is_live() {
  local state comm
  [[ -n "$1" && -r "/proc/$1/status" ]] || return 1
  state="$(awk '/^State:/ {print $2}' "/proc/$1/status")"
  comm="$(cat "/proc/$1/comm" 2>/dev/null || true)"
  [[ "$state" != "Z" && "$comm" == "$2" ]]
}

engine_answers() {
  DOCKER_HOST="$HOST" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
  log "installing docker.io from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # "policy-rc.d denied execution of start" is expected: we start dockerd ourselves below.
  apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

if engine_answers; then
  log "engine already up at $HOST"
else
  mkdir -p "$STATE"
  # A pidfile left by a killed engine makes dockerd refuse to start. The pid is stale unless it is a live
  # (not zombie) dockerd; a live one that does not answer yet gets a moment before we give up on it.
  if [[ -f "$STATE/dockerd.pid" ]]; then
    old_pid="$(cat "$STATE/dockerd.pid")"
    if is_live "$old_pid" dockerd; then
      log "dockerd $old_pid is running but not answering yet; waiting up to 30 s"
      for _ in $(seq 1 60); do
        if engine_answers; then break; fi
        sleep 0.5
      done
      if engine_answers; then
        log "engine up at $HOST"
        echo "export DOCKER_HOST=$HOST"
        exit 0
      fi
      log "dockerd $old_pid does not answer; stop it (kill $old_pid) and run this again"
      exit 1
    fi
    rm -f "$STATE/dockerd.pid"
  fi
  # Likewise for the containerd that dockerd supervises: with a stale pidfile dockerd waits for a dead one.
  containerd_pidfile="$STATE/exec/containerd/containerd.pid"
  if [[ -f "$containerd_pidfile" ]] && ! is_live "$(cat "$containerd_pidfile")" containerd; then
    rm -f "$containerd_pidfile"
  fi
  started=""
  for driver in overlay2 vfs; do
    log "starting dockerd (storage driver $driver), log in $STATE/dockerd-$driver.log"
    setsid dockerd --host "$HOST" --data-root "$STATE/data-$driver" --exec-root "$STATE/exec" \
      --pidfile "$STATE/dockerd.pid" --storage-driver "$driver" \
      --iptables=false --ip6tables=false --bridge=none \
      </dev/null >"$STATE/dockerd-$driver.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 60); do
      if engine_answers; then started="$driver"; break; fi
      if ! kill -0 "$pid" 2>/dev/null; then break; fi
      sleep 0.5
    done
    [[ -n "$started" ]] && break
    log "dockerd with $driver did not come up; last log lines:"
    tail -n 5 "$STATE/dockerd-$driver.log" >&2 || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # Only a storage-driver failure is worth the vfs fallback (which starts from an empty image store).
    driver_log="$(cat "$STATE/dockerd-$driver.log")"
    if ! grep -qiE "overlay|graphdriver|storage.driver" <<<"$driver_log"; then
      break
    fi
  done
  if [[ -z "$started" ]]; then
    log "could not start dockerd"
    exit 1
  fi
  log "engine up at $HOST (storage driver $started)"
fi

server_version="$(DOCKER_HOST="$HOST" docker version --format '{{.Server.Version}}')"
log "server $server_version; use: docker build --network host, docker run --network host"
echo "export DOCKER_HOST=$HOST"

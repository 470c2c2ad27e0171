# Sourced by the benchmark scripts: free ports, and starting and stopping one release sidecar.
# Expects $py, $sidecar, $run_dir, log() and die() from the caller; an optional array
# sidecar_flags holds flags every sidecar of the script gets. Sets $api, $admin, $sidecar_pid,
# $data_dir.

free_port() {
  "$py" -c '
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_process() { # pid: SIGTERM, then SIGKILL after 10 s (a sidecar drains for its grace period)
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}

sidecar_pid=
data_dir=
api=
admin=
stop_sidecar() {
  stop_process "$sidecar_pid"
  sidecar_pid=
  [ -z "$data_dir" ] || rm -rf "$data_dir"
  data_dir=
}

start_sidecar() { # name extra-flags...: one sidecar with its own data directory, ready to serve
  local name=$1
  shift
  local port admin_port
  port=$(free_port)
  admin_port=$(free_port)
  [ "$port" != "$admin_port" ] || admin_port=$(free_port)
  api=http://127.0.0.1:$port
  admin=http://127.0.0.1:$admin_port
  data_dir=$(mktemp -d)
  log "starting sidecar $name on $api (admin $admin): $*"
  printf '%s\n' "$*" >"$run_dir/sidecar-$name.flags"
  INFERPOOL_LOG=info,ort=warn "$sidecar" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --data-dir "$data_dir" --shutdown-grace-seconds 5 ${sidecar_flags[@]+"${sidecar_flags[@]}"} "$@" \
    2>"$run_dir/sidecar-$name.log" &
  sidecar_pid=$!
  for _ in $(seq 240); do
    curl -fsS -o /dev/null "$api/readyz" 2>/dev/null && return 0
    kill -0 "$sidecar_pid" 2>/dev/null || die "sidecar $name exited; see $run_dir/sidecar-$name.log"
    sleep 0.5
  done
  die "sidecar $name was not ready within 120 s; see $run_dir/sidecar-$name.log"
}

# Sourced by deploy/e2e.sh and deploy/swarm/e2e.sh: `start_dockerd LOGFILE` starts the Docker
# daemon unless one already answers, and waits up to a minute for it.
#
# A machine restored from a snapshot can carry the pid files of a daemon that no longer runs.
# When such a pid has since been given to an unrelated process, dockerd takes its containerd for
# alive ("libcontainerd: containerd is still running") and waits for a socket that never comes
# until it gives up: a fresh-clone CI failed that way. A pid file whose process is not the daemon
# it names is stale, so it goes before the start.
start_dockerd() {
  local logfile=$1 entry pidfile daemon pid
  docker info >/dev/null 2>&1 && return 0
  for entry in /var/run/docker.pid:dockerd /var/run/docker/containerd/containerd.pid:containerd; do
    pidfile=${entry%:*} daemon=${entry#*:}
    [ -f "$pidfile" ] || continue
    pid=$(tr -d '[:space:]' <"$pidfile")
    if [ "$(ps -p "$pid" -o comm= 2>/dev/null)" != "$daemon" ]; then
      echo "removing stale $pidfile (pid ${pid:-none} is not $daemon)"
      rm -f "$pidfile"
    fi
  done
  (setsid dockerd >"$logfile" 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  echo "dockerd did not start; its log:"
  cat "$logfile"
  return 1
}

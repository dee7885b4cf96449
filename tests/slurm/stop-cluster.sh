#!/usr/bin/env bash
# Stop what tests/slurm/start-cluster.sh started, found by its pid files (never by process name):
# cancel the cluster's jobs, stop each slurmd and then whatever is left in that slurmd's own UTS
# namespace (job steps), slurmctld, munged. Safe to run again, or when nothing runs.
#   DSPREF_SLURM_DIR   the folder start-cluster.sh used (default /tmp/dspref-slurm)
set -uo pipefail

DIR=${DSPREF_SLURM_DIR:-/tmp/dspref-slurm}
export SLURM_CONF=$DIR/slurm.conf
[ "$(id -u)" -eq 0 ] || { echo "stop-cluster: needs root" >&2; exit 1; }

# pid_of PIDFILE: the pid in PIDFILE if that process is alive and its command line names DIR
pid_of() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/" && echo "$pid"
}

# stop PID NAME: SIGTERM, up to 10 s, then SIGKILL
stop() {
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 100); do [ -e "/proc/$1" ] || break; sleep 0.1; done
  if [ -e "/proc/$1" ]; then echo "stop-cluster: $2 ($1) still runs after 10 s: SIGKILL" >&2; kill -KILL "$1" 2>/dev/null; fi
  echo "stop-cluster: stopped $2 ($1)"
}

if pid_of "$DIR/run/slurmctld.pid" >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    scancel $jobs 2>/dev/null
    for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

own_uts=$(readlink /proc/self/ns/uts)
for pidfile in "$DIR"/run/slurmd-*.pid; do
  [ -e "$pidfile" ] || continue
  node=${pidfile##*/slurmd-}; node=${node%.pid}
  if pid=$(pid_of "$pidfile"); then
    uts=$(readlink "/proc/$pid/ns/uts")
    stop "$pid" "slurmd $node"
    if [ -n "$uts" ] && [ "$uts" != "$own_uts" ]; then  # the node's namespace, never the host's
      for proc in /proc/[0-9]*; do
        [ "$(readlink "$proc/ns/uts" 2>/dev/null)" = "$uts" ] || continue
        echo "stop-cluster: left over in node $node: ${proc#/proc/} ($(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null | cut -c1-80)): SIGKILL"
        kill -KILL "${proc#/proc/}" 2>/dev/null
      done
    fi
  fi
  rm -f "$pidfile"
done
for daemon in slurmctld munged; do
  pid=$(pid_of "$DIR/run/$daemon.pid") && stop "$pid" "$daemon"
  rm -f "$DIR/run/$daemon.pid"
done
exit 0

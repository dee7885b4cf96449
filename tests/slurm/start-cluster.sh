#!/usr/bin/env bash
# Start a small, real SLURM cluster on this machine for tests/test_slurm.py: munged, slurmctld
# and two slurmd nodes n1 and n2, all on 127.0.0.1 (each slurmd on its own port). Each slurmd runs
# in its own UTS + mount namespace, where the hostname is the node's name and /etc/hosts (a
# bind mount of our own file) resolves n1 and n2 to 127.0.0.1; jobs inherit that view. Nothing
# outside $DSPREF_SLURM_DIR is written (the host's /etc/hosts and /etc/slurm are left alone).
#
# Needs root. Installs slurm-wlm and munge with apt-get when they are missing. Idempotent: a
# daemon that already runs (by its pid file) is kept. Exits 0 once both nodes are idle, else
# non-zero with the reason on stderr. Then: export SLURM_CONF=$DSPREF_SLURM_DIR/slurm.conf
# Undo with tests/slurm/stop-cluster.sh.
#
#   DSPREF_SLURM_DIR   state, logs, config, pid files (default /tmp/dspref-slurm)
#   DSPREF_SLURM_PORT  slurmctld port; the slurmd of node i listens on PORT+i (default 7117)
set -euo pipefail

DIR=${DSPREF_SLURM_DIR:-/tmp/dspref-slurm}
PORT=${DSPREF_SLURM_PORT:-7117}
NODES="n1 n2"
fail() { echo "start-cluster: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (starts munged, slurmctld and slurmd)"

missing=""
for cmd in munged mungekey slurmctld slurmd sbatch scontrol sinfo unshare; do
  command -v "$cmd" >/dev/null 2>&1 || missing="$missing $cmd"
done
if [ -n "$missing" ]; then
  echo "start-cluster: missing:$missing; installing slurm-wlm and munge with apt-get" >&2
  command -v apt-get >/dev/null 2>&1 || fail "no apt-get to install slurm-wlm and munge with"
  mkdir -p "$DIR"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends slurm-wlm munge util-linux \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge util-linux; }
  } >"$DIR/apt.log" 2>&1 || { tail -n 15 "$DIR/apt.log" >&2; fail "apt-get install slurm-wlm munge failed (log: $DIR/apt.log)"; }
fi

mkdir -p "$DIR"/{run,log,state,munge}
chmod 755 "$DIR" "$DIR/munge"   # munged refuses a socket folder that others cannot reach

# running PIDFILE: the pid in PIDFILE is a live process whose command line names this cluster's DIR
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/"
}

# munge: our own key and socket, so a munged of the host (or of another cluster) is never touched
SOCKET=$DIR/munge/socket
[ -s "$DIR/munge/key" ] || mungekey --create --keyfile="$DIR/munge/key"
chmod 600 "$DIR/munge/key"
if ! running "$DIR/run/munged.pid"; then
  munged --socket="$SOCKET" --key-file="$DIR/munge/key" --pid-file="$DIR/run/munged.pid" \
         --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" || fail "munged did not start"
fi

# the hardware slurmd sees; both nodes declare it (they share it), memory a little under
hw=$(slurmd -C | head -n1)
field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
mem=$(( $(field RealMemory) * 9 / 10 ))
cpus="CPUs=$(field CPUs) Boards=$(field Boards) SocketsPerBoard=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore)"

printf '127.0.0.1 localhost %s\n' "$NODES" >"$DIR/hosts"
CONF=$DIR/slurm.conf
{
  echo "# written by tests/slurm/start-cluster.sh"
  echo "ClusterName=dspreftest"
  echo "SlurmctldHost=localhost(127.0.0.1)"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "AuthType=auth/munge"
  echo "CredType=cred/munge"
  # cred_expire: a requeued job is held (BeginTime) for cred_expire + 1 s before it may start again;
  # the default, 120 s, would double the test's time. Do not shorten that hold by forcing the
  # start (scontrol update StartTime=now): the new run's launch credential must be created in a
  # later second than the old run's revocation, else slurmd refuses the batch launch ("Job N
  # already killed, do not launch batch job"; slurmctld: "Killing non-startable batch JobId=N:
  # Job credential revoked") and the requeued job ends FAILED before its script runs (issue #7).
  # 10 s still leaves a credential ample time to reach a slurmd here (an older one is refused).
  echo "AuthInfo=socket=$SOCKET,cred_expire=10"
  echo "SlurmctldPort=$PORT"
  echo "SlurmdPort=$((PORT + 1))"
  echo "StateSaveLocation=$DIR/state"
  echo "SlurmdSpoolDir=$DIR/state/%n"
  echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
  echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
  echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
  echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
  echo "SlurmctldDebug=debug"   # job launch, requeue and credential decisions, for a failed test's report
  echo "SlurmdDebug=debug"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "SchedulerParameters=sched_interval=2"
  echo "JobAcctGatherType=jobacct_gather/none"
  echo "AccountingStorageType=accounting_storage/none"
  echo "MpiDefault=none"
  echo "SwitchType=switch/none"
  echo "MailProg=/bin/true"
  echo "ReturnToService=2"
  echo "KillWait=30"
  echo "TreeWidth=65533"  # no forwarding through slurmd: every node shares 127.0.0.1
  echo "MinJobAge=600"
  i=0
  for node in $NODES; do
    i=$((i + 1))
    echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node Port=$((PORT + i)) $cpus RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$CONF.new"
if [ -f "$CONF" ] && ! cmp -s "$CONF" "$CONF.new" && running "$DIR/run/slurmctld.pid"; then
  rm -f "$CONF.new"
  fail "a cluster with another configuration runs from $DIR; stop it first (tests/slurm/stop-cluster.sh)"
fi
mv "$CONF.new" "$CONF"
export SLURM_CONF=$CONF

wait_pidfile() {  # wait_pidfile FILE NAME LOG
  for _ in $(seq 100); do running "$1" && return 0; sleep 0.1; done
  tail -n 15 "$3" >&2 2>/dev/null; fail "$2 did not start (log: $3)"
}
# A daemon started afresh writes a fresh log (the one before is kept as .prev), so its log holds
# this cluster's jobs only.
fresh_log() { [ -f "$1" ] && mv -f "$1" "$1.prev"; return 0; }
if ! running "$DIR/run/slurmctld.pid"; then
  fresh_log "$DIR/log/slurmctld.log"
  slurmctld -c -f "$CONF"   # -c: no jobs or node states from an earlier cluster
  wait_pidfile "$DIR/run/slurmctld.pid" slurmctld "$DIR/log/slurmctld.log"
fi
for node in $NODES; do
  pidfile=$DIR/run/slurmd-$node.pid
  running "$pidfile" && continue
  mkdir -p "$DIR/state/$node"
  fresh_log "$DIR/log/slurmd-$node.log"
  unshare --uts --mount --propagation private -- \
    sh -c "mount --bind '$DIR/hosts' /etc/hosts && hostname $node && exec slurmd -f '$CONF' -N $node" \
    || fail "slurmd $node did not start (log: $DIR/log/slurmd-$node.log)"
  wait_pidfile "$pidfile" "slurmd $node" "$DIR/log/slurmd-$node.log"
done

for _ in $(seq 120); do
  states=$(sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$states" = "n1=idle n2=idle " ] && { echo "start-cluster: up ($states) SLURM_CONF=$CONF"; exit 0; }
  for node in $NODES; do  # a node left down by an earlier cluster in the same folder
    case $states in *"$node=down"*|*"$node=drain"*) scontrol update nodename="$node" state=resume 2>/dev/null || true;; esac
  done
  sleep 0.5
done
tail -n 10 "$DIR"/log/*.log >&2 2>/dev/null
fail "nodes not idle after 60 s: ${states:-no answer from slurmctld}"

#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on localhost, for tests (tests/test_slurm.py) and for
# trying the sbatch templates by hand. Needs root and Debian's slurmctld, slurmd, slurm-client
# and munge (install them with scripts/ci/slurm.sh).
#
#   scripts/slurm/local_cluster.sh start STATE_DIR   # write STATE_DIR/slurm.conf, start the daemons
#   export SLURM_CONF=STATE_DIR/slurm.conf          # point sbatch / squeue / sinfo / srun at it
#   sbatch --array=0-1 scripts/slurm/cache_array.sbatch out=/tmp/acts model=tiny tokens=3000
#   scripts/slurm/local_cluster.sh stop STATE_DIR    # cancel its jobs, stop the daemons (pid files)
#   scripts/slurm/local_cluster.sh status STATE_DIR  # exit 0 when the controller answers
#
# Everything lives under STATE_DIR: slurm.conf, a private munge key and socket, state and spool
# folders, pid files and logs (STATE_DIR/log/*.log). Nothing under /etc is changed and the
# system's own munged (if any) is not touched, so several clusters can run side by side: each
# takes the first free pair of TCP ports from LOCAL_CLUSTER_PORT (default 6817) upwards.
#
# The node is `hostname -s` at 127.0.0.1 with the CPU layout `slurmd -C` reports, in one
# partition (LOCAL_CLUSTER_PARTITION, default "debug"). No accounting (slurmdbd): sacct does not work,
# read job states with squeue / scontrol show job (kept MinJobAge seconds after the end).
# `start` waits until sinfo shows the node idle (at most LOCAL_CLUSTER_TIMEOUT seconds, default 60)
# and stops what it started if it fails.
set -euo pipefail

usage() {
  sed -n '2,21p' "$0" >&2
  exit 2
}

[ $# -eq 2 ] || usage
command=$1
state=$2

conf="$state/slurm.conf"
log="$state/log"
run="$state/run"
munge_socket="$run/munge.socket"

# Stop one daemon by its pid file: TERM, wait up to 10 s, then KILL. Only that pid is signalled.
stop_pid_file() {
  local name=$1 pid_file=$2 pid
  [ -f "$pid_file" ] || return 0
  pid=$(cat "$pid_file")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "local_cluster: $name (pid $pid) ignored TERM: killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pid_file"
}

queue_empty() {
  [ -z "$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null)" ]
}

stop() {
  # Cancel what is still queued or running, so that no job step outlives the daemons.
  if [ -f "$conf" ] && SLURM_CONF=$conf scontrol ping >/dev/null 2>&1; then
    SLURM_CONF=$conf scancel --user="$(id -un)" 2>/dev/null || true
    wait_for 30 "cancelled jobs to end" queue_empty || true
  fi
  # slurmd first (it may still be reporting to the controller), munged last (both use it).
  stop_pid_file slurmd "$run/slurmd.pid"
  stop_pid_file slurmctld "$run/slurmctld.pid"
  stop_pid_file munged "$run/munged.pid"
}

port_in_use() {
  (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port_pair() {
  local port=${LOCAL_CLUSTER_PORT:-6817}
  while port_in_use "$port" || port_in_use "$((port + 1))"; do
    port=$((port + 2))
    [ "$port" -lt 65000 ] || { echo "local_cluster: no free port pair" >&2; return 1; }
  done
  echo "$port"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s
  local seconds=$1 what=$2
  shift 2
  local tries=$((seconds * 10))
  for _ in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "local_cluster: timed out after ${seconds}s waiting for $what" >&2
  return 1
}

node_idle() {
  [ "$(SLURM_CONF=$conf sinfo -h -N -o %t 2>/dev/null)" = "idle" ]
}

show_logs() {
  local file
  for file in "$log"/*.log; do
    [ -f "$file" ] || continue
    echo "---- $file (last 20 lines)" >&2
    tail -n 20 "$file" >&2
  done
}

write_conf() {
  local host node_line port partition
  host=$(hostname -s)
  # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  node_line=$(slurmd -C | head -n 1)
  case "$node_line" in
    "NodeName=$host "*) ;;
    *) echo "local_cluster: unexpected \`slurmd -C\` output: $node_line" >&2; return 1 ;;
  esac
  port=$(free_port_pair)
  partition=${LOCAL_CLUSTER_PARTITION:-debug}
  cat >"$conf" <<CONF
# Written by scripts/slurm/local_cluster.sh: a single-node test cluster on localhost.
ClusterName=clt-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$log/slurmctld.log
SlurmdLogFile=$log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

start_failed() {
  echo "local_cluster: start failed; stopping what was started" >&2
  show_logs
  stop
}

start() {
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || {
      echo "local_cluster: $tool not found: install SLURM with scripts/ci/slurm.sh" >&2
      exit 1
    }
  done
  if [ -f "$run/slurmctld.pid" ] && kill -0 "$(cat "$run/slurmctld.pid")" 2>/dev/null; then
    echo "local_cluster: already running in $state (stop it first)" >&2
    exit 1
  fi
  mkdir -p "$state" "$log" "$run" "$state/ctld" "$state/spool"
  chmod 700 "$state" "$run"
  trap start_failed EXIT

  # A private munge key, daemon and socket (the slurm.conf AuthInfo=socket= points at it).
  [ -f "$state/munge.key" ] || dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 status=none
  chmod 600 "$state/munge.key"
  munged --force --key-file="$state/munge.key" --socket="$munge_socket" --pid-file="$run/munged.pid" \
    --log-file="$log/munged.log" --seed-file="$run/munged.seed"
  wait_for 10 munged test -S "$munge_socket"

  write_conf
  SLURM_CONF=$conf slurmctld -c -f "$conf"
  wait_for 20 slurmctld env SLURM_CONF="$conf" scontrol ping
  SLURM_CONF=$conf slurmd -f "$conf"
  wait_for "${LOCAL_CLUSTER_TIMEOUT:-60}" "the node to be idle" node_idle
  trap - EXIT
  echo "local_cluster: up ($(SLURM_CONF=$conf sinfo -h -o '%P %D %c %t')); export SLURM_CONF=$conf"
}

case "$command" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$conf scontrol ping ;;
  *) usage ;;
esac

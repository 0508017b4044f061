#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the tests and for trying the sbatch scripts.
#
#   tools/local_slurm.sh install        apt packages (root; does nothing when they are there)
#   tools/local_slurm.sh up   [DIR]     munged + slurmctld + slurmd, config and state under DIR;
#                                       waits until the node is idle, then prints the line to
#                                       source (export SLURM_CONF=...)
#   tools/local_slurm.sh down [DIR]     cancel the jobs, stop every daemon by its PID, remove DIR
#   tools/local_slurm.sh status [DIR]   sinfo and squeue of that cluster
#
# DIR defaults to $MEL_SLURM_DIR, else /tmp/mel-slurm-$UID. Several clusters can run on one
# machine (each has its own DIR and free ports). Debian's Slurm 22.05 runs as root
# here, without systemd or cgroups: munged has its own key and socket, every address is
# 127.0.0.1, processes are tracked by parentage (proctrack/linuxproc), and the node declares
# MEL_SLURM_CPUS CPUs (default 8) whatever the machine has (SlurmdParameters=config_overrides),
# so jobs with more tasks than cores still start. The daemons exit 0 even when they fail, so
# `up` trusts only the node's state (idle) and shows the logs when it never gets there.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
CMD=${1:-}
DIR=${2:-${MEL_SLURM_DIR:-/tmp/mel-slurm-$(id -u)}}
CPUS=${MEL_SLURM_CPUS:-8}
READY_TIMEOUT_S=${MEL_SLURM_READY_TIMEOUT_S:-60}

die() {
  echo "error: $*" >&2
  exit 1
}

have_binaries() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v sbatch >/dev/null && command -v munged >/dev/null
}

install() {
  if have_binaries; then
    echo "local_slurm: Slurm and munge are installed"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "Slurm is not installed and this machine has no apt-get"
  echo "local_slurm: installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  have_binaries || die "apt-get installed ${PACKAGES[*]} but the daemons are not on PATH"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
  local host node ctld_port slurmd_port
  host=$(hostname -s)
  # The node is named after the host, as on a real cluster: job scripts resolve node names.
  node=$host
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
  echo "$node" >"$DIR/node_name"
  cat >"$DIR/slurm.conf" <<EOF
# Written by tools/local_slurm.sh: a one-node cluster on 127.0.0.1.
ClusterName=mel
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
# Seconds between SIGTERM and SIGKILL on scancel / time limit: room for a final checkpoint.
KillWait=60
# Finished jobs stay visible to scontrol/squeue this long (there is no accounting database).
MinJobAge=600
NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  mkdir -p "$DIR/munge"
  chmod 700 "$DIR/munge"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  local _
  for _ in $(seq 50); do
    if [[ -S $DIR/munge/munge.socket && -s $DIR/munge/munged.pid ]]; then return 0; fi
    sleep 0.1
  done
  cat "$DIR/log/munged.log" >&2 || true
  die "munged did not start (log above)"
}

node_state() {
  SLURM_CONF=$DIR/slurm.conf sinfo -h -n "$(cat "$DIR/node_name")" -o %T 2>/dev/null || true
}

up() {
  install
  if [[ -f $DIR/slurm.conf ]] && [[ $(node_state) == idle* ]]; then
    echo "export SLURM_CONF=$DIR/slurm.conf"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || die "the local cluster runs its daemons as root (SlurmUser=root)"
  mkdir -p "$DIR"/{state,spool,log}
  write_config
  start_munge
  export SLURM_CONF=$DIR/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N "$(cat "$DIR/node_name")"
  local waited=0 state=""
  while ((waited < READY_TIMEOUT_S * 10)); do
    state=$(node_state)
    if [[ $state == idle* ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  tail -n 20 "$DIR"/log/*.log >&2 || true
  down >/dev/null 2>&1 || true
  die "the local Slurm node is not idle after ${READY_TIMEOUT_S}s (state '${state:-none}'; logs above)"
}

stop_pid_file() {
  local file=$1 pid _
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || return 0
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

down() {
  [[ -d $DIR ]] || return 0
  if [[ -f $DIR/slurm.conf ]]; then
    export SLURM_CONF=$DIR/slurm.conf
    scancel --full --quiet --user=root 2>/dev/null || true
    local _
    for _ in $(seq 100); do
      [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
      sleep 0.1
    done
  fi
  stop_pid_file "$DIR/slurmd.pid"
  stop_pid_file "$DIR/slurmctld.pid"
  stop_pid_file "$DIR/munge/munged.pid"
  rm -rf "$DIR"
}

status() {
  export SLURM_CONF=$DIR/slurm.conf
  sinfo
  squeue
}

case "$CMD" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: tools/local_slurm.sh install|up|down|status [DIR]" ;;
esac

#!/usr/bin/env bash
# Runs N processes of `python -m one_jax.main ARGS...` on this machine, as one multi-process
# JAX run over CPU devices (gloo collectives): what a TPU pod or a GPU cluster does, on a laptop.
#
#   bash launch/local.sh N ARGS...
#   bash launch/local.sh 2 --config=configs/step1.py:three_branch,smoke --workdir=runs/mp
#
# Every process gets K fake CPU devices, so the global mesh has N * K devices; the config's
# batch_size stays the global batch over all of them. Process 0 prints and writes the logs,
# metrics and plots; all processes write the checkpoints together (into the same --workdir).
# The script waits for all processes and exits with the first non-zero status, stopping the
# others as soon as one fails. Ctrl-C (or SIGTERM to this script) stops every process after
# its step in flight with a checkpoint (exit status 75); the same command then resumes.
#
# Variables (all optional):
#   ONE_JAX_LOCAL_DEVICES  K, CPU devices per process (default 2)
#   PYTHON                 the interpreter (default: python3, else python, from PATH)
#   ONE_JAX_PORT           coordinator port on 127.0.0.1 (default: a free port)
#   ONE_JAX_LOG_DIR        if set, process i writes its output to $ONE_JAX_LOG_DIR/process_i.log
#                          instead of this terminal
#   JAX_PLATFORMS          default cpu (this launcher fakes CPU devices)
set -euo pipefail

usage() {
  echo "usage: bash launch/local.sh N ARGS...   (N processes of python -m one_jax.main ARGS...)" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
num_processes=$1
shift
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N=$num_processes must be a positive integer (the number of processes)" >&2
  usage
fi
devices=${ONE_JAX_LOCAL_DEVICES:-2}
if ! [[ $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "error: ONE_JAX_LOCAL_DEVICES=$devices must be a positive integer" >&2
  exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=$(command -v python3 || command -v python || true)
fi
if [[ -z $PYTHON ]] || ! command -v "$PYTHON" > /dev/null; then
  echo "error: no Python interpreter found: set PYTHON=/path/to/python" >&2
  exit 2
fi
port=${ONE_JAX_PORT:-}
if [[ -z $port ]]; then
  port=$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
fi
if [[ -n ${ONE_JAX_LOG_DIR:-} ]]; then
  mkdir -p "$ONE_JAX_LOG_DIR"
fi

# Run from the repository root so that `-m one_jax.main` and configs/ resolve.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each process in its own process group (job control), so that a Ctrl-C in the terminal
# reaches only this script, which passes one SIGTERM to every process: they stop after the
# step in flight with a checkpoint and exit 75 (rerun the same command to resume). A second
# Ctrl-C passes a second SIGTERM, which stops them at once.
set -m
pids=()
running=()
interrupted=0
forward_stop() {
  interrupted=1
  local i
  for i in "${!pids[@]}"; do
    if [[ ${running[$i]} == 1 ]]; then
      kill -TERM "${pids[$i]}" 2> /dev/null || true
    fi
  done
}
trap forward_stop INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    export ONE_JAX_COORDINATOR="127.0.0.1:$port"
    export ONE_JAX_NUM_PROCESSES=$num_processes
    export ONE_JAX_PROCESS_ID=$i
    if [[ -n ${ONE_JAX_LOG_DIR:-} ]]; then
      exec "$PYTHON" -m one_jax.main "$@" > "$ONE_JAX_LOG_DIR/process_$i.log" 2>&1
    else
      exec "$PYTHON" -m one_jax.main "$@"
    fi
  ) &
  pids+=("$!")
  running+=(1)
done
set +m  # the groups stay; no job notices from here on

# Wait for every process. The first failure (not a stop on a signal) stops the others: they
# would wait for the failed one in their next collective. SIGTERM first, SIGKILL 10 s later.
# (Bash's own notices of killed processes go to /dev/null; messages to fd 3, the stderr.)
status=0
remaining=$num_processes
kill_at=0
exec 3>&2
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    if [[ ${running[$i]} == 1 ]] && ! kill -0 "${pids[$i]}" 2> /dev/null; then
      rc=0
      wait "${pids[$i]}" || rc=$?
      running[i]=0
      remaining=$((remaining - 1))
      if [[ $rc -ne 0 && $status -eq 0 ]]; then
        status=$rc
        if [[ $interrupted == 0 && $remaining -gt 0 ]]; then
          echo "error: process $i of the local run exited with status $rc; stopping the others" >&3
          forward_stop
          kill_at=$((SECONDS + 10))
        fi
      fi
    fi
  done
  if ((kill_at > 0 && SECONDS >= kill_at)); then
    for i in "${!pids[@]}"; do
      if [[ ${running[$i]} == 1 ]]; then
        kill -KILL "${pids[$i]}" 2> /dev/null || true
      fi
    done
    kill_at=0
  fi
  if ((remaining > 0)); then
    sleep 0.2
  fi
done 2> /dev/null
exit "$status"

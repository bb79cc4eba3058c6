# shellcheck shell=bash
# Shared by slurm/pretrain.sh and slurm/finetune.sh (sourced, never run on its own).
#
# dtrain_launch ENTRY DEFAULT_CONFIG runs one srun task per node; each runs `python -m launch.torchrun ENTRY ...`,
# which starts torchrun with a c10d rendezvous on the job's first node (see launch/torchrun.py for the port, the
# rendezvous id and the processes per node). The configuration comes from named environment variables:
#   DTRAIN_CONFIG           YAML config (default: DEFAULT_CONFIG); relative paths are relative to the submit dir
#   DTRAIN_OVERRIDES        key=value overrides, separated by spaces (values cannot contain spaces)
#   DTRAIN_RUN_DIR          run dir (default: the config's run_dir); logs go to <run dir>/logs/slurm-<job id>.log
#   DTRAIN_PYTHON           the Python that has dtrain installed (default: python3 on PATH)
#   DTRAIN_NPROC_PER_NODE   processes per node (default: the GPUs Slurm granted, else 1 CPU process)
#   DTRAIN_RDZV_HOST        rendezvous host (default: the first node of the job)
#   DTRAIN_RDZV_PORT        rendezvous port on that host (default: 15000 + job id mod 15000)
#   DTRAIN_MAX_RESTARTS     torchrun restarts of failed workers (default 0)
#   DTRAIN_SHUTDOWN_TIMEOUT seconds torchrun waits for workers to save after a signal (default 300)
#
# Preemption: the job script asks for --signal=B:USR2@120 (and --requeue). The trap below forwards USR2 (or TERM) to
# the srun step; srun passes it to every torchrun, torchrun to its workers; the workers agree through a collective,
# save a checkpoint at the next step boundary and exit. After USR2 the job requeues itself (scontrol requeue) when
# the run saved for a resume (state preempted; not when it finished, stopped or failed meanwhile); the rerun resumes
# from checkpoints/latest. TERM alone (scancel, time limit) saves and stops without requeueing. The run's state comes
# from <run dir>/status.json, written by dtrain and settled by launch/status.py (its table: each state's handling).

dtrain_die() {
    echo "dtrain-slurm: error: $*" >&2
    exit 2
}

_dtrain_forward() {
    local sig=$1
    [[ $sig == USR2 ]] && DTRAIN_REQUEUE=1
    echo "dtrain-slurm: caught SIG$sig; asking the training processes to save at the next step and stop"
    if [[ -n ${DTRAIN_STEP_PID:-} ]]; then
        kill -s "$sig" "$DTRAIN_STEP_PID" 2>/dev/null || true
    fi
}


dtrain_launch() {
    local entry=$1 config=${DTRAIN_CONFIG:-$2}
    DTRAIN_PY=${DTRAIN_PYTHON:-python3}
    command -v "$DTRAIN_PY" >/dev/null || dtrain_die "DTRAIN_PYTHON=$DTRAIN_PY: not found; set it to the Python of the environment that has dtrain installed (e.g. \$PWD/.venv/bin/python)"
    [[ -f $config ]] || dtrain_die "DTRAIN_CONFIG=$config: no such file (relative paths start at $PWD)"
    local -a overrides=()
    read -r -a overrides <<<"${DTRAIN_OVERRIDES:-}"
    local run_dir=${DTRAIN_RUN_DIR:-}
    if [[ -n $run_dir ]]; then
        overrides+=("run_dir=$run_dir")
    else
        run_dir=$("$DTRAIN_PY" -m dtrain config show --config "$config" "${overrides[@]}" --get run_dir) \
            || dtrain_die "DTRAIN_CONFIG=$config with DTRAIN_OVERRIDES='${DTRAIN_OVERRIDES:-}' does not resolve (see above)"
    fi
    mkdir -p "$run_dir/logs"
    local job=${SLURM_JOB_ID:-local} attempt=${SLURM_RESTART_COUNT:-0}
    exec > >(tee -a "$run_dir/logs/slurm-$job.log") 2>&1
    echo "dtrain-slurm: $(date -Is) job $job attempt $((attempt + 1)) (SLURM_RESTART_COUNT=$attempt) on" \
        "${SLURM_JOB_NODELIST:-$(hostname)}: $entry --config $config ${overrides[*]}"

    DTRAIN_REQUEUE=0
    DTRAIN_STEP_PID=
    trap '_dtrain_forward USR2' USR2
    trap '_dtrain_forward TERM' TERM
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$DTRAIN_PY" -m launch.torchrun "$entry" --config "$config" "${overrides[@]}" &
    DTRAIN_STEP_PID=$!
    local rc
    while true; do  # a trapped signal interrupts `wait`: wait again until srun has really ended
        rc=0
        wait "$DTRAIN_STEP_PID" || rc=$?
        kill -0 "$DTRAIN_STEP_PID" 2>/dev/null || break
    done
    DTRAIN_STEP_PID=

    # the state after the step: a `running` left by a killed rank 0 is recorded as failed (launch/status.py)
    local settled state description
    settled=$("$DTRAIN_PY" -m launch.status "$run_dir" "$rc") || settled=unknown
    state=${settled%%$'\n'*}
    description=${settled#*$'\n'}
    echo "dtrain-slurm: $(date -Is) training ended (exit status $rc), run state: ${description:-$state}"
    if [[ $DTRAIN_REQUEUE == 1 ]]; then
        if [[ $state == preempted ]]; then
            echo "dtrain-slurm: requeueing job $job; the next attempt resumes from $run_dir/checkpoints/latest"
            scontrol requeue "$job"
            exit 0
        fi
        echo "dtrain-slurm: not requeueing job $job: the run is $state, not preempted"
    fi
    [[ $state == finished || $state == stopped ]] && exit 0
    exit "$rc"
}

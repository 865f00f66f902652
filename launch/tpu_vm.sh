#!/usr/bin/env bash
# Run one vit_jax training job on a Cloud TPU VM slice, start to finish:
#   1. pack this checkout            4. install it (Python 3.11 venv + `.[tpu]`) on every worker
#   2. request the slice             5. run `python -m vit_jax.main` on every worker, logs streamed here
#      (a queued resource)           6. copy the logs out (checkpoints/TensorBoard stay in the gs:// workdir)
#   3. wait until it is ACTIVE       7. delete the slice (also on failure or Ctrl-C, unless --keep)
#
#   launch/tpu_vm.sh --name vit-l16 --zone us-central2-b --accelerator-type v4-512 \
#       --config configs/vit_l16.py --workdir gs://my-bucket/vit_l16 -- --config.mesh.fsdp=8
#
# Arguments after `--` go to vit_jax.main unchanged, identical on every worker. `--dry-run` prints every
# command (gcloud, tar) instead of running it. Check that the job fits first:
#   python -m vit_jax.plan --config=configs/vit_l16.py --topology=v4:4x8x8      (v4-512 = 256 chips)
# See launch/README.md for a whole pre-training and fine-tuning walk-through.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then  # ${x@Q}, and empty arrays under set -u
  echo "error: launch/tpu_vm.sh needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE --workdir DIR
                        [--project PROJECT] [--runtime-version VERSION] [--spot | --reserved]
                        [--copy-in GS_URL=DIR]... [--setup COMMAND] [--env NAME=VALUE]... [--out DIR]
                        [--keep] [--dry-run]
                        [-- MAIN_ARGS...]

  --name              queued resource and TPU node name (lowercase letters, digits, '-')
  --zone              e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p), us-east5-b (v6e)
  --accelerator-type  v4-N (N TensorCores), v5litepod-N (N chips), v5p-N (N TensorCores), v6e-N (N chips)
  --config            a config file of this checkout, e.g. configs/vit_l16.py
  --workdir           checkpoints + TensorBoard; must be gs://... on a multi-host slice or with --spot
  --project           GCP project (default: gcloud's configured project)
  --runtime-version   TPU VM image (default: the one Google recommends for JAX on that generation)
  --spot, --reserved  request spot or reserved capacity
  --copy-in           copy the contents of a gs://... folder into DIR of the checkout on every worker
                      before the run, e.g. a pre-trained checkpoint for --config.pretrained=DIR (repeatable;
                      split at the last '=': the gs:// path may hold '=', DIR may not)
  --setup             one more shell command for every worker after the install, run in the checkout
                      (e.g. mount the dataset's bucket with gcsfuse: vit_jax reads datasets from local paths)
  --env               an environment variable for the run on every worker, e.g. XLA_FLAGS=--xla_dump_to=/tmp/x
                      (repeatable; LIBTPU_INIT_ARGS is added to the PRNG flag below, JAX_DEFAULT_PRNG_IMPL chooses
                      the PRNG as the local variable does)
  --out               local directory for the copied-out logs (default: tpu_runs/NAME)
  --keep              do not delete the slice at the end
  --dry-run           print the commands instead of running them
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

NAME="" ZONE="" ACCELERATOR_TYPE="" CONFIG="" WORKDIR="" PROJECT="" RUNTIME_VERSION="" OUT=""
CAPACITY="" KEEP=0 DRY_RUN=0 EXTRA_SETUP=""
MAIN_ARGS=() COPY_IN=() RUN_ENV=()
while (($#)); do
  case "$1" in
    --name | --zone | --accelerator-type | --config | --workdir | --project | --runtime-version | --out | --copy-in | --setup | --env)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE="$2" ;;
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --project) PROJECT="$2" ;;
        --runtime-version) RUNTIME_VERSION="$2" ;;
        --out) OUT="$2" ;;
        --copy-in) COPY_IN+=("$2") ;;
        --setup) EXTRA_SETUP="$2" ;;
        --env)
          [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
            die "--env '$2' is invalid: expected NAME=VALUE with NAME letters, digits and '_' (e.g. XLA_FLAGS=...)"
          RUN_ENV+=("$2")
          ;;
      esac
      shift 2
      ;;
    --spot) CAPACITY="--spot"; shift ;;
    --reserved) CAPACITY="--reserved"; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (arguments for vit_jax.main go after '--')" ;;
  esac
done

for required in NAME ZONE ACCELERATOR_TYPE CONFIG WORKDIR; do
  flag="--$(tr '[:upper:]_' '[:lower:]-' <<<"$required")"
  [[ -n "${!required}" ]] || { usage >&2; die "$flag is required"; }
done
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' is invalid: use lowercase letters, digits and '-', starting with a letter"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO/${CONFIG%%:*}" ]] || die "--config '$CONFIG' is not a file of this checkout ($REPO); e.g. configs/vit_l16.py"

# Chips per slice and the recommended image, from the accelerator type (v4 and v5p count TensorCores, 2 per chip).
[[ "$ACCELERATOR_TYPE" =~ ^(v4|v5litepod|v5p|v6e)-([1-9][0-9]*)$ ]] ||
  die "--accelerator-type '$ACCELERATOR_TYPE' is invalid: expected v4-N, v5litepod-N, v5p-N or v6e-N (e.g. v4-512)"
GENERATION="${BASH_REMATCH[1]}"
SIZE="${BASH_REMATCH[2]}"
case "$GENERATION" in
  v4) CHIPS=$((SIZE / 2)); CHIPS_PER_HOST=4; DEFAULT_RUNTIME="tpu-ubuntu2204-base" ;;
  v5p) CHIPS=$((SIZE / 2)); CHIPS_PER_HOST=4; DEFAULT_RUNTIME="v2-alpha-tpuv5" ;;
  v5litepod) CHIPS=$SIZE; CHIPS_PER_HOST=$((SIZE <= 8 ? SIZE : 4)); DEFAULT_RUNTIME="v2-alpha-tpuv5-lite" ;;
  v6e) CHIPS=$SIZE; CHIPS_PER_HOST=$((SIZE <= 8 ? SIZE : 4)); DEFAULT_RUNTIME="v2-alpha-tpuv6e" ;;
esac
((CHIPS >= 1)) || die "--accelerator-type '$ACCELERATOR_TYPE' has no whole chip"
if [[ "$GENERATION" == v4 || "$GENERATION" == v5p ]] && ((SIZE % 2)); then
  die "--accelerator-type '$ACCELERATOR_TYPE' is invalid: $GENERATION-N counts TensorCores, 2 per chip: N is even (e.g. $GENERATION-8)"
fi
HOSTS=$(((CHIPS + CHIPS_PER_HOST - 1) / CHIPS_PER_HOST))
RUNTIME_VERSION="${RUNTIME_VERSION:-$DEFAULT_RUNTIME}"
if ((HOSTS > 1)) && [[ "$WORKDIR" != gs://* ]]; then
  die "--workdir '$WORKDIR' is local, but $ACCELERATOR_TYPE has $HOSTS hosts that all write checkpoints: use gs://BUCKET/PATH"
fi
if [[ "$CAPACITY" == --spot && "$WORKDIR" != gs://* ]]; then
  die "--workdir '$WORKDIR' is local, but a preempted --spot slice loses its disk, and the checkpoints to resume from with it: use gs://BUCKET/PATH"
fi
OUT="${OUT:-tpu_runs/$NAME}"

GCLOUD_SCOPE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_SCOPE+=(--project="$PROJECT")
ARCHIVE="${TMPDIR:-/tmp}/vit_jax-$NAME.tar.gz"
REMOTE_LOG="vit_jax_run.log"

# A command as one copy-pasteable line: words that need quoting get bash's own quoting.
show() {
  local word line=""
  for word in "$@"; do
    if [[ "$word" =~ ^[-A-Za-z0-9_./:=@,+%]+$ ]]; then
      line+="$word "
    elif [[ "$word" =~ ^(--[a-z][-a-z]*=)(.*)$ ]]; then
      line+="${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q} "
    else
      line+="${word@Q} "
    fi
  done
  echo "${line% }"
}

run() {
  if ((DRY_RUN)); then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi
}

remote_quote() {
  local word line=""
  for word in "$@"; do line+="$(printf '%q' "$word") "; done
  echo "${line% }"
}

# Install: uv brings Python 3.11 (jax 0.10 needs >= 3.11; the TPU VM images ship 3.10), then the pinned versions.
SETUP_COMMAND="set -euo pipefail; rm -rf ~/vit_jax && mkdir -p ~/vit_jax && tar -xzf ~/vit_jax.tar.gz -C ~/vit_jax \
&& cd ~/vit_jax && python3 -m pip install --user --quiet uv && ~/.local/bin/uv venv --quiet --python 3.11 .venv \
&& ~/.local/bin/uv pip install --quiet --python .venv/bin/python -c constraints.txt -e '.[tpu]'"

# Inputs from GCS (e.g. a pre-trained checkpoint) into the checkout on every worker: vit_jax reads local paths.
for spec in "${COPY_IN[@]}"; do
  [[ "$spec" =~ ^(gs://.+)=([^=]+)$ ]] ||  # the last '=': gs://b/lr=0.1/ckpt=DIR
    die "--copy-in '$spec' is invalid: expected gs://BUCKET/PATH=DIR (DIR relative to the checkout on the worker)"
  src="${BASH_REMATCH[1]%/}" dest="${BASH_REMATCH[2]}"
  [[ "$dest" != /* && "$dest" != *..* ]] || die "--copy-in '$spec': DIR must be relative, inside the checkout"
  SETUP_COMMAND+=" && mkdir -p $(remote_quote "$dest") && gcloud storage cp --recursive $(remote_quote "$src/*") \
$(remote_quote "$dest/")"
done
# On lines of its own: a '#' comment in it must not swallow the closing brace.
[[ -z "$EXTRA_SETUP" ]] || SETUP_COMMAND+=$' && {\n'"$EXTRA_SETUP"$'\n}'

# Run: the same command on every worker; jax.distributed finds its peers from the TPU metadata by itself.
# The PRNG set-up `vit_jax.plan` compiles with (vit_jax.plan.use_tpu_prng): rbg makes dropout masks cheap on
# TPU, and the libtpu flag lets each chip draw only its own shard's bits (else every chip draws the global
# batch's: gigabytes per layer). A run resumes only under the PRNG it started with: keep JAX_DEFAULT_PRNG_IMPL
# the same for every launch of one workdir.
# --env's variables follow; its LIBTPU_INIT_ARGS goes after the PRNG flag (libtpu reads both), its
# JAX_DEFAULT_PRNG_IMPL counts as the local variable.
PRNG_IMPL="${JAX_DEFAULT_PRNG_IMPL:-rbg}" LIBTPU_ARGS="" OTHER_ENV=()
for assignment in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
  case "${assignment%%=*}" in
    JAX_DEFAULT_PRNG_IMPL) PRNG_IMPL="${assignment#*=}" ;;
    LIBTPU_INIT_ARGS) LIBTPU_ARGS="${assignment#*=}" ;;
    *) OTHER_ENV+=("$assignment") ;;
  esac
done
[[ "$PRNG_IMPL" =~ ^(rbg|unsafe_rbg|threefry2x32)$ ]] ||
  die "JAX_DEFAULT_PRNG_IMPL='$PRNG_IMPL' is invalid: expected rbg (default), unsafe_rbg or threefry2x32"
[[ "$PRNG_IMPL" == threefry2x32 ]] || LIBTPU_ARGS="--xla_tpu_spmd_rng_bit_generator_unsafe=true${LIBTPU_ARGS:+ $LIBTPU_ARGS}"
EXPORTS=("JAX_DEFAULT_PRNG_IMPL=$PRNG_IMPL")
[[ -z "$LIBTPU_ARGS" ]] || EXPORTS+=("LIBTPU_INIT_ARGS=$LIBTPU_ARGS")
EXPORTS+=(${OTHER_ENV[@]+"${OTHER_ENV[@]}"})
TRAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" "${MAIN_ARGS[@]}")
# A preemption sends SIGTERM to every process of the worker, tee too: tee ignores it and stays to the end, else the
# run's next line (the progress print of the step it stops at) fails on the broken pipe before the checkpoint save.
RUN_COMMAND="cd ~/vit_jax && set -o pipefail && export $(remote_quote "${EXPORTS[@]}") \
&& .venv/bin/python -m vit_jax.main $(remote_quote "${TRAIN_ARGS[@]}") \
2>&1 | (trap '' TERM HUP; exec tee ~/$REMOTE_LOG)"
if [[ "$WORKDIR" == gs://* ]]; then
  # Keep every worker's log next to its checkpoints, whether the run succeeded or not. The worker's shell gets the
  # preemption's SIGTERM too: a trap (not inherited by the run, which still gets it) keeps the shell for the upload.
  RUN_COMMAND="trap true TERM; $RUN_COMMAND; status=\$?; gcloud storage cp ~/$REMOTE_LOG \
$(remote_quote "${WORKDIR%/}")/logs/\$(hostname).log; exit \$status"
fi

delete_slice() {
  # On the way out (a trap): a failed delete says so and keeps the run's exit status.
  run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_SCOPE[@]}" --force --quiet ||
    echo "could not delete queued resource $NAME; delete it by hand: gcloud compute tpus queued-resources" \
      "delete $NAME ${GCLOUD_SCOPE[*]} --force" >&2
}

# Consecutive failures of `describe` before the wait gives up: a transient gcloud error must not end the wait (the
# EXIT trap would delete a slice queued for hours), a lasting one (the queued resource deleted, no permission)
# must not retry forever.
DESCRIBE_ATTEMPTS=10

wait_until_active() {
  local state="" failures=0 errors last_error
  if ((DRY_RUN)); then
    echo "# every 30 s until the state is ACTIVE:"
    show gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}" --format='value(state.state)'
    return
  fi
  errors="$(mktemp)"
  while [[ "$state" != ACTIVE ]]; do
    if ! state="$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}" \
      --format='value(state.state)' 2>"$errors")"; then
      cat "$errors" >&2
      failures=$((failures + 1))
      if ((failures == DESCRIBE_ATTEMPTS)); then
        last_error="$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1)"
        rm -f "$errors"
        die "describe $NAME failed $failures times in a row; gcloud's last error: ${last_error:-(none)}"
      fi
      echo "describe $NAME failed ($failures of $DESCRIBE_ATTEMPTS in a row); retrying in 30 s" >&2
      state=""
      sleep 30
      continue
    fi
    cat "$errors" >&2  # gcloud's warnings
    failures=0
    echo "queued resource $NAME: $state" >&2
    case "$state" in
      FAILED | SUSPENDING | SUSPENDED)
        rm -f "$errors"
        die "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME"
        ;;
      ACTIVE) ;;
      *) sleep 30 ;;
    esac
  done
  rm -f "$errors"
}

echo "# $ACCELERATOR_TYPE: $CHIPS chips on $HOSTS host(s), image $RUNTIME_VERSION" >&2
run tar -czf "$ARCHIVE" --exclude=./.venv --exclude=./.git --exclude=./workdir --exclude=./tpu_runs -C "$REPO" .
CREATE=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GCLOUD_SCOPE[@]}"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
[[ -z "$CAPACITY" ]] || CREATE+=("$CAPACITY")
run "${CREATE[@]}"
if ((KEEP == 0)) && ((DRY_RUN == 0)); then
  trap delete_slice EXIT
  trap 'exit 130' INT TERM
fi
wait_until_active
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:~/vit_jax.tar.gz" --worker=all "${GCLOUD_SCOPE[@]}"
((DRY_RUN)) || rm -f "$ARCHIVE"  # on the workers now
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_SCOPE[@]}" --command="$SETUP_COMMAND"
status=0
# Every worker at once: gcloud starts 64 at a time by default, and a slice of more hosts would wait in
# jax.distributed.initialize for workers that start only when the first 64 exit.
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --batch-size="$HOSTS" "${GCLOUD_SCOPE[@]}" \
  --command="$RUN_COMMAND" || status=$?
# The copies out keep the run's exit status (75: preempted) and do not stop one another: the log comes first, and
# a run that failed before it made its workdir still brings its log back.
run mkdir -p "$OUT"
if [[ "$WORKDIR" == gs://* ]]; then
  run gcloud storage cp --recursive "${WORKDIR%/}/logs" "$OUT/" || echo "# could not copy the logs out" >&2
else
  REMOTE_WORKDIR="$WORKDIR"
  # shellcheck disable=SC2088  # the tilde is for the worker's shell, not this one
  [[ "$WORKDIR" == /* || "$WORKDIR" == "~"* ]] || REMOTE_WORKDIR="~/vit_jax/$WORKDIR"  # vit_jax.main expands a ~
  run gcloud compute tpus tpu-vm scp "$NAME:~/$REMOTE_LOG" "$OUT/" --worker=0 "${GCLOUD_SCOPE[@]}" ||
    echo "# could not copy the log out" >&2
  run gcloud compute tpus tpu-vm scp --recurse "$NAME:$REMOTE_WORKDIR" "$OUT/" --worker=0 "${GCLOUD_SCOPE[@]}" ||
    echo "# could not copy the workdir out" >&2
fi
if ((KEEP)); then
  echo "# kept $NAME; delete it with:" >&2
  show gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_SCOPE[@]}" --force --quiet >&2
elif ((DRY_RUN)); then
  delete_slice
fi
exit "$status"

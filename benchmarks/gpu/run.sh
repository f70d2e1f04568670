#!/usr/bin/env bash
# The GPU check: ResNet50 training throughput with and without mixed precision and XLA, then tinyopt end
# to end on a small real slice of Tiny ImageNet (two sweeps tracked in MLflow, the winner exported, one
# prediction). One line per step, [ok] or [FAIL]; the first failure stops the check with exit code 1 and
# shows the end of that step's log. Everything is written to the work dir, nothing to the checkout.
#
#   benchmarks/gpu/run.sh [options]          (KERAS_BACKEND=jax|tensorflow picks the backend)
#
#   --tiny                 CI size: 32 px throughput of one setting, a 10-class slice, 1-epoch trials
#   --workdir DIR          an empty or new folder for logs, stores, cache, bundle (default: a new temp dir)
#   --slice ZIP            the data slice (default: .gpucheck/tiny-imagenet-slice.zip when present and
#                          neither --source nor --tiny is given, else one made by make_slice.py in the work dir)
#   --source SRC           what make_slice.py slices (default: ../shared/data's dev zip, else the official URL)
#   --weights FILE         ImageNet weights file of the finetune backbone (default: Keras downloads them)
#   --backbone NAME        resnet50 (default) or mobilenet: MobileNet v1 alpha 0.25 at 128 px, the weights
#                          in ../shared/data/mobilenet_2_5_128_tf.h5 (offline machines)
#   --trials N             trials per sweep (default 3)
#   --epochs N             epochs per trial (default 3; 1 with --tiny)
#   --install-wheels DIR   first pip-install DIR/*.whl into the work dir (offline machines, see wheels.sh)
#
# PYTHON names the interpreter (default python3). See benchmarks/gpu/README.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/benchmarks/gpu
python=${PYTHON:-python3}
tiny=0 work="" slice="" source="" weights="" backbone=resnet50 trials=3 epochs="" wheels=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
absolute() { realpath -m -- "$1"; }  # the check runs inside the work dir: user paths must not depend on cwd
while (($#)); do
  case $1 in
    --tiny) tiny=1; shift ;;
    --workdir) work=$(absolute "$2"); shift 2 ;;
    --slice) slice=$(absolute "$2"); shift 2 ;;
    --source) source=$2; shift 2 ;;
    --weights) weights=$(absolute "$2"); shift 2 ;;
    --backbone) backbone=$2; shift 2 ;;
    --trials) trials=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --install-wheels) wheels=$(absolute "$2"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
case $backbone in
  resnet50) backbone_sets=() ;;
  mobilenet) backbone_sets=(--set model.backbone=mobilenet --set model.alpha=0.25 --set model.weights_resolution=128) ;;
  *) echo "error: --backbone must be resnet50 or mobilenet, got $backbone" >&2; exit 2 ;;
esac
if [[ -z $work ]]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/tinyopt-gpucheck.XXXXXX")
elif [[ -n $(ls -A "$work" 2>/dev/null) ]]; then
  # The checks count the trials of each study: a store left by an earlier run would hold more.
  echo "error: --workdir $work is not empty; pass a new or empty folder" >&2
  exit 2
fi
mkdir -p "$work/logs"
cd "$work"

steps=0 started=$SECONDS
step_begin() {  # NAME: the step's output goes to logs/NN-NAME.log
  step=$1 step_started=$SECONDS steps=$((steps + 1))
  step_log=$work/logs/$(printf %02d "$steps")-${1// /-}.log
  : >"$step_log"
}
step_ok() { echo "[ok] $step: $1 ($((SECONDS - step_started)) s)"; }
step_fail() {
  echo "[FAIL] $step: $1 ($((SECONDS - step_started)) s); log: $step_log"
  tail -n 30 "$step_log" | sed 's/^/    /'
  exit 1
}
step_run() {  # COMMAND...: run it with its output in the step's log
  echo "\$ $*" >>"$step_log"
  "$@" >>"$step_log" 2>&1 || step_fail "exit code $?"
}
step_check() {  # check.py SUBCOMMAND ARGS: its line is the step's result
  local line
  if line=$("$python" "$here/check.py" "$@" 2>>"$step_log"); then step_ok "$line"; else step_fail "${line:-check.py $1 failed}"; fi
}

size=full
if ((tiny)); then size=tiny; fi
echo "tinyopt GPU check ($size): KERAS_BACKEND=${KERAS_BACKEND:-tensorflow (default)}, work dir $work"

if [[ -n $wheels ]]; then
  step_begin "install wheels"
  step_run "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$wheels"/*.whl
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
  step_ok "$(find "$wheels" -maxdepth 1 -name '*.whl' | wc -l) wheels from $wheels into $work/site"
fi
# The checkout's tinyopt, also where it is not pip-installed (an offline machine): run as `python -m tinyopt`.
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
# Rich draws its tables 80 columns wide in a log, which folds every row of tinyopt's tables.
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2} COLUMNS=${COLUMNS:-160}
# JAX compiles every model again in each process (sweeps, export, predict), and on a CPU even the
# initializers of each layer shape take a compile of up to 2 s; a persistent cache in the work dir
# shares them (it saves about 100 s of the tiny run under JAX). The timed throughput steps are unaffected.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$work/jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}
tinyopt=("$python" -m tinyopt)

step_begin environment
step_check env

step_begin throughput
if ((tiny)); then
  throughput_args=(--sizes 32 --batch 4 --steps 2 --warmup 1 --precision mixed --xla auto)
else
  throughput_args=()
fi
"$python" "$here/throughput.py" "${throughput_args[@]}" 2>>"$step_log" | tee -a "$step_log" || step_fail "exit code $?"
step_ok "ResNet50 images/s in the table above"

step_begin "data slice"
default_slice=$repo/.gpucheck/tiny-imagenet-slice.zip
if [[ -z $slice && -z $source && $tiny == 0 && -f $default_slice ]]; then
  slice=$default_slice
fi
if [[ -n $slice ]]; then
  [[ -f $slice ]] || step_fail "$slice does not exist"
  step_ok "$slice ($(du -h "$slice" | cut -f1)), given"
else
  slice=$work/tiny-imagenet-slice.zip
  slice_args=(--out "$slice" ${source:+--source "$source"})
  if ((tiny)); then slice_args+=(--classes 10 --train-per-class 10 --val-per-class 2); fi
  if line=$("$python" "$here/make_slice.py" "${slice_args[@]}" 2>>"$step_log"); then step_ok "$line"; else step_fail "make_slice.py failed"; fi
fi

cache=$work/cache storage=sqlite:///$work/studies/tinyopt.db tracking=sqlite:///$work/mlruns/mlflow.db
stores=(--storage "$storage" --tracking-uri "$tracking")
step_begin "data prepare"
step_run "${tinyopt[@]}" data prepare --data "$slice" --cache "$cache"
step_check data "$cache"

if [[ -z $epochs ]]; then
  epochs=3
  if ((tiny)); then epochs=1; fi
fi
sweep_step() {  # APPROACH [--set KEY=VALUE]...
  local approach=$1
  shift
  step_begin "sweep $approach"
  step_run "${tinyopt[@]}" sweep "$approach" --trials "$trials" --data "$slice" --cache "$cache" "${stores[@]}" \
    --set space.epochs="$epochs" "$@"
  step_check sweep "$approach" "$trials" "$storage" "$tracking"
}
finetune_sets=("${backbone_sets[@]}" ${weights:+--set "model.weights=$weights"})
scratch_sets=()
if ((tiny)); then
  # The smallest input keras.applications allow (so no zero-padding, which cannot shrink 64 px images), one
  # trained stage (compiling a full backward pass costs the most on a CPU), a small CNN. Flips only: Keras
  # turns XLA off for a model holding RandomTranslation or RandomZoom, and under JAX that model then
  # trains op by op, which would double the tiny run.
  finetune_sets+=(--set space.input_size=32 --set space.resize=bilinear --set space.trainable_stages=1
    --set space.augment=flip)
  scratch_sets+=(--set space.stages=2 --set space.width=16 --set space.blocks=1 --set space.augment=flip)
fi
sweep_step finetune "${finetune_sets[@]}"
sweep_step scratch "${scratch_sets[@]}"

step_begin "best --export"
step_run "${tinyopt[@]}" best --export "$work/bundle" "${stores[@]}"
step_check bundle "$work/bundle"

step_begin predict
sample=$("$python" "$here/check.py" sample "$slice" "$work" 2>>"$step_log") || step_fail "no val image in $slice"
image=${sample% *} wnid=${sample##* }
"${tinyopt[@]}" predict "$work/bundle" "$image" --json >"$work/predict.json" 2>>"$step_log" ||
  step_fail "exit code $? of tinyopt predict"
cat "$work/predict.json" >>"$step_log"
step_check predicted "$work/predict.json" "$wnid"

echo "all $steps steps passed in $((SECONDS - started)) s; logs, stores and bundle in $work"

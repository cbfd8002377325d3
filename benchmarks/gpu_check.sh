#!/usr/bin/env bash
# The prepared GPU check of issue 15, written for the lent NVIDIA H200 (Python 3.12 with
# jax + CUDA plugin, flax, optax, orbax-checkpoint, torch, transformers, Nsight Compute; no
# network). In one call of at most ~8 minutes it runs, most important first:
#   tests      the compiled (not interpreted) pallas_gpu test subclasses against the
#              float64 oracle, and the dispatch tests (the probe on a real GPU)
#   msda       benchmarks/msda.py: both implementations and torch's grid_sample on cuda,
#              with the PASS/FAIL goal lines
#   ncu        Nsight Compute on the encoder forward and backward kernels: achieved and
#              theoretical occupancy, DRAM throughput, L2 and L1 hit rates, registers
#   inference  benchmarks/inference.py: Detector vs transformers eager, both on cuda
#   train_step benchmarks/train_step.py: one training step vs transformers on cuda
#   sweep      benchmarks/msda.py --sweep: pallas_gpu at other tiles than the default
#   resources  the CPU resource report, here against this machine's jax and triton
# and writes everything to one report, $OUT/gpu_check.md (Nsight's CSV beside it), ending
# with a summary that is also printed last. Each step runs under a timeout that keeps the
# whole within GPU_CHECK_BUDGET_S (470 s); what is cut says so. Packages the machine lacks
# travel as wheels in .whl/ (`make gpu-wheels` here) and are installed offline first.
#
#   device:    bash benchmarks/gpu_check.sh                 (run with carry [".whl"])
#   rerun:     GPU_CHECK_STEPS="train_step sweep" GPU_CHECK_BUDGET_S=200 bash benchmarks/gpu_check.sh
#   rehearsal: PYTHON=/path/to/python3.12 bash benchmarks/gpu_check.sh --rehearse
#              (`make gpu-check-rehearsal`: the same script on this CPU, smaller sizes; what
#              needs a GPU, torch or ncu is reported as skipped, with the reason)
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--rehearse" ]]; then MODE=rehearse; fi
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
STEPS=${GPU_CHECK_STEPS:-tests msda ncu inference train_step sweep resources}
START=$SECONDS
mkdir -p "$OUT"
REPORT=$OUT/gpu_check.md
SUMMARY=$OUT/.summary
: >"$REPORT"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # several processes share the GPU (pytest -n)
export TRITON_DEFAULT_FP_FUSION=1          # Triton 3.9's default, said aloud

say() { echo "$*" | tee -a "$REPORT"; }
summary() { echo "$*" >>"$SUMMARY"; }

# Offline install of the carried wheels, ahead of the repository on the path.
SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
if compgen -G ".whl/*.whl" >/dev/null; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl; then
    echo "gpu_check: installing .whl/*.whl failed" >&2
  fi
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# A flax older than the package's minimum (the image's version is not on record): the
# carried flax 0.12.8 (pure Python, the oldest CI tests), only then.
if ! "$PY" -c "import deformable_detr_jax" >/dev/null 2>&1 && compgen -G ".whl/fallback/flax-*.whl" >/dev/null; then
  echo "gpu_check: $("$PY" -c "import deformable_detr_jax" 2>&1 | tail -n 1)" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/fallback/flax-*.whl || echo "gpu_check: installing flax failed" >&2
fi

has() { "$PY" -c "$1" >/dev/null 2>&1; }
HAS_GPU=0 && has "import jax; assert jax.default_backend() == 'gpu'" && HAS_GPU=1
HAS_TORCH=0 && has "import torch, transformers" && HAS_TORCH=1
TORCH_CUDA=0 && has "import torch; assert torch.cuda.is_available()" && TORCH_CUDA=1
HAS_TRITON=0 && has "import triton" && HAS_TRITON=1
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)

say "# GPU check ($MODE), $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
say '```'
{
  uname -srm
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
         "orbax-checkpoint", "numpy", "torch", "transformers", "triton", "ml-collections"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(f"python {platform.python_version()} ({sys.executable}); " + ", ".join(found))
import jax
d = jax.devices()[0]
print(f"jax.devices(): {jax.devices()}; kind {d.device_kind!r}, compute capability "
      f"{getattr(d, 'compute_capability', None)}, SMs {getattr(d, 'core_count', None)}")
EOF
} 2>&1 | tee -a "$REPORT"
say '```'
say "gpu=$HAS_GPU torch=$HAS_TORCH torch_cuda=$TORCH_CUDA triton=$HAS_TRITON ncu=${NCU:-none}; steps: $STEPS"

# step NAME BUDGET_S COMMAND...: runs COMMAND under a timeout that respects the budget.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 10))
  ((budget > left)) && budget=$left
  say ""
  say "## $name"
  if ((budget < 20)); then
    say "NOT RUN: out of time (${left} s of the budget left)"
    summary "$name: NOT RUN (out of time)"
    return
  fi
  say "\$ $(printf '%q ' "$@")"
  say '```'
  local t0=$SECONDS log
  log=$(mktemp)
  timeout -k 10 "$budget" "$@" >"$log" 2>&1
  local rc=$?
  cat "$log" >>"$REPORT"
  grep -E "^# goal|^# skip|passed|failed|error" "$log" | tail -n 25
  say '```'
  local took=$((SECONDS - t0))
  if ((rc == 124 || rc == 137)); then
    say "TIMED OUT after ${took} s (limit ${budget} s)"
    summary "$name: TIMED OUT after ${took} s"
  elif ((rc != 0)); then
    say "FAILED (exit $rc) after ${took} s"
    summary "$name: FAILED (exit $rc) after ${took} s"
  else
    say "ok, ${took} s"
    summary "$name: ok, ${took} s"
  fi
  grep -E "^# goal" "$log" | sed "s/^# goal/  goal/" >>"$SUMMARY"
  grep -E "[0-9]+ (passed|failed|errors?)\b.* in [0-9.]+s" "$log" | sed "s/^/  /" >>"$SUMMARY"
  rm -f "$log"
}

skip() {
  say ""
  say "## $1"
  say "SKIPPED: $2"
  summary "$1: SKIPPED ($2)"
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

if wanted tests; then
  # On a GPU the compiled subclasses run; here they skip ("needs a GPU") and the
  # dispatch tests run on the CPU.
  step tests 110 "$PY" -m pytest -q -p no:cacheprovider -n 4 -rs \
    tests/test_ms_deform_attn.py tests/test_msda_dispatch.py -k "Compiled or dispatch"
fi

if wanted msda; then
  if [[ $MODE == gpu ]]; then
    step msda 110 "$PY" benchmarks/msda.py --repeats 10 --batches 2 8
  else
    step msda 150 "$PY" benchmarks/msda.py --repeats 2 --batches 1 --dtypes float32 \
      --no-decoder --no-torch
  fi
fi

if wanted ncu; then
  if [[ -z $NCU || $HAS_GPU == 0 ]]; then
    skip ncu "needs Nsight Compute (ncu: ${NCU:-none}) and a GPU (gpu=$HAS_GPU)"
    step "ncu target (run without ncu)" 60 "$PY" benchmarks/msda.py --profile
  else
    METRICS=sm__warps_active.avg.pct_of_peak_sustained_active,sm__maximum_warps_per_active_cycle_pct,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,l1tex__t_sector_hit_rate.pct,launch__registers_per_thread,launch__occupancy_limit_registers,gpu__time_duration.sum
    step ncu 100 "$NCU" --clock-control none --target-processes all \
      --kernel-name regex:ms_deform_attn --launch-skip 2 --launch-count 2 \
      --metrics "$METRICS" --csv --log-file "$OUT/ncu.csv" \
      "$PY" benchmarks/msda.py --profile
    if [[ -s $OUT/ncu.csv ]]; then
      say '```'
      "$PY" - "$OUT/ncu.csv" <<'EOF' 2>&1 | tee -a "$REPORT" "$SUMMARY"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit("  ncu: no kernel profiled (no launch named ms_deform_attn*?)")
head, body = rows[0], rows[1:]
col = {name: i for i, name in enumerate(head)}
for r in body:
    print(f"  ncu {r[col['Kernel Name']][:40]}: {r[col['Metric Name']]} = "
          f"{r[col['Metric Value']]} {r[col['Metric Unit']]}")
EOF
      say '```'
    fi
  fi
fi

if wanted inference; then
  if [[ $HAS_TORCH == 0 ]]; then
    skip inference "needs torch and transformers (the transformers model is the baseline)"
  elif [[ $MODE == gpu && $TORCH_CUDA == 1 ]]; then
    step inference 160 "$PY" benchmarks/inference.py --torch-device cuda --batch 4 \
      --repeats 5 --skip bfloat16
  else
    step inference 300 "$PY" benchmarks/inference.py --batch 1 --repeats 1 --skip bfloat16
  fi
fi

if wanted train_step; then
  if [[ $MODE == gpu ]]; then
    TORCH_FLAG=()
    [[ $HAS_TORCH == 1 ]] && TORCH_FLAG=(--torch)
    step train_step 160 "$PY" benchmarks/train_step.py --model r50 --batch 4 --size 800 1216 \
      --steps 5 --warmup 2 "${TORCH_FLAG[@]}" --json "$OUT/train_step.json"
  else
    step train_step 150 "$PY" benchmarks/train_step.py --model tiny --batch 2 --steps 2 \
      --warmup 1
  fi
  [[ $HAS_TORCH == 0 ]] && summary "  train_step: transformers not timed (no torch)"
fi

if wanted sweep; then
  step sweep 90 "$PY" benchmarks/msda.py --sweep --repeats 10
fi

if wanted resources; then
  if [[ $HAS_TRITON == 0 ]]; then
    skip resources "needs the triton package"
  else
    step resources 90 "$PY" -m pallas_kernels.ms_deform_attn.resources --shapes encoder
  fi
fi

say ""
say "## summary ($MODE, $((SECONDS - START)) s of a ${BUDGET} s budget)"
say '```'
tee -a "$REPORT" <"$SUMMARY"
say '```'
rm -rf "$SITE" "$SUMMARY"

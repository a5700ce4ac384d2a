#!/usr/bin/env bash
# What only an NVIDIA GPU (H100/H200) can check or measure, in one call, most important first:
#
#   env    the machine: GPU and driver, python, jax/flax/optax/transformers versions, jax's devices, cuDNN
#   attn   tests/test_attention.py on the GPU: cuDNN flash attention against the XLA path, the kernel alone
#          and inside the model's attention layer (values and gradients, packed documents, GQA)
#   smoke  the KD train step on the tiny models, a few steps: the whole step compiles and runs on the GPU
#   bench  issue 6's step: Qwen2-7B teacher -> Qwen2-1.5B student, 2048 tokens, batch 8, attention auto
#          (cuDNN): step time, tokens/s, MFU, compile time, peak memory
#   tcost  the same step at alpha = 0 against alpha > 0: the teacher's share of the step time
#   xla    the same step with the XLA attention path, to compare with cuDNN
#   vstorch  scripts/bench_vs_torch.py --device cuda: jaxkd's step against a DistillKit-style PyTorch step at Qwen2's
#          vocabulary and 2,048 tokens (issue 20's shapes), float32 then bfloat16: speed-up and peak-memory ratios.
#          Needs torch with CUDA and transformers on that machine (the env stage prints their versions).
#   chunk  the bench step at the fused loss's default chunk (--chunk_size 0: its 1 GiB budget, 256 tokens at Qwen2's
#          vocabulary) against the bench stage's 1,024: on a roofline from the TPU compiler's counts the loss's trips
#          are memory-bound at 256 rows (BENCHMARKS.md, "The chunk's metrics, and the work one trip does").
#
#   bash scripts/gpu_check.sh                 # every stage, in that order
#   bash scripts/gpu_check.sh tcost xla       # some stages (a second call, if the first ran out of time)
#
# Runs from the repository root on the machine's own python3 and packages (PYTHONPATH=., nothing is
# installed; bench.py needs only jax, flax, optax and numpy). Every stage has a time limit and all of them
# share one deadline, GPU_CHECK_SECONDS (default 560, under the device tool's 600 s a call); a stage that
# fails or times out does not stop the next. Logs and a copy of BENCHMARKS.md with the new rows go to $OUT
# (the device tool's folder) or gpu_check_out/; merge the rows into BENCHMARKS.md by hand. The summary is
# printed last; the exit status is 0 only when every stage ran and passed.
#
# The bench builds its loss and optimizer settings from jaxkd's config defaults, so it needs ml_collections. If
# that machine lacks it, or its flax or optax turn out not to fit this code, carry the versions tested here as
# wheels in .whl/ (git-ignored; the device tool's `carry`), fetched on a machine with pip access by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl flax==0.12.8 optax==0.2.8 \
#     ml_collections absl-py
# and the script installs them into /tmp/jaxkd-site ahead of the machine's own.
# A copy of the tree without .git has no commit to record: pass it, `JAXKD_COMMIT=abc1234 bash scripts/...`.
# Overrides, for a try on a CPU or another GPU: GPU_CHECK_PLATFORM (default cuda), GPU_CHECK_STUDENT,
# GPU_CHECK_TEACHER, GPU_CHECK_SEQ, GPU_CHECK_BATCH, GPU_CHECK_STEPS.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-560}))
OUT_DIR=${OUT:-gpu_check_out}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
BENCH_MD="$OUT_DIR/BENCHMARKS.md"
[ -f "$BENCH_MD" ] || cp BENCHMARKS.md "$BENCH_MD"
PY=${PYTHON:-python3}
PLATFORM=${GPU_CHECK_PLATFORM:-cuda}
STUDENT=${GPU_CHECK_STUDENT:-Qwen/Qwen2-1.5B}
TEACHER=${GPU_CHECK_TEACHER:-Qwen/Qwen2-7B}
SEQ=${GPU_CHECK_SEQ:-2048}
BATCH=${GPU_CHECK_BATCH:-8}
STEPS=${GPU_CHECK_STEPS:-10}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=$PLATFORM
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# XLA:CPU's compiled memory for the step is 95 GiB (bench.py --compile_only, BENCHMARKS.md; a GPU should need
# less), and tcost holds a second student state (17 GiB): more than jax's default pool of 75% of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}

stage_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "(no nvidia-smi)"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "numpy"):
  try:
    module = importlib.import_module(name)
    print(name, module.__version__, module.__file__)
  except Exception as e:  # noqa: BLE001
    print(name, "MISSING:", e)
import jax
print("backend", jax.default_backend(), "devices", jax.devices())
d = jax.devices()[0]
print("device_kind", d.device_kind, "compute_capability", getattr(d, "compute_capability", None))
from jaxkd.models import attention
print("attention facts", attention._gpu_facts() if jax.default_backend() == "gpu" else "(not a GPU)")
EOF
}

stage_attn() { "$PY" -m pytest tests/test_attention.py -q -n 0 -p no:cacheprovider -rs; }
stage_smoke() { "$PY" scripts/bench.py --student tiny --teacher tiny --steps 3 --warmup 1 --no_record; }
stage_bench() { "$PY" "${BENCH[@]}"; }
stage_tcost() { "$PY" "${BENCH[@]}" --teacher_cost; }
stage_xla() { "$PY" "${BENCH[@]}" --attention xla; }
stage_chunk() { "$PY" "${BENCH[@]}" --chunk_size 0; }
stage_vstorch() {
  local device=cuda
  [ "$PLATFORM" != cpu ] || device=cpu
  local vs=(scripts/bench_vs_torch.py --device "$device" --steps 20 --warmup 3 --benchmarks "$BENCH_MD")
  "$PY" "${vs[@]}" --pairs 2 && "$PY" "${vs[@]}" --pairs 1 --dtype bfloat16
}

BENCH=(scripts/bench.py --student "$STUDENT" --teacher "$TEACHER" --seq_len "$SEQ" --batch "$BATCH"
       --remat dots_no_batch_attention --steps "$STEPS" --benchmarks "$BENCH_MD")
ALL=(env attn smoke bench tcost xla vstorch chunk)
if [ "${1:-}" != "--one" ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxkd-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/jaxkd-site:$PYTHONPATH"
  echo "using the carried wheels: $(cd .whl && echo *.whl)" | tee -a "$LOG"
fi
if [ "${1:-}" = "--one" ]; then  # one stage, in a child process that `timeout` can stop
  set -e
  "stage_$2"
  exit
fi
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=("${ALL[@]}")
for s in "${STAGES[@]}"; do
  case " ${ALL[*]} " in *" $s "*) ;; *) echo "unknown stage '$s'; stages: ${ALL[*]}" >&2; exit 2 ;; esac
done

declare -A LIMIT=([env]=90 [attn]=240 [smoke]=150 [bench]=300 [tcost]=420 [xla]=300 [vstorch]=360)
SUMMARY=()
FAILED=0
for s in "${STAGES[@]}"; do
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 45 ]; then
    SUMMARY+=("$s: skipped, ${left}s left of the deadline")
    FAILED=1
    continue
  fi
  limit=$((LIMIT[$s] < left ? LIMIT[$s] : left))
  echo "=== $s (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash "$SELF" --one "$s" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  took=$(($(date +%s) - t0))
  case $rc in
    0) status="ok" ;; 124|137) status="TIMED OUT at ${limit}s" ;; *) status="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || FAILED=1
  SUMMARY+=("$s: $status, ${took}s")
done

{
  echo
  echo "=== summary ($(($(date +%s) - START))s in all; log $LOG, rows in $BENCH_MD)"
  printf '%s\n' "${SUMMARY[@]}"
  key_lines="^(alpha=|teacher cost:|attention facts|device_kind|jax |torch |pair [0-9]|goal )|^[0-9]+ (passed|failed)|^(FAILED|ERROR)"
  grep -E "$key_lines" "$LOG" | tail -20
  diff <(cat BENCHMARKS.md) "$BENCH_MD" | grep '^>' | sed 's/^> /new row: /'
} | tee -a "$LOG"
exit $FAILED  # 0 only when every stage asked for ran and passed

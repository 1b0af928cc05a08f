#!/usr/bin/env bash
# Every benchmark at full size and the GPU-only tests, on one H100/H200 node, tables in one folder.
#
#   bash launch/gpu_bench.sh [RESULTS_DIR]      # default bench/results/gpu_<UTC time>
#
# Needs a CUDA torch in the active Python (or PYTHON=/path/to/python) and `pip install -e ".[dev,gpu]"`.
# Writes RESULTS_DIR/{env.txt, nvidia-smi.txt, gpu_tests.txt, bench.txt, train_throughput_*.txt,
# *.json, SUMMARY.md}. A failing step is recorded and the rest still run; the exit code is 1 when
# any step failed. Copy the tables of SUMMARY.md into BENCHMARKS.md with the machine line.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-bench/results/gpu_$(date -u +%Y%m%dT%H%M%SZ)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export WANDB_MODE=${WANDB_MODE:-offline}
failed=()

step() {  # step NAME LOGFILE COMMAND...: run, tee the output, remember a failure
    local name=$1 log=$2
    shift 2
    echo "=== $name: $*" | tee "$log"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: no CUDA device visible to $PY; this script is for a GPU node" >&2
    exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/env.txt" <<'EOF'
import platform, torch, deepspeed, transformers
print("device      ", torch.cuda.get_device_name(), f"x{torch.cuda.device_count()}")
print("torch       ", torch.__version__, "cuda", torch.version.cuda)
print("deepspeed   ", deepspeed.__version__)
print("transformers", transformers.__version__)
print("python      ", platform.python_version(), platform.machine())
try:
    import triton; print("triton      ", triton.__version__)
except ImportError:
    print("triton       not installed")
try:
    import transformer_engine; print("te          ", transformer_engine.__version__)
except Exception as err:  # TE raises RuntimeError without cuDNN
    print("te           unavailable:", type(err).__name__)
EOF
cat "$OUT/env.txt"

# 1. The tests that need a GPU: kernel tests on CUDA (not the Triton interpreter), flex_attention and
#    Transformer Engine paths in the model tests.
step "gpu tests" "$OUT/gpu_tests.txt" env DS_SFT_GPU_TESTS=1 "$PY" -m pytest -q -x tests/kernels tests/model

# 2. Real data for the packing benchmark: the shared mix at seq 1024 with the GPT-2 tokenizer, when
#    ../shared is on this node; otherwise train_throughput (b) falls back to synthetic documents.
DATA_FLAG=()
if "$PY" -c "import sys; from ds_sft.paths import shared_dir; sys.exit(0 if shared_dir() else 1)"; then
    step "prepare gpt2/1024" "$OUT/prepare.txt" "$PY" -m ds_sft.cli prepare --tokenizer gpt2 --seq_len 1024 \
        --output_dir "$OUT/data_gpt2_1024"
    [ -f "$OUT/data_gpt2_1024/manifest.json" ] && DATA_FLAG=(--data_dir "$OUT/data_gpt2_1024")
fi

# 3. Every script of `ds-sft bench` at its full default size (prepare, kernels, fp8, throughput).
step "ds-sft bench" "$OUT/bench.txt" "$PY" -m ds_sft.cli bench

# 4. Training throughput at GPU sizes: 112m (the MFU target) and SmolLM2-135M, 16 x 1024 rows.
for preset in 112m smollm2-135m; do
    step "train_throughput $preset" "$OUT/train_throughput_$preset.txt" \
        "$PY" bench/train_throughput.py --preset "$preset" --seq_len 1024 --micro_batch 16 --steps 20 --compile \
        --warmup 3 --b_rows 64 "${DATA_FLAG[@]}" --out "$OUT/train_throughput_$preset.json"
done

cp bench/results/*.json "$OUT/" 2>/dev/null
{
    echo "# GPU benchmark run $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    for log in "$OUT"/bench.txt "$OUT"/train_throughput_*.txt; do
        echo
        echo "## $(basename "$log" .txt)"
        echo
        echo '```'
        grep -v -E '^\[20|it/s\]|^\s*$' "$log" | tail -n 60
        echo '```'
    done
    echo
    echo "## GPU tests"
    echo
    echo '```'
    tail -n 5 "$OUT/gpu_tests.txt"
    echo '```'
    echo
    echo "failed steps: ${failed[*]:-none}"
} > "$OUT/SUMMARY.md"
echo "gpu_bench: wrote $OUT/SUMMARY.md; failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]

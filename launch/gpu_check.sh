#!/usr/bin/env bash
# One command proves every GPU path of ds-sft on a bare single-GPU machine without network, in < 8 min.
#
# On the lent H200 (the device tool; the carried folder holds the wheelhouse and the prepared data):
#     run(command="bash launch/gpu_check.sh --out $OUT", carry=["gpu_carry"], timeout_s=540)
# Here, first (CPU machine, network for pip):
#     make gpu-carry                     # gpu_carry/wheelhouse (+ size check) and gpu_carry/data
#     bash launch/gpu_check.sh --cpu     # the rehearsal: same steps, tiny sizes, CUDA-only ones skipped
#
# Steps, each under its own timeout (a failing step is recorded and the rest still run):
#   install      the wheelhouse (deepspeed without prebuilt ops, datasets' missing dependencies,
#                liger-kernel) with pip --no-index into a folder of the work dir on PYTHONPATH: the
#                image's interpreter may not be writable (a non-root user), and is never changed
#                (--cpu: the interpreter is a clean venv that stands in for the GPU image:
#                launch/gpu_image.txt, its Python, torch and Triton versions included)
#   imports      deepspeed, datasets, liger_kernel import from that folder; versions into the summary
#   collectives  every collective ds-sft and ZeRO call, one rank, over gloo and NCCL on the device
#   gpu tests    compiled Triton RMSNorm / cross-entropy / fused linear CE against their references,
#                flex_attention document masks against dense SDPA, fp8 GEMMs (DS_SFT_GPU_TESTS=1)
#   train bf16   ds-sft train, 112m preset, ZeRO-2, 30 steps of 16 x 1024 tokens on the carried data
#   train fp8    the same with --fp8 $FP8_MODE (default torch: torch._scaled_mm on Hopper)
#   gemm         a bf16 GEMM timed in this run: the ceiling MFU is measured against
#   fp8 roofline bench/fp8_roofline.py --write: select: "auto"'s table calibrated here (copied to OUT)
#   kernels      bench/kernel_speed.py: Triton vs eager vs torch.compile vs Liger (time, peak memory)
#   fp8 vs bf16  bench/fp8.py: the training step in bf16, fp8 everywhere and fp8 select: "auto" (torch,
#                and TE where it imports), side by side, at the 112m preset and at d_model 2048
#   step d2048 / d768   bench/train_throughput.py part c at d_model 2048 and at the 112m preset, bf16:
#                the DeepSpeed step against the GEMM; at 112m also where its time goes (torch.profiler:
#                the top kernels, and their busy time against the wall time of a step)
#   step d768_accum16   the same at the recipe's 16 micro-batches per update (ZeRO-2 reduces once per
#                update: ds_sft/train/engine.py, reduces_gradients_once_per_update)
#   train bf16 compile   the bf16 training again with --compile (torch.compile on the GPU), and
#                its graph breaks counted (bench/gpu_check.py train)
# Writes OUT/SUMMARY.md (tables, pass/fail per step, issue 14's targets met or missed, the machine
# line), OUT/logs.tar.gz (every log and JSON; checkpoints stay in the work folder) and, on a GPU,
# OUT/fp8_roofline.json: OUT is a new or empty folder, or one an earlier check wrote. Exit 1 when a
# step or a check failed (a missed speed target is reported, not a failure).
#
# --only STEP,...: run just those steps (and install and imports, which every step needs), e.g. after a
# fix, on a fresh machine: bash launch/gpu_check.sh --only "gpu tests,fp8 vs bf16" --out $OUT
#
# --continue: run only the steps an earlier check in the same work folder did not reach ("skipped:
# out of time"; a cold first run on a fresh GPU spends much of the budget compiling), on a budget of
# its own, and summarise both. On the lent GPU, while the machine is still warm (seconds after the
# first call: it keeps its /tmp, where the work folder is):
#     run(command="bash launch/gpu_check.sh --continue --out $OUT", carry=["gpu_carry"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
launcher=launch/gpu_check.sh
source launch/options.sh

# The GPU tests: the kernel tests on CUDA (not the Triton interpreter), flex_attention, fp8 GEMMs.
# Found by pattern, so a new test needs no edit here: every CUDA-only file (tests/**/test_gpu_*.py,
# skipped without DS_SFT_GPU_TESTS=1), every kernel test file whose tests take the `device` fixture
# (tests/kernels/conftest.py: CUDA under DS_SFT_GPU_TESTS=1), and fp8's CUDA tests (the file's CPU
# tests run in CI).
shopt -s globstar nullglob
gpu_tests=(tests/**/test_gpu_*.py $(grep -lE '^def test_\w*\(.*\bdevice\b' tests/kernels/test_*.py))
shopt -u globstar nullglob
fp8_tests=(tests/model/test_fp8.py -k "cuda or real_transformer_engine")

# The rehearsal's stand-in for the image's Python 3.12: $IMAGE_PYTHON if set, else python3.12 where
# it runs (or pyenv's), else python3 (a version apart: the wheelhouse carries cp311 wheels too).
image_python() {
    if [ -n "${IMAGE_PYTHON:-}" ]; then
        "$IMAGE_PYTHON" -c "" && echo "$IMAGE_PYTHON" && return
        echo "gpu_check: IMAGE_PYTHON=$IMAGE_PYTHON does not run" >&2 && return 2
    fi
    local candidate
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
        "$candidate" -c "" 2> /dev/null && echo "$candidate" && return
    done
}

mode=gpu
out=""
only=""
continue_earlier=0
# Every step's name, in order (--only takes a comma-separated list of them)
STEPS=(install imports collectives "gpu tests" "gpu tests: collect" "carried data" "deepspeed cpu op"
       "train bf16" "train fp8" gemm "fp8 roofline" kernels "fp8 vs bf16" "step d2048 bf16" "step d768 bf16"
       "step d768_accum16 bf16" "train bf16 compile")
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) mode=cpu ;;
        --continue) continue_earlier=1 ;;
        --out) out=$(value_of "$@") || exit 2; shift ;;  # no set -e here: the subshell's exit is passed on
        --only) only=$(value_of "$@") || exit 2; shift ;;
        --list-tests) printf '%s\n' "${gpu_tests[@]}" "${fp8_tests[0]}"; exit 0 ;;  # the files
        --image-python) image_python; exit ;;  # for `make test-image`
        *) echo "usage: bash launch/gpu_check.sh [--cpu] [--continue] [--only STEP,...] [--out DIR] [--list-tests] [--image-python]" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$only" ]; then  # every name is a step's, before any work: a typo would run nothing
    [ "$continue_earlier" = 1 ] && { echo "gpu_check: --only and --continue do not go together: --continue runs what an earlier check had no time for" >&2; exit 2; }
    while IFS= read -r name; do  # one name per comma-separated field, an empty one too ("gemm,")
        printf '%s\n' "${STEPS[@]}" | grep -qxF -- "$name" || {
            echo "gpu_check: --only: no step is named '$name'; steps: $(IFS=,; echo "${STEPS[*]}")" >&2; exit 2; }
    done <<< "${only//,/$'\n'}"
fi
selected() {  # selected NAME: true unless --only leaves it out (install and imports always run: all need them)
    [ -z "$only" ] || [ "$1" = install ] || [ "$1" = imports ] || [[ ",$only," == *",$1,"* ]]
}
CARRY=${GPU_CARRY:-$REPO/gpu_carry}
default_out=$REPO/bench/results/gpu_check_$mode  # ds-sft's own results folder: always its to write
out=${out:-$default_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_$mode}
# Every step's timeout is cut to what is left of the budget. The CPU rehearsal runs tiny sizes on
# a slow, shared machine: its timeouts are SLOW times the GPU ones.
SLOW=$([ $mode = cpu ] && echo 4 || echo 1)
BUDGET_S=${BUDGET_S:-$((470 * SLOW))}
# checked before any $((...)) reads it: bash evaluates a variable's text there as an expression, so
# BUDGET_S='x[$(cmd)]' ran cmd, and BUDGET_S=8m printed a screen of arithmetic errors
count BUDGET_S "$BUDGET_S" 1 86400
FP8_MODE=${FP8_MODE:-torch}
# The folders this script replaces (the work dir; the --cpu venv) are removed, and the one it writes
# its pages into (--out: SUMMARY.md, logs.tar.gz, fp8_roofline.json) is written over, only when
# gpu_check made them (they hold its mark) or they are empty: pointed at anything else (--out ~, a
# project), it refuses before any work.
replaceable() {  # replaceable DIR MARK SETTING
    if [ -e "$1" ] && [ ! -e "$1/$2" ] && [ -n "$(ls -A "$1" 2> /dev/null)" ]; then
        echo "gpu_check: $1 is not empty and gpu_check did not make it (no $2 in it): leaving it;" \
            "set $3 to a new or empty folder" >&2
        return 1
    fi
}
replaceable "$WORK" .gpu_check_work GPU_CHECK_WORK || exit 2
[ "$out" = "$default_out" ] || replaceable "$out" .gpu_check_out --out || exit 2
if [ "$continue_earlier" = 1 ]; then
    if [ ! -e "$WORK/.gpu_check_work" ] || [ ! -s "$WORK/steps.tsv" ]; then
        echo "gpu_check: --continue: no earlier check in $WORK to continue; run without --continue" >&2
        exit 2
    fi
    # the steps the earlier run had no time for run now; everything else it recorded stands
    grep -vF $'\tskipped: out of time' "$WORK/steps.tsv" > "$WORK/steps.tsv.kept"
    mv "$WORK/steps.tsv.kept" "$WORK/steps.tsv"
    mkdir -p "$out" && touch "$out/.gpu_check_out"
else
    rm -rf "$WORK" && mkdir -p "$WORK" "$out" && touch "$WORK/.gpu_check_work" "$out/.gpu_check_out"
fi
# The carried wheels go here (step "install"), ahead of the interpreter's own packages.
SITE=$WORK/site
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed's CPU accelerator JIT-builds its shm_comm op at start (minutes on a busy machine, once):
# keep it across rehearsals, apart from the dev venv's build (another torch: each would rebuild over
# the other's). CUDA runs build nothing at start.
export TORCH_EXTENSIONS_DIR=${GPU_CHECK_TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions_gpu_check}
# Triton's and inductor's caches default to HOME and /tmp/torchinductor_USER: in the work dir, the
# one place known to be writable, and cold in the rehearsal as on a fresh GPU machine.
export TRITON_CACHE_DIR=$WORK/cache/triton TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor
for need in "$CARRY/wheelhouse" "$CARRY/data/manifest.json"; do
    [ -e "$need" ] || { echo "gpu_check: $need is missing: run 'make gpu-carry' first (and carry gpu_carry)" >&2; exit 2; }
done

start=$SECONDS
recorded() {  # recorded NAME: true when the work folder's record holds the step (--continue: done)
    cut -f1 "$WORK/steps.tsv" 2> /dev/null | grep -qxF "$1" && echo "=== $1: recorded by the earlier run"
}
step() {  # step NAME TIMEOUT_S COMMAND...: run with a timeout, log to WORK/NAME.log, record the result
    local name=$1 limit=$(($2 * SLOW)) left=$((BUDGET_S - (SECONDS - start)))
    shift 2
    recorded "$name" && return
    selected "$name" || { skip "$name" "not selected (--only)"; return; }
    local log="$WORK/${name// /_}.log" began=$SECONDS rc
    # a step's own folder is named after it (WORK/train_fp8): what one the budget stopped left there
    # (a run without its end, which train would refuse to write over) goes before it runs again
    rm -rf "${log%.log}"
    if [ "$left" -lt 10 ]; then
        echo "=== $name: skipped: out of time"
        printf '%s\tskipped: out of time\t0\n' "$name" >> "$WORK/steps.tsv"
        return
    fi
    local cut=0
    [ "$limit" -gt "$left" ] && limit=$left && cut=1
    echo "=== $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    local status=pass
    [ $rc -ne 0 ] && status="FAIL"
    [ $rc -eq 124 ] && echo "--- $name: timed out after ${limit}s"
    # stopped by the budget, not by its own limit: for --continue to run again
    [ $rc -eq 124 ] && [ $cut = 1 ] && status="skipped: out of time (stopped after ${limit}s)"
    echo "--- $name: $status (exit $rc, $((SECONDS - began)) s)"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - began))" >> "$WORK/steps.tsv"
}
skip() {  # skip NAME REASON
    recorded "$1" && return
    echo "=== $1: skipped: $2"
    printf '%s\tskipped: %s\t0\n' "$1" "$2" >> "$WORK/steps.tsv"
}

# --- the interpreter: the GPU image's python3, or (--cpu) a clean venv standing in for it
wheel_names=$(ls "$CARRY"/wheelhouse/*.whl | xargs -n1 basename | sed 's/-.*//' | sort -u)
if [ "$mode" = cpu ]; then
    VENV=${GPU_CHECK_VENV:-$REPO/.cache/gpu_check_venv}
    base=$(image_python) || exit 2
    # The venv's mark (.image) names what it was built from: the Python version and the sha256 of
    # launch/gpu_image.txt. Compared by content, not by the files' times: a fresh clone's files are
    # all newer than a venv kept outside it (GPU_CHECK_VENV), which was rebuilt (4.6 GB) every time.
    version=$("$base" -c "import platform; print(platform.python_version())")
    want="$version $(sha256sum < launch/gpu_image.txt | cut -d' ' -f1)"
    if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.image" 2> /dev/null)" != "$want" ]; then
        # The image: launch/gpu_image.txt from the index (network; once), torch and Triton at the
        # image's versions. No ds-sft dependency that the wheelhouse carries is in this list.
        replaceable "$VENV" .image GPU_CHECK_VENV || exit 2
        rm -rf "$VENV" && "$base" -m venv "$VENV" && touch "$VENV/.image" || exit 2  # .image: mark now, content once built
        "$VENV/bin/pip" install -q -r launch/gpu_image.txt 2>&1 | grep -v "is ignored" || true
        "$VENV/bin/python" -c "import torch, transformers" || exit 2
        echo "$want" > "$VENV/.image"
    fi
    PY=$VENV/bin/python
else
    PY=${PYTHON:-python3}
fi
machine=$("$PY" - <<'EOF' 2>&1
import platform, torch
gpu = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no CUDA"
print(f"{gpu}; torch {torch.__version__}; python {platform.python_version()}; {platform.node()} {platform.machine()}")
EOF
)
[ "$mode" = cpu ] && machine="$machine (--cpu rehearsal: tiny sizes, CUDA-only steps skipped)"
echo "$machine" | tee "$WORK/machine.txt"
has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1

step "install" 90 "$PY" -m pip install --no-index --no-deps --no-cache-dir --no-compile --target "$SITE" \
    --find-links "$CARRY/wheelhouse" $wheel_names
step "imports" 60 "$PY" -c "
import sys, deepspeed, datasets, liger_kernel.transformers.functional, importlib.metadata as m
print(', '.join(f'{n} {m.version(n)}' for n in ('deepspeed', 'datasets', 'liger-kernel', 'torch', 'triton', 'transformers')))
outside = [p.__name__ for p in (deepspeed, datasets, liger_kernel) if not p.__file__.startswith(sys.argv[1])]
if outside: sys.exit(f'{outside} imported from outside the carried folder {sys.argv[1]}')" "$SITE"

# NCCL explains its own failures in the logs (a sandboxed machine may lack what it needs)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
step "collectives" 60 "$PY" bench/gpu_check.py collectives --out "$WORK/collectives.json"

# --- GPU tests (selected above)
# Their time is cold compiles (Triton kernels, seven flex_attention shapes forward and backward), on
# the CPU: with pytest-xdist (the image has it) GPU_TEST_WORKERS processes share the GPU and the cores
# (the H200 machine has 16; with 4 the step took 77-107 s, the most of any).
workers=()
"$PY" -c "import xdist" 2> /dev/null && workers=(-n "${GPU_TEST_WORKERS:-8}")
gpu_pytest() {  # gpu_pytest [PYTEST FLAGS...]: both selections, failing when either fails
    # not slow: the files' slow tests are CPU-path checks at full size, already run by CI
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${workers[@]}" "$@" "${gpu_tests[@]}"
    local rc=$?
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${workers[@]}" "$@" "${fp8_tests[@]}" || rc=1
    return $rc
}
gpu_pytest_env="$(declare -f gpu_pytest); $(declare -p PY gpu_tests fp8_tests workers)"
if [ "$has_cuda" = 1 ]; then
    step "gpu tests" 200 env DS_SFT_GPU_TESTS=1 bash -c "$gpu_pytest_env; gpu_pytest"
else
    step "gpu tests: collect" 30 bash -c "$gpu_pytest_env; gpu_pytest --collect-only"
    skip "gpu tests" "no CUDA"
fi

step "carried data" 30 "$PY" -c "
import sys; from ds_sft.data.shards import PackedDataset; from ds_sft.model.config import ModelConfig
train = PackedDataset(sys.argv[1], 'train')
vocab = train.manifest['tokenizer']['vocab_size']
print(f'{len(train)} rows of {train.seq_len} tokens, vocab {vocab}, sources {train.sources}')
if train.seq_len != 1024 or vocab > ModelConfig.preset('112m').vocab_size:
    sys.exit('the carried data is not 1024-token rows of a vocab the 112m preset holds: make gpu-carry')" "$CARRY/data"
if [ "$has_cuda" = 0 ]; then  # once, and outside the train steps' timeouts (a killed build leaves a lock)
    step "deepspeed cpu op" 150 "$PY" -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
fi

# --- ds-sft train: 112m, ZeRO-2, bf16 and fp8 (--cpu: the tiny preset, a few short steps)
if [ "$has_cuda" = 1 ]; then
    size=(--data_dir "$CARRY/data" --model 112m --micro_batch_size 16 --max_iters 30 --learning_rate 6e-4
          --warmup_iters 5 --min_lr 6e-5)
    train_s=100
else
    # The 112m preset on the carried GPT-2 data is minutes per step on CPU (fp8 emulated far more):
    # the rehearsal wires the same command to the tiny preset on the test suite's rows (vocab 256).
    data=$WORK/data_tiny
    [ -e "$data" ] || "$PY" -c "import sys; from pathlib import Path; from tests.train.helpers import write_data_dir
write_data_dir(Path(sys.argv[1]), train_rows=48, val_rows=8)" "$data" || exit 2
    size=(--data_dir "$data" --model tiny --micro_batch_size 2 --max_iters 6 --learning_rate 3e-3
          --warmup_iters 2 --min_lr 3e-4)
    train_s=60
fi
train_flags=("${size[@]}" --zero_stage 2 --precision bf16 --eval_interval 1000 --eval_iters 2
             --save_interval 1000 --log_interval 5 --wandb_mode disabled --seed 0)
train=("$PY" -m ds_sft.cli train "${train_flags[@]}")
# --fp8 off said, not left to auto: auto is fp8 on an H200 (the first run's "bf16" baseline was fp8)
step "train bf16" "$train_s" "${train[@]}" --grad_accum 1 --out_dir "$WORK/train_bf16" --fp8 off
step "train fp8" "$train_s" "${train[@]}" --grad_accum 1 --out_dir "$WORK/train_fp8" --fp8 "$FP8_MODE"
step "gemm" 30 "$PY" bench/gpu_check.py gemm --n "$([ "$has_cuda" = 1 ] && echo 8192 || echo 512)" --out "$WORK/gemm.json"

# --- the fp8 roofline, calibrated on this GPU (ds_sft/model/fp8_roofline.json; a copy comes back in
# OUT, to commit) before the select: "auto" steps below use it. Without CUDA: the stored table.
roofline() {
    "$PY" bench/fp8_roofline.py --write && cp ds_sft/model/fp8_roofline.json "$out/" \
        && cp bench/results/fp8_roofline.json "$WORK/fp8_roofline_measured.json"
}
if [ "$has_cuda" = 1 ]; then
    # 5 s with eager casts; the torch path's casts now compile first (cold: Triton and inductor)
    step "fp8 roofline" 90 bash -c "$(declare -f roofline); $(declare -p PY out WORK); roofline"
else
    step "fp8 roofline" 30 "$PY" bench/fp8_roofline.py --quick
fi

# --- benchmarks side by side
if [ "$has_cuda" = 1 ]; then
    step "kernels" 90 "$PY" bench/kernel_speed.py --no-cpu --out "$WORK/kernels.json"
    d2048=(--parts c --preset 112m --override d_model=2048,n_heads=16,ffn_hidden=5504,n_layers=8
           --seq_len 1024 --micro_batch 8 --steps 6 --warmup 2 --gemm_size 8192)
    d768=(--parts c --preset 112m --seq_len 1024 --micro_batch 16 --steps 6 --warmup 2 --gemm_size 8192
          --profile_steps 3)
    d768_accum16=(--parts c --preset 112m --seq_len 1024 --micro_batch 16 --grad_accum 16 --steps 3
                  --warmup 1 --gemm_size 8192)
else
    step "kernels" 60 "$PY" bench/kernel_speed.py --quick --out "$WORK/kernels.json"
    d2048=(--parts c --quick)
    d768=(--parts c --quick --profile_steps 1)
    d768_accum16=(--parts c --quick --grad_accum 4)
fi
# fp8 against bf16, side by side in one process (the modes take turns step by step): every
# projection in fp8 and the roofline's choice (select: "auto"), at the 112m preset and d_model 2048
if [ "$has_cuda" = 1 ]; then
    # 10 alternating steps per mode, not bench/fp8.py's 20: the whole check fits its 8 minutes (78 s
    # with 20 steps and 3 modes; now 4 modes, the casts' compile and the eager-casts row)
    step "fp8 vs bf16" 120 "$PY" bench/fp8.py --no-cpu --steps 10 --warmup 3 --out "$WORK/fp8.json"
else
    step "fp8 vs bf16" 60 "$PY" bench/fp8.py --quick --out "$WORK/fp8.json"
fi
# The DeepSpeed train step in bf16 against the GEMM, at the 112m preset (d_model 768, the training
# above; one micro-batch per update, and the recipe's 16) and at d_model 2048
for size in d2048 d768 d768_accum16; do
    declare -n size_flags=$size
    step "step $size bf16" 60 "$PY" bench/train_throughput.py "${size_flags[@]}" --fp8 off \
        --out "$WORK/throughput_${size}_bf16.json"
done

# --- ds-sft train --compile (torch.compile of the engine's module; half again the time for the
# cold compile): last, on the time left. Two micro-batches per update: ZeRO 2's one reduction per
# update (DeepSpeed's coalesce_grad_reduction) under the compiled module, through the CLI, in a process
# that then counts dynamo's graph breaks (WORK/graph_breaks.json, on the page)
step "train bf16 compile" "$((train_s * 3 / 2))" "$PY" bench/gpu_check.py train --out "$WORK/graph_breaks.json" \
    -- "${train_flags[@]}" --grad_accum 2 --out_dir "$WORK/train_bf16_compile" --fp8 off --compile

# --- one page, and the logs in one file (the device tool returns at most 8 files)
rm -f "$out/SUMMARY.md"  # this run's page or none: an earlier one must not pass for it
"$PY" bench/gpu_check.py summary --work "$WORK" --out "$out/SUMMARY.md" > "$WORK/summary.log" 2>&1
status=$?
if [ ! -s "$out/SUMMARY.md" ]; then  # the summary itself broke: still leave a page
    { echo "# gpu_check ($mode): the summary failed"; echo; echo "machine: $machine"; echo '```';
      cat "$WORK/steps.tsv" "$WORK/summary.log"; echo '```'; } > "$out/SUMMARY.md"
    status=1
fi
tar -czf "$out/logs.tar.gz" -C "$WORK" --exclude='checkpoints' --exclude='final' --exclude='./site' --exclude='./cache' .
cat "$out/SUMMARY.md"
echo "gpu_check ($mode): $((SECONDS - start)) s; wrote $out/SUMMARY.md and $out/logs.tar.gz"
untimed=$(grep -cF $'\tskipped: out of time' "$WORK/steps.tsv")
[ "$untimed" -gt 0 ] && echo "gpu_check: $untimed step(s) had no time left: run it again with --continue" \
    "(same machine, same GPU_CHECK_WORK) to run them and summarise both runs"
exit $status

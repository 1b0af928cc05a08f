#!/usr/bin/env bash
# ds-sft training under torchrun: one node (default) or several with a c10d rendezvous.
#
#   launch/torchrun.sh [--dry-run] [--nproc N] [--nnodes N] [--rdzv HOST:PORT] -- <ds-sft train flags>
#
# One node: launch/torchrun.sh --nproc 2 -- --data_dir data_sft --model tiny (N defaults to the GPU
# count, or 2 processes on a CPU-only machine). Several nodes: run the same line on every node with
# --nnodes and the same --rdzv (any node's address). torchrun forwards SIGTERM to the ranks, which
# save a checkpoint and exit; rerun with --resume. --dry-run prints the exact command and exits.
set -euo pipefail
# It runs in the caller's folder, so that a relative path among the train flags (--data_dir data_sft)
# names what it names to the person typing it (it once ran in the checkout, resolving them there);
# the checkout's ds_sft is found through PYTHONPATH.
repo=$(cd "$(dirname "$0")/.." && pwd)
launcher=launch/torchrun.sh
source "$repo/launch/options.sh"

dry_run=0
procs=""
nnodes=1
rdzv=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --nproc) procs=$(value_of "$@"); count --nproc "$procs" 1 4096; shift 2 ;;
        --nnodes) nnodes=$(value_of "$@"); count --nnodes "$nnodes" 1 65536; shift 2 ;;
        --rdzv) rdzv=$(value_of "$@"); endpoint --rdzv "$rdzv"; shift 2 ;;
        --) shift; break ;;
        *) refuse "unknown option $1 (train flags go after --)" ;;
    esac
done

# Several nodes meet at one rendezvous every node names; one node needs none. Either alone was silent:
# --rdzv without --nnodes trained each node on its own, --nnodes without --rdzv had each wait at its
# own 127.0.0.1 for nodes that never came.
if (( 10#$nnodes > 1 )) && [[ -z $rdzv ]]; then
    refuse "--nnodes $nnodes needs --rdzv HOST:PORT, the same on every node (any node's address)"
elif (( 10#$nnodes == 1 )) && [[ -n $rdzv ]]; then
    refuse "--rdzv $rdzv is for several nodes: add --nnodes N (the same on every node), or leave --rdzv out"
fi

if [[ -z $procs ]]; then  # one process per GPU; 2 on a CPU-only machine
    procs=$(python3 -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
if [[ $nnodes -eq 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "$rdzv" --rdzv_id ds-sft)
fi
check_train_flags "$@"
# ds_sft.torchrun: torchrun ending in the failing rank's exit code and one line, not a traceback
command=(python3 -m ds_sft.torchrun "${rendezvous[@]}" --nproc_per_node "$procs" -m ds_sft.train "$@")
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}
# Each rank gets its share of the cores, not all of them (torchrun's default of 1 is too few on CPU).
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}
exec "${command[@]}"

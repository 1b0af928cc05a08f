#!/usr/bin/env bash
# Multi-node ds-sft training through the deepspeed launcher.
#
#   launch/deepspeed_multinode.sh [--dry-run] [--hostfile FILE] [--master_addr HOST] [--master_port PORT] \
#       [--no_ssh --node_rank R] -- <ds-sft train flags>
#
# With ssh (default) run it on the first node: the launcher reads the hostfile and starts
# `python -m ds_sft.train` on every node. Without ssh (--no_ssh), run it on every node with that
# node's --node_rank and the same --master_addr. Resume after a crash by running it again with
# --resume among the train flags. --dry-run prints the exact command and exits.
#
# Example: launch/deepspeed_multinode.sh --hostfile launch/hostfile -- --data_dir data_sft \
#              --base_model smollm2-135m-instruct --deepspeed_config ds_configs/sft_recipe.json
set -euo pipefail
cd "$(dirname "$0")/.."
launcher=launch/deepspeed_multinode.sh
source launch/options.sh

dry_run=0
hostfile=launch/hostfile
master_addr=$(hostname)
master_port=29500
launcher_extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --hostfile) hostfile=$(value_of "$@"); shift 2 ;;
        --master_addr) master_addr=$(value_of "$@"); host --master_addr "$master_addr"; shift 2 ;;
        --master_port) master_port=$(value_of "$@"); count --master_port "$master_port" 1 65535; shift 2 ;;
        --no_ssh) launcher_extra+=(--no_ssh); shift ;;
        --node_rank) node_rank=$(value_of "$@"); count --node_rank "$node_rank" 0 65535
                     launcher_extra+=(--node_rank "$node_rank"); shift 2 ;;
        --) shift; break ;;
        *) refuse "unknown option $1 (train flags go after --)" ;;
    esac
done

command=(deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port"
         "${launcher_extra[@]}" --module ds_sft.train "$@")
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
if [[ ! -f $hostfile ]]; then
    refuse "hostfile $hostfile not found: copy launch/hostfile.example and list your nodes"
fi
# DeepSpeed JIT-builds its ops once into this cache; keep it where every node sees the same path.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec "${command[@]}"

#!/usr/bin/env bash
# Multi-node ds-sft training through the deepspeed launcher.
#
#   launch/deepspeed_multinode.sh [--dry-run] [--hostfile FILE] [--master_addr HOST] [--master_port PORT] \
#       [--no_ssh --node_rank R] -- <ds-sft train flags>
#
# With ssh (default) run it on the first node: the launcher reads the hostfile and starts
# `python -m ds_sft.train` on every node. Without ssh (--no_ssh), run it on every node with that
# node's --node_rank. Either way the nodes meet at the hostfile's first node unless --master_addr
# names another. Resume after a crash by running it again with --resume among the train flags.
# --dry-run prints the exact command and exits.
#
# With ssh, the launcher (pdsh) hands the train flags to each node's shell as one line of text: a
# flag value is refused here unless that shell reads it back unchanged (letters, digits, spaces and
# _ @ + = : , . / -). Other paths run with --no_ssh, where no shell reads them.
#
# Example: launch/deepspeed_multinode.sh --hostfile launch/hostfile -- --data_dir data_sft \
#              --base_model smollm2-135m-instruct --deepspeed_config ds_configs/sft_recipe.json
set -euo pipefail
# It runs in the caller's folder, so that a relative path among the train flags (--data_dir data_sft)
# or --hostfile names what it names to the person typing it (it once ran in the checkout, resolving
# them there); each node changes into this same folder (it must exist there, as on a shared file
# system: the launcher's `cd FOLDER;` leaves a node without it in its home folder), and finds the
# checkout's ds_sft through PYTHONPATH, which the launcher exports to every node.
repo=$(cd "$(dirname "$0")/.." && pwd)
launcher=launch/deepspeed_multinode.sh
source "$repo/launch/options.sh"
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

dry_run=0
hostfile=$repo/launch/hostfile
master_addr=""  # default: the hostfile's first node (below)
master_port=29500
launcher_extra=()
ssh=1
node_rank=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --hostfile) hostfile=$(value_of "$@"); shift 2 ;;
        --master_addr) master_addr=$(value_of "$@"); host --master_addr "$master_addr"; shift 2 ;;
        --master_port) master_port=$(value_of "$@"); count --master_port "$master_port" 1 65535; shift 2 ;;
        --no_ssh) ssh=0; launcher_extra+=(--no_ssh); shift ;;
        --node_rank) node_rank=$(value_of "$@"); count --node_rank "$node_rank" 0 65535
                     launcher_extra+=(--node_rank "$node_rank"); shift 2 ;;
        --) shift; break ;;
        *) refuse "unknown option $1 (train flags go after --)" ;;
    esac
done

# remote_word WHAT WORD: WORD reaches each node's shell intact. The launcher's pdsh runner joins the
# words with spaces, wraps only those holding a space in double quotes and replaces %n and %h, so a
# $(...), backtick, quote, ;, glob or $VAR in a path ran as code on every node or changed the value,
# and an empty word vanished. Refused, not quoted: an added quote would reach the trainer as text.
remote_word() {
    [[ $2 =~ ^[A-Za-z0-9\ _@+=:,./-]+$ ]] \
        || refuse "$1 $(printf %q "$2") would be read again by each node's shell (the launcher's ssh" \
            "runs the train flags as one line of text): use only letters, digits, spaces and" \
            "_ @ + = : , . / - in it, or run with --no_ssh on every node"
}

# deepspeed_python: the interpreter the deepspeed launcher runs in (its sys.executable, which the pdsh
# runner also puts on each node's line unquoted), from the first line of its script; in pip's /bin/sh
# form (a path with a space, or past 127 bytes) from the second: '''exec' PATH "$0" "$@".
deepspeed_python() {
    local script line
    script=$(command -v deepspeed) && IFS= read -r line < "$script" && [[ $line == \#!* ]] || return 1
    line=${line#\#!}
    if [[ $line == /bin/sh ]]; then
        line=$(sed -n 2p "$script")
        [[ $line == "'''exec' "* ]] || return 1  # another kind of wrapper: its Python is not known here
        line=${line#"'''exec' "}
        line=${line%' "$0" "$@"'}
        line=${line#\"}
        line=${line%\"}
    elif [[ $line == */env\ * ]]; then
        line=$(command -v "${line##* }") || return 1
    fi
    printf '%s' "$line"
}

# exported WHERE VALUE HOW: a variable's value the launcher exports to every node. It goes in double
# quotes (when it holds more than letters, digits and _ @ % + = : , . / -), where $, backticks, \ and
# " still act, and pdsh replaces %n and %h: refused, with HOW to change it.
exported() {
    [[ ! $2 =~ [\$\`\\\"%[:cntrl:]] ]] \
        || refuse "$1=$(printf %q "$2") would be read again by each node's shell (the launcher's ssh" \
            "exports it in one line of text): $3 without \$ \` \\ \" %, or run with --no_ssh"
}

# check_deepspeed_env: the launcher also exports every KEY=VALUE line of ~/.deepspeed_env and
# ./.deepspeed_env (the name: $DS_ENV_FILE) to each node, as it does the variables above, and answers
# a line without = with a traceback. Read here as it reads them: the key and value trimmed, CRLF too.
check_deepspeed_env() {
    local name=${DS_ENV_FILE:-.deepspeed_env} file line key value
    local files=(~/"$name" "$PWD/$name")
    [[ $name == /* ]] && files=("$name")  # os.path.join keeps an absolute name as it is
    for file in "${files[@]}"; do
        [[ -f $file ]] || continue
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line%$'\r'}
            [[ $line == *=* ]] || refuse "$file: line $(printf %q "$line") is not KEY=VALUE, which the" \
                "launcher exports to every node: fix or remove that line"
            read -r key <<< "${line%%=*}"
            value=${line#*=}
            value=${value#"${value%%[![:space:]]*}"} value=${value%"${value##*[![:space:]]}"}
            [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || refuse "$file: $(printf %q "$key") is not a variable name," \
                "and the launcher's ssh runs 'export KEY=VALUE' on every node: fix or remove that line"
            exported "$file: $key" "$value" "remove that line, or write its value"
        done < "$file"
    done
}

# check_hostfile: the hostfile as the launcher reads it (HOST slots=N per line, # comments), checked
# here: its own parser answers a bad line, a host listed twice or no host with a traceback.
check_hostfile() {
    [[ -f $hostfile ]] || refuse "hostfile $hostfile not found: copy launch/hostfile.example and list your nodes"
    local line name slots rest hosts=" "
    host_count=0
    while IFS= read -r line || [[ -n $line ]]; do
        read -r name slots rest <<< "${line%$'\r'}"
        [[ -z $name || $name == \#* ]] && continue
        [[ $slots == slots=* && ( -z $rest || $rest == \#* ) ]] \
            || refuse "hostfile $hostfile: '$line' is not 'HOST slots=N' (see launch/hostfile.example)"
        host "hostfile $hostfile: host" "$name"
        count "hostfile $hostfile: $name's slots" "${slots#slots=}" 1 65535
        [[ $hosts != *" $name "* ]] || refuse "hostfile $hostfile lists $name twice: one line per node"
        hosts+="$name "
        [[ $host_count -gt 0 ]] || first_host=$name
        host_count=$((host_count + 1))
    done < "$hostfile"
    [[ $hosts != " " ]] || refuse "hostfile $hostfile lists no node: one line per node, HOST slots=N"
}

# The launcher asserts on a missing or too large --node_rank (a traceback) and ignores one given with ssh.
if [[ $ssh -eq 0 && -z $node_rank ]]; then
    refuse "--no_ssh needs --node_rank R: this node's line in the hostfile, counting from 0"
elif [[ $ssh -eq 1 && -n $node_rank ]]; then
    refuse "--node_rank is for --no_ssh (run on every node, each with its rank); with ssh the launcher numbers the nodes itself"
fi
if [[ $ssh -eq 1 ]]; then
    # each node first changes into this folder, its path unquoted (cd <folder>;): no space either
    [[ $PWD != *" "* ]] || refuse "the folder it runs in, $(printf %q "$PWD"), holds a space, which each" \
        "node's shell splits (the launcher's ssh runs 'cd FOLDER' unquoted): run it from another folder," \
        "or with --no_ssh on every node"
    remote_word "the folder it runs in," "$PWD"
    if python_path=$(deepspeed_python); then  # on each node's line unquoted too: no space either
        [[ $python_path != *" "* ]] || refuse "the deepspeed launcher's Python, $(printf %q "$python_path")," \
            "holds a space, which each node's shell splits (its ssh line names it unquoted): use an" \
            "environment at a path without one, or run with --no_ssh on every node"
        remote_word "the deepspeed launcher's Python" "$python_path"
    fi
    for word in "$@"; do remote_word "train flag" "$word"; done
    # the variables the launcher exports to every node: PYTHON*, NCCL*, MLFLOW*, UCX*, MV2*. All of
    # them, from env -0: compgen -e lists only names bash can hold, and the launcher also exported a
    # name such as 'PYTHONX;touch x;:', which each node's shell ran as a command.
    while IFS= read -r -d '' entry; do
        name=${entry%%=*}
        [[ $name =~ ^(PYTHON|NCCL|MLFLOW|UCX|MV2) ]] || continue
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || refuse "the environment holds $(printf %q "$name"), not" \
            "a variable name, and the launcher's ssh runs 'export NAME=VALUE' on every node: unset it (env -u)"
        exported "\$$name" "${entry#*=}" "unset it, or set it"
    done < <(env -0)
    check_deepspeed_env
fi
if [[ -e $hostfile || $dry_run -eq 0 ]]; then
    check_hostfile
    [[ $ssh -eq 1 ]] || (( 10#$node_rank < host_count )) \
        || refuse "--node_rank $node_rank is not a node of hostfile $hostfile, which lists $host_count (ranks 0 to $((host_count - 1)))"
fi
if [[ -z $master_addr ]]; then
    # the hostfile's first node: rank 0, with ssh or without (on every node alike: with its own name,
    # each node but the first waited for itself); this machine's name when there is no hostfile yet
    master_addr=${first_host:-$(hostname 2>/dev/null || uname -n)}
fi
check_train_flags "$@"
command=(deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port"
         "${launcher_extra[@]}" --module ds_sft.train "$@")
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
# DeepSpeed JIT-builds its ops once into this cache; keep it where every node sees the same path.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}
exec "${command[@]}"

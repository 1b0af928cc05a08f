# The launch scripts' own options, checked before any launcher starts: a wrong value stops in one
# line naming the option, exit 2. Unchecked, torchrun answers `--nproc 0` with a bare AssertionError
# traceback and bash's `set -u` answers a missing value with "unbound variable".
#
# Sourced by launch/torchrun.sh and launch/deepspeed_multinode.sh, which set $launcher first.

# refuse MESSAGE...: the message as one line on stderr, exit 2. It quotes what the user passed (an
# option's value, a hostfile line, a path), so every character that is not printable is shown as its
# code (\x1b, \x0a, \u202e): a value holding an escape sequence drove the terminal (retitled it,
# cleared it), and one holding a newline forged a line of its own under the launcher's name.
refuse() {
    local message="$launcher: $*" shown="" char code i
    for (( i = 0; i < ${#message}; i++ )); do
        char=${message:i:1}
        if [[ $char == [[:print:]] ]]; then
            shown+=$char
        else  # the code point in a UTF-8 locale, the byte in the C locale
            printf -v code '%x' "'$char"
            (( 0x$code <= 0xff )) && printf -v code '\\x%02x' "0x$code" || printf -v code '\\u%04x' "0x$code"
            shown+=$code
        fi
    done
    printf '%s\n' "$shown" >&2
    exit 2
}

# value_of OPTION [NEXT...]: OPTION's value, the next word, which must be there, not be an option (a
# negative number is a value, for count to refuse by name) and not be blank (--out "$DIR" with DIR
# unset chose the default folder without a word).
value_of() {
    [[ $# -ge 2 && ( $2 != -* || $2 =~ ^-[0-9] ) ]] || refuse "$1 needs a value (see the usage at the top of $launcher)"
    [[ $2 =~ [^[:space:]] ]] || refuse "$1: the value is empty (an unset shell variable?): pass a value, or leave $1 out"
    printf '%s' "$2"
}

# count OPTION VALUE MIN MAX: VALUE is a whole number from MIN to MAX (at most 9 digits, so bash's
# 64-bit arithmetic cannot wrap).
count() {
    [[ $2 =~ ^[0-9]{1,9}$ ]] && (( 10#$2 >= $3 && 10#$2 <= $4 )) \
        || refuse "$1 must be a whole number from $3 to $4, got '$2'"
}

# host OPTION VALUE: a host name or address, optionally [IPv6]; no spaces or shell metacharacters, and
# not starting with '-' (ssh would take it for one of its options).
host() {
    [[ $2 =~ ^([A-Za-z0-9][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])$ ]] \
        || refuse "$1 must be a host name or address (node-01, 10.0.0.1, [fd00::1]), got '$2'"
}

# endpoint OPTION VALUE: HOST:PORT, the form torchrun's c10d rendezvous takes.
endpoint() {
    [[ $2 == *:* ]] || refuse "$1 must be HOST:PORT (e.g. node-01:29400), got '$2'"
    host "$1" "${2%:*}"
    count "$1's port" "${2##*:}" 1 65535
}

# check_train_flags FLAG...: the train flags read by train's own parser before any launcher starts (one
# line and exit 2 for a mistyped flag or value, here, not once per rank on every node). --dry-run among
# them is the script's own option put after --, where it was passed to train and the job launched. Only
# train's refusal (exit 2) stops the script: a python3 here that cannot run ds-sft (the ranks run in
# another environment) leaves the flags to the ranks.
check_train_flags() {
    local word said code=0
    for word in "$@"; do
        [[ $word == --dry-run ]] && refuse "--dry-run is an option of $launcher: put it before --"
    done
    said=$(PYTHONPATH=${repo:-$PWD}${PYTHONPATH:+:$PYTHONPATH} python3 -m ds_sft.train --check_flags "$@" \
        2>&1 >/dev/null) || code=$?
    if [[ $code -eq 2 ]]; then
        printf '%s\n' "$said" >&2
        exit 2
    fi
}

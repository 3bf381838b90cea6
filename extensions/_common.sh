# shellcheck shell=sh
# Shared helpers of the shipped btrfs-deploy extensions (POSIX sh; needs
# coreutils, grep and awk on the host; awk code avoids regex intervals, which
# mawk lacks). Sourced, not run:
#   . "$(dirname "$(readlink -f "$0")")/_common.sh"
#
# Paths inside the tree are resolved the way the deployed system will see
# them: a symlink in the tree is followed *within* the tree (an absolute
# target starts again at the tree's root, ".." stops there), so a careless or
# hostile rootfs (etc/hostname -> /etc/hostname) can never make an extension
# write the host's files.

NL='
'

# die MESSAGE...: print to stderr and fail.
die() {
    printf '%s\n' "$*" >&2
    exit 1
}

# warn MESSAGE...: print to stderr.
warn() {
    printf 'warning: %s\n' "$*" >&2
}

# require_tree ARG: sets TREE from the .configure argument.
require_tree() {
    [ -n "${1:-}" ] || die "usage: $(basename "$0") TREE"
    [ -d "$1" ] || die "tree $1 is not a directory"
    TREE=$(cd "$1" && pwd -P) || die "cannot enter $1"
    [ "$TREE" != / ] || die "refusing to configure the host's /"
}

# single_line NAME VALUE: fails when VALUE spans several lines.
single_line() {
    case $2 in
    *"$NL"*) die "$1 must be a single line" ;;
    esac
}

# tree_path PATH: prints the host path of PATH inside $TREE, every symlink
# (including the last component) resolved within the tree. Missing
# components are kept as they are.
tree_path() {
    _tp_rest=$1
    _tp_cur=
    _tp_links=0
    while :; do
        while [ "${_tp_rest#/}" != "$_tp_rest" ]; do
            _tp_rest=${_tp_rest#/}
        done
        [ -n "$_tp_rest" ] || break
        case $_tp_rest in
        */*)
            _tp_comp=${_tp_rest%%/*}
            _tp_rest=${_tp_rest#*/}
            ;;
        *)
            _tp_comp=$_tp_rest
            _tp_rest=
            ;;
        esac
        case $_tp_comp in
        .) continue ;;
        ..)
            _tp_cur=${_tp_cur%/*}
            continue
            ;;
        esac
        if [ -L "$TREE$_tp_cur/$_tp_comp" ]; then
            _tp_links=$((_tp_links + 1))
            [ "$_tp_links" -le 40 ] || die "too many symlinks resolving $1 in the tree"
            _tp_target=$(readlink "$TREE$_tp_cur/$_tp_comp") || die "cannot read link $TREE$_tp_cur/$_tp_comp"
            case $_tp_target in
            /*) _tp_cur= ;;
            esac
            _tp_rest=$_tp_target/$_tp_rest
        else
            _tp_cur=$_tp_cur/$_tp_comp
        fi
    done
    printf '%s\n' "$TREE$_tp_cur"
}

# make_dir PATH MODE [OWNER:GROUP]: creates directory PATH in the tree (and
# missing parents, mode 755 root) unless it exists; sets mode and owner on
# PATH itself when it is created, or always when OWNER:GROUP is given.
make_dir() {
    _md_path=$(tree_path "$1")
    if [ -e "$_md_path" ] && [ ! -d "$_md_path" ]; then
        die "$1 exists in the tree and is not a directory"
    fi
    if [ ! -d "$_md_path" ]; then
        mkdir -p "$_md_path" || die "cannot create $1 in the tree"
        chown "${3:-0:0}" "$_md_path" || die "cannot set the owner of $1"
        chmod "$2" "$_md_path" || die "cannot set the mode of $1"
    elif [ -n "${3:-}" ]; then
        chown "$3" "$_md_path" || die "cannot set the owner of $1"
        chmod "$2" "$_md_path" || die "cannot set the mode of $1"
    fi
}

# write_file PATH MODE [OWNER:GROUP] < CONTENT: replaces file PATH in the
# tree atomically. The directories on the way are resolved within the tree;
# a symlink at PATH itself is replaced by the file. Without OWNER:GROUP an
# existing file keeps its mode and owner (a new one gets MODE, root:root).
write_file() {
    case $1 in
    */*) _wf_dir=$(tree_path "${1%/*}") ;;
    *) _wf_dir=$TREE ;;
    esac
    _wf_dst=$_wf_dir/${1##*/}
    [ -d "$_wf_dir" ] || mkdir -p "$_wf_dir" || die "cannot create the directory of $1 in the tree"
    [ ! -d "$_wf_dst" ] || die "$1 is a directory in the tree"
    _wf_tmp=$(mktemp "$_wf_dir/.btrfs-deploy.XXXXXX") || die "cannot create a file next to $1"
    if ! cat >"$_wf_tmp"; then
        rm -f "$_wf_tmp"
        die "cannot write $1"
    fi
    if [ -z "${3:-}" ] && [ -f "$_wf_dst" ] && [ ! -L "$_wf_dst" ]; then
        chown --reference="$_wf_dst" "$_wf_tmp" && chmod --reference="$_wf_dst" "$_wf_tmp"
    else
        chown "${3:-0:0}" "$_wf_tmp" && chmod "$2" "$_wf_tmp"
    fi || {
        rm -f "$_wf_tmp"
        die "cannot set the mode or owner of $1"
    }
    mv -fT "$_wf_tmp" "$_wf_dst" || {
        rm -f "$_wf_tmp"
        die "cannot replace $1"
    }
}

# passwd_entry NAME: prints NAME's line of the tree's /etc/passwd (empty if none).
passwd_entry() {
    _pe_file=$(tree_path /etc/passwd)
    [ -f "$_pe_file" ] || return 0
    awk -F: -v n="$1" '$1 == n { print; exit }' "$_pe_file"
}

# name_to_id DB NAME: numeric id of user/group NAME in the tree's /etc/DB
# (passwd or group); a number is printed as is; fails when unknown.
name_to_id() {
    case $2 in
    *[!0-9]*) ;;
    '') return 1 ;;
    *)
        printf '%s\n' "$2"
        return 0
        ;;
    esac
    _ni_file=$(tree_path "/etc/$1")
    [ -f "$_ni_file" ] || return 1
    _ni_id=$(awk -F: -v n="$2" '$1 == n { print $3; exit }' "$_ni_file")
    [ -n "$_ni_id" ] || return 1
    printf '%s\n' "$_ni_id"
}

# valid_user_name NAME: like useradd's default NAME_REGEX, 1 to 32
# characters (a trailing '$', for machine accounts, counts).
valid_user_name() {
    single_line "user name" "$1"
    [ "${#1}" -ge 1 ] && [ "${#1}" -le 32 ] || return 1
    printf '%s\n' "$1" | grep -Eq '^[a-z_][a-z0-9_-]*[$]?$'
}

# check_hostname SETTING VALUE: a valid (possibly dotted) host name.
check_hostname() {
    [ -n "$2" ] || die "$1 is not set: give the host name (e.g. --set $1=web1)"
    single_line "$1" "$2"
    [ "${#2}" -le 253 ] || die "$1 is longer than 253 characters"
    printf '%s\n' "$2" | grep -Eq '^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$' ||
        die "$1 '$2' is not a valid host name: letters, digits and '-' in dot-separated labels of 1-63 characters, not starting or ending with '-'"
}

# check_ip SETTING VALUE [cidr]: fails (naming SETTING and saying what is
# wrong) unless VALUE is a unicast IPv4 or IPv6 address, with a /prefix
# length when the third argument is "cidr". The parsing is done by
# `deploy check-ip` (Rust's std::net parsers: no leading zeros, RFC 4291
# IPv6 forms), found through DEPLOY_RUN_IN_TREE, which deploy sets for every
# .check and .configure: a regex cannot get these right.
check_ip() {
    [ -n "${DEPLOY_RUN_IN_TREE:-}" ] && [ -x "$DEPLOY_RUN_IN_TREE" ] ||
        die "$1: cannot validate addresses: DEPLOY_RUN_IN_TREE (the deploy executable) is not set; run this extension through deploy"
    if [ "${3:-}" = cidr ]; then
        set -- "$1" "$2" --prefix
    else
        set -- "$1" "$2"
    fi
    _ci_err=$("$DEPLOY_RUN_IN_TREE" check-ip ${3:-} -- "$2" 2>&1 >/dev/null) ||
        die "$1: ${_ci_err#error: }"
}

# network_file INTERFACE: name of the .network file the network extension
# writes for an interface name or pattern (characters other than letters,
# digits, '.', '_' and '-' become '_').
network_file() {
    printf '10-%s.network\n' "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_')"
}

# absolute_setting_path VALUE: a path setting made absolute: relative paths
# are relative to the config file's folder when a config file is used
# (DEPLOY_CONFIG_DIR), else to the current directory.
absolute_setting_path() {
    case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "${DEPLOY_CONFIG_DIR:-$(pwd)}" "$1" ;;
    esac
}

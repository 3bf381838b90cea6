# shellcheck shell=sh
# Helpers of the systemd-units extension (sourced after _common.sh).

UNIT_DIRS="/etc/systemd/system /usr/local/lib/systemd/system /usr/lib/systemd/system /lib/systemd/system"

# valid_unit NAME: a unit name (type suffix optional: .service is implied).
valid_unit() {
    printf '%s\n' "$1" | grep -Eq '^[A-Za-z0-9:_.\\@-]+$' && [ "${#1}" -le 255 ]
}

# unit_name NAME: NAME with ".service" added when it has no unit type suffix.
unit_name() {
    case $1 in
    *.service | *.socket | *.target | *.timer | *.path | *.mount | *.automount | *.swap | *.slice | *.scope | *.device)
        printf '%s\n' "$1"
        ;;
    *) printf '%s.service\n' "$1" ;;
    esac
}

# find_unit FILE: the in-tree path (/usr/lib/systemd/system/FILE, ...) of
# unit file FILE, empty when there is none.
find_unit() {
    for _fu_d in $UNIT_DIRS; do
        if [ -e "$(tree_path "$_fu_d/$1")" ]; then
            printf '%s\n' "$_fu_d/$1"
            return 0
        fi
    done
}

# install_keys IN-TREE-PATH: "KEY VALUE" lines of the unit's [Install] section.
install_keys() {
    awk '
        /^[ \t]*\[/ { sect = $0; gsub(/[ \t]/, "", sect); next }
        sect == "[Install]" && /^[ \t]*[A-Za-z]+[ \t]*=/ {
            key = $0; sub(/[ \t]*=.*/, "", key); gsub(/[ \t]/, "", key)
            val = $0; sub(/^[^=]*=[ \t]*/, "", val)
            n = split(val, v, /[ \t]+/)
            for (i = 1; i <= n; i++) if (v[i] != "") print key, v[i]
        }' "$(tree_path "$1")"
}

# template_of UNIT: foo@.service for foo@bar.service (empty if not an instance).
template_of() {
    case $1 in
    *@?*.*) printf '%s@.%s\n' "${1%%@*}" "${1##*.}" ;;
    esac
}

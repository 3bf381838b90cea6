# shellcheck shell=sh
# Helpers of the install-files extension (sourced after _common.sh).

# manifest_path: the absolute path of INSTALL_FILES_MANIFEST.
manifest_path() {
    [ -n "${INSTALL_FILES_MANIFEST:-}" ] || die "INSTALL_FILES_MANIFEST is not set: give the path of the manifest (lines: SRC DEST MODE OWNER GROUP [template])"
    single_line INSTALL_FILES_MANIFEST "$INSTALL_FILES_MANIFEST"
    _mp=$(absolute_setting_path "$INSTALL_FILES_MANIFEST")
    [ -f "$_mp" ] || die "INSTALL_FILES_MANIFEST: $_mp does not exist or is not a file"
    printf '%s\n' "$_mp"
}

# render FILE: FILE with every ${NAME} replaced by the value of the variable
# NAME (settings and DEPLOY_*); "$${" stands for a literal "${". An unset
# variable is an error. Every line ends with a newline.
render() {
    awk '
        {
            line = $0; out = ""
            while (match(line, /\$\$\{|\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
                tok = substr(line, RSTART, RLENGTH)
                out = out substr(line, 1, RSTART - 1)
                line = substr(line, RSTART + RLENGTH)
                if (tok == "$${") { out = out "${"; continue }
                name = substr(tok, 3, length(tok) - 3)
                if (!(name in ENVIRON)) {
                    printf "%s line %d: ${%s} is not set (give it with --set %s=... or in [settings])\n", FILENAME, FNR, name, name > "/dev/stderr"
                    bad = 1
                }
                out = out ENVIRON[name]
            }
            print out line
        }
        END { exit bad }' "$1"
}

# for_each_entry FUNCTION: parses the manifest and calls
# FUNCTION LINENO SRC DEST MODE OWNER GROUP TEMPLATE(yes|no) for every entry,
# after validating its syntax. SRC is made absolute (relative to the
# manifest's folder).
for_each_entry() {
    _fe_fn=$1
    _fe_manifest=$(manifest_path)
    _fe_dir=$(dirname "$_fe_manifest")
    _fe_n=0
    _fe_count=0
    while IFS= read -r _fe_line <&3 || [ -n "$_fe_line" ]; do
        _fe_n=$((_fe_n + 1))
        # shellcheck disable=SC2086 # split the line into fields
        set -- $_fe_line
        case ${1:-#} in
        '#'*) continue ;;
        esac
        _fe_where="$_fe_manifest line $_fe_n"
        if [ $# -lt 5 ] || [ $# -gt 6 ]; then
            die "$_fe_where: expected SRC DEST MODE OWNER GROUP [template], got $# fields"
        fi
        _fe_tpl=no
        if [ $# -eq 6 ]; then
            [ "$6" = template ] || die "$_fe_where: the 6th field can only be 'template', not '$6'"
            _fe_tpl=yes
        fi
        case $1 in
        /*) _fe_src=$1 ;;
        *) _fe_src=$_fe_dir/$1 ;;
        esac
        [ -f "$_fe_src" ] || die "$_fe_where: source $_fe_src does not exist or is not a regular file"
        case $2 in
        /*) ;;
        *) die "$_fe_where: destination $2 must be an absolute path in the deployed system" ;;
        esac
        case /$2/ in
        */../* | */./*) die "$_fe_where: destination $2 must not contain . or .. components" ;;
        esac
        case $2 in
        */) die "$_fe_where: destination $2 must name a file, not a directory" ;;
        esac
        printf '%s\n' "$3" | grep -Eq '^[0-7]{3,4}$' || die "$_fe_where: mode $3 is not an octal mode like 0644"
        for _fe_id in "$4" "$5"; do
            printf '%s\n' "$_fe_id" | grep -Eq '^([0-9]+|[A-Za-z_][A-Za-z0-9_.-]*[$]?)$' || die "$_fe_where: '$_fe_id' is not a user/group name or number"
        done
        _fe_count=$((_fe_count + 1))
        "$_fe_fn" "$_fe_n" "$_fe_src" "$2" "$3" "$4" "$5" "$_fe_tpl"
    done 3<"$_fe_manifest"
    [ "$_fe_count" -gt 0 ] || die "$_fe_manifest lists no file"
}

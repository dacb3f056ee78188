# shellcheck shell=bash
# A Python virtualenv holding one pinned package, for the checks that run a PyPI tool
# (scripts/chdb-check, scripts/openapi-check). Sourced, never run; the sourcing script
# defines log and die.
#
#   ensure_venv DIR PACKAGE==VERSION MODULE
#
# Creates DIR with the system python3 (Debian: python3 and python3-venv, installed with
# apt-get when missing) and pip-installs the package, once: a stamp file names what is in it.

venv_as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $*"
    fi
}

venv_system_python() {
    # Debian's interpreter when there is one: python3-venv belongs to it.
    if [[ -x /usr/bin/python3 ]]; then
        printf '/usr/bin/python3\n'
    else
        command -v python3 || true
    fi
}

ensure_venv() {
    local dir=$1 requirement=$2 module=$3 python
    local stamp=$dir/.installed-${requirement//=/-}
    [[ -f $stamp && -x $dir/bin/python ]] && return 0
    python=$(venv_system_python)
    if [[ -z $python ]] || ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
        command -v apt-get >/dev/null 2>&1 || die "python3 with venv is missing and there is no apt-get to install it"
        log "installing python3 and python3-venv (apt-get)"
        venv_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        venv_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            python3 python3-venv >/dev/null
        python=$(venv_system_python)
    fi
    mkdir -p "${dir%/*}"
    rm -rf "$dir"
    log "creating $dir with $requirement (pip)"
    "$python" -m venv "$dir"
    "$dir/bin/pip" install --disable-pip-version-check -q "$requirement" || die "pip install $requirement failed"
    "$dir/bin/python" -c "import $module" || die "$requirement installed but $module does not import"
    touch "$stamp"
}

# Source this file from the repository root: it makes `python` the project's environment.
#
#   1. An already active environment (virtualenv or conda) that imports every requirement
#      is used as it is, so clusters keep their own PyTorch build.
#   2. Otherwise ./.venv is used, created from requirements.txt on first use (a few
#      minutes, once) and brought up to date when the requirements file changes.
#
# ENV_REQUIREMENTS selects the requirements file (default requirements.txt; the tests
# use requirements-dev.txt). PYTHON selects the interpreter that creates .venv.

_env_root=$(pwd)
_env_req=${ENV_REQUIREMENTS:-requirements.txt}
_env_modules="torch torchvision timm transformers tokenizers braceexpand numpy PIL yaml tqdm tensorboard matplotlib pyarrow"
[ "$_env_req" = "requirements-dev.txt" ] && _env_modules="$_env_modules pytest"

_env_missing() {  # prints the modules that $1 cannot import
    "$1" - $_env_modules <<'PY' 2>/dev/null || echo "(python failed)"
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}

_env_stamp_ok() {  # $1: requirements file; true when .venv was filled from its current content
    local stamp="$_env_root/.venv/.requirements-$(basename "$1" .txt).sha256"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(cat "$_env_root/requirements.txt" "$_env_root/$1" | sha256sum | cut -d' ' -f1)" ]
}

_env_use_venv() {
    local venv="$_env_root/.venv" stamp want
    want=$(cat "$_env_root/requirements.txt" "$_env_root/$_env_req" | sha256sum | cut -d' ' -f1)
    stamp="$venv/.requirements-$(basename "$_env_req" .txt).sha256"
    # requirements-dev.txt includes requirements.txt, so a current dev install serves both
    if ! _env_stamp_ok "$_env_req" && ! { [ "$_env_req" = requirements.txt ] && _env_stamp_ok requirements-dev.txt; }; then
        local py=${PYTHON:-python3}
        if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "error: $py is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
            return 1
        fi
        (
            # one installer at a time, also when several jobs start together
            command -v flock >/dev/null && { exec 9>"$_env_root/.venv.lock"; flock 9; }
            if ! _env_stamp_ok "$_env_req"; then  # another job may have finished it meanwhile
                echo ">>> setting up the Python environment in .venv from $_env_req (first run only; a few minutes)"
                [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" || exit 1
                "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$_env_root/$_env_req" || exit 1
                echo "$want" > "$stamp"
                echo ">>> environment ready"
            fi
        ) || { echo "error: installing $_env_req into .venv failed (see the pip messages above)" >&2; return 1; }
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
}

_env_active=${VIRTUAL_ENV:-${CONDA_PREFIX:-}}
if [ -n "$_env_active" ] && [ "$_env_active" != "$_env_root/.venv" ]; then
    _env_lack=$(_env_missing python)
    if [ -z "$_env_lack" ]; then
        echo ">>> using the active environment $_env_active"
    else
        echo ">>> the active environment $_env_active lacks: $_env_lack; using .venv instead" \
             "(pip install -r $_env_req there to use it)"
        _env_use_venv || return 1 2>/dev/null || exit 1
    fi
else
    _env_use_venv || return 1 2>/dev/null || exit 1
fi
unset _env_active _env_lack

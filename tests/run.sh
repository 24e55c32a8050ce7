#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: creates .venv on first use (see
# scripts/env.sh), then runs the linter and pytest. Extra arguments go to pytest.
#
# The Slurm tests (tests/test_slurm.py) start a private Slurm on this machine, which needs
# root. As root, Debian's Slurm packages are installed when missing and the tests must run
# (SLURM_TESTS=required); otherwise they skip and say why. SLURM_TESTS=skip skips them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

slurm_packages="slurmctld slurmd slurm-client munge"

# Slurm's daemons live in sbin, which the PATH of a non-login shell may lack
case ":$PATH:" in
    *:/usr/sbin:*) ;;
    *) export PATH="$PATH:/usr/sbin:/sbin" ;;
esac

have_slurm() {
    local command
    for command in munged slurmctld slurmd sbatch srun scontrol; do
        command -v "$command" > /dev/null || return 1
    done
}

install_slurm() {
    local log policy=/usr/sbin/policy-rc.d added= status=0
    log=$(mktemp)
    echo ">>> installing Slurm for the Slurm tests: apt-get install $slurm_packages"
    # the packages would start their system-wide daemons; the tests start private ones
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $slurm_packages > "$log" 2>&1 ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends $slurm_packages; } >> "$log" 2>&1 ||
        status=$?
    if [ -n "$added" ]; then rm -f "$policy"; fi
    if [ "$status" != 0 ]; then
        tail -n 20 "$log"
        echo "error: installing Slurm failed (see above); SLURM_TESTS=skip runs the suite without the Slurm tests" >&2
    fi
    rm -f "$log"
    return "$status"
}

if [ "$(id -u)" = 0 ] && [ "${SLURM_TESTS:-}" != skip ]; then
    if ! have_slurm; then
        if command -v apt-get > /dev/null; then
            install_slurm
        else
            echo ">>> Slurm is not installed and there is no apt-get: the Slurm tests will skip"
        fi
    fi
    if have_slurm; then
        export SLURM_TESTS=required
    fi
fi

ENV_REQUIREMENTS=requirements-dev.txt . scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check .
python -m pytest "$@"

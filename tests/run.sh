#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: creates .venv on first use (see
# scripts/env.sh), then runs the linter and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ENV_REQUIREMENTS=requirements-dev.txt . scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check .
python -m pytest "$@"

#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: real vLLM on the bundled model, real PEFT
# training, the local Redis and PostgreSQL, and the embedded SQLite path.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# pytest exits 5 when it collected nothing; set -e turns that (and every failure) into a failure.
exec .venv/bin/python -m pytest "$@"

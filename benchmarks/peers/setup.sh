#!/usr/bin/env bash
# Create the peer virtual environments used by benchmarks/interop.py and tests/test_interop.py:
#   $DIR/gptqmodel  GPTQModel 7.6.0 (quantizes and loads on CPU)
#   $DIR/autogptq   AutoGPTQ 0.7.1, pure-python build (loads on CPU; it cannot quantize without CUDA)
# DIR is $GPTQKIT_PEERS_DIR, else ~/.cache/gptqkit/peers. Both venvs pin torch to the 2.13.0 CPU wheel through a
# constraints file so that no CUDA torch is pulled in. A venv is ready once its import check has passed; the
# check writes $DIR/<peer>/.ready, which is what the benchmark and the test look for.
# Usage: benchmarks/peers/setup.sh [gptqmodel] [autogptq]     (default: both)
set -euo pipefail
DIR="${GPTQKIT_PEERS_DIR:-$HOME/.cache/gptqkit/peers}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
cd "$DIR"
echo "torch==2.13.0" > constraints.txt
export BUILD_CUDA_EXT=0 GPTQMODEL_CPU_WORKERS=2 CUDA_VISIBLE_DEVICES=""
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(gptqmodel autogptq)

for peer in "${peers[@]}"; do
  if [ -f "$peer/.ready" ]; then
    echo "$peer: ready in $DIR/$peer"
    continue
  fi
  case "$peer" in
    gptqmodel)
      "$PY" -m venv gptqmodel
      gptqmodel/bin/python -m pip install -q -c constraints.txt torch==2.13.0
      gptqmodel/bin/python -m pip install -q -c constraints.txt gptqmodel==7.6.0
      # optimum lets transformers' own from_pretrained load GPTQ checkpoints (the "transformers" loader)
      gptqmodel/bin/python -m pip install -q -c constraints.txt optimum==2.3.0
      gptqmodel/bin/python -c "import gptqmodel; print('gptqmodel', gptqmodel.__version__)"
      ;;
    autogptq)
      "$PY" -m venv autogptq
      autogptq/bin/python -m pip install -q -c constraints.txt torch==2.13.0
      # The PyPI binary wheel carries CUDA 12.1 / torch 2.2 extensions: build the pure-python sdist instead.
      # Its setup.py imports torch, hence --no-build-isolation. transformers 4.38 / peft 0.10 / accelerate 0.28
      # are the releases contemporary with auto-gptq 0.7.1; newer ones do not fit it.
      autogptq/bin/python -m pip install -q -c constraints.txt --no-build-isolation --no-binary auto-gptq \
        auto-gptq==0.7.1 transformers==4.38.2 peft==0.10.0 accelerate==0.28.0
      autogptq/bin/python -c "import auto_gptq; from auto_gptq import AutoGPTQForCausalLM; print('auto_gptq', auto_gptq.__version__)"
      ;;
    *) echo "unknown peer $peer (gptqmodel|autogptq)" >&2; exit 2 ;;
  esac
  touch "$peer/.ready"
  echo "$peer: installed in $DIR/$peer"
done

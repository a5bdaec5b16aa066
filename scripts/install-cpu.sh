#!/usr/bin/env bash
# Installs sglang-helix with SGLang 0.5.23 on a CPU-only machine (PyPI only), plus everything the
# test suite needs. Exits non-zero if anything is missing afterwards.
# GPU users: `pip install "sglang==0.5.23" && pip install -e .` instead (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# CUDA build of torch: PyPI's torchvision (imported by SGLang) needs it; it runs fine on CPU.
$PY -m pip install -q torch==2.14.1 torchvision==0.29.1
# SGLang without its CUDA-only extras (flashinfer, deep-gemm, ...: ~10 GB of no use on CPU).
$PY -m pip install -q --no-deps sglang==0.5.23
# SGLang's runtime needs that --no-deps left out (pinned where SGLang pins them).
$PY -m pip install -q -r requirements-cpu.txt
# Prefill/decode disaggregation (tests/e2e/test_serve_pd.py): SGLang's PD router and mooncake's
# CPU build (TCP transport).
$PY -m pip install -q sglang-router==0.3.2 mooncake-transfer-engine-non-cuda==0.3.13.post1
# This package with its extras (pyproject.toml): dev (sglang_helix.dev: transformers, tokenizers,
# safetensors, psutil), test (pytest, pytest-timeout, pytest-xdist, hypothesis, triton, matplotlib), bench
# (benchmarks/: matplotlib, tqdm, datasets).
# transformers and tokenizers are pinned above (requirements-cpu.txt); pip adds what is missing.
$PY -m pip install -q -e ".[dev,test,bench]"
# mooncake's engine links libibverbs even for TCP: Debian's libibverbs1 (root only).
if ! ldconfig -p | grep -q libibverbs.so.1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null
  fi
fi
$PY -c "import torch, triton, transformers, sglang_router, sglang_helix.dev.server; from importlib.metadata import version as v; print('torch', torch.__version__, 'triton', triton.__version__, 'sglang', v('sglang'), 'sglang_helix ok')"
# tests/e2e/test_serve_pd.py skips only when sglang_router or mooncake is not installed at all; a
# mooncake that cannot load (no libibverbs.so.1) makes its tests fail, not skip. Say so now.
if ! $PY -c "from mooncake.engine import TransferEngine" 2>/dev/null; then
  echo "install-cpu.sh: ERROR: mooncake's engine does not load (libibverbs.so.1 missing?)." >&2
  echo "  The PD tests (tests/e2e/test_serve_pd.py) will FAIL, not skip. Install Debian's" >&2
  echo "  libibverbs1 as root (apt-get install libibverbs1) and rerun this script, or run the" >&2
  echo "  other tests with: pytest -q --ignore=tests/e2e/test_serve_pd.py" >&2
  exit 1
fi
echo "mooncake engine ok"

#!/usr/bin/env bash
# Installs sglang-helix with SGLang 0.5.23 on a CPU-only machine (PyPI only).
# GPU users: `pip install "sglang==0.5.23" && pip install -e .` instead (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# CUDA build of torch: PyPI's torchvision (imported by SGLang) needs it; it runs fine on CPU.
$PY -m pip install -q torch==2.14.1 torchvision==0.29.1
# SGLang without its CUDA-only extras (flashinfer, deep-gemm, ...: ~10 GB we cannot use here).
$PY -m pip install -q --no-deps sglang==0.5.23
$PY -m pip install -q -r requirements-cpu.txt
# Prefill/decode disaggregation (issue 5): SGLang's PD router and mooncake's CPU build (TCP
# transport). mooncake's engine links libibverbs even for TCP: Debian's libibverbs1 (root only).
$PY -m pip install -q sglang-router==0.3.2 mooncake-transfer-engine-non-cuda==0.3.13.post1
if ! ldconfig -p | grep -q libibverbs.so.1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null
  else
    echo "install-cpu.sh: libibverbs1 missing (apt-get install libibverbs1 as root); PD tests will be skipped" >&2
  fi
fi
$PY -m pip install -q --no-deps -e .
$PY -c "import torch, triton, sglang_helix; print('torch', torch.__version__, 'triton', triton.__version__, 'sglang_helix ok')"

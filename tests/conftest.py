import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# SGLang reads SGLANG_USE_CPU_ENGINE when its modules are imported: set it once for the whole
# session, before any test module imports SGLang, so the order tests run in cannot change it.
if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

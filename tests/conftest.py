import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

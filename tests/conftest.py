import os

import pytest
import torch
from helpers import SUMMARY_KEY, write_summary

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# SGLang reads SGLANG_USE_CPU_ENGINE when its modules are imported: set it once for the whole
# session, before any test module imports SGLang, so the order tests run in cannot change it.
if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


_E2E_SUMMARY: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist controller: keep the e2e worker's server timings (tests/e2e/conftest.py)."""
    _E2E_SUMMARY.extend(getattr(node, "workeroutput", {}).get(SUMMARY_KEY, []))


def pytest_terminal_summary(terminalreporter):
    write_summary(terminalreporter, _E2E_SUMMARY)

"""sglang.Engine (the offline Python API) in a subprocess, with the same CPU settings as the servers.

`run_engine` starts a fresh interpreter that builds `sglang.Engine(**engine_kwargs(...))`, runs
greedy generation for the prompts and prints the token ids as JSON; the parent kills the whole
process tree afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .server import DEFAULT_START_TIMEOUT_S, LOG_TAIL_CHARS, ServerStartError, child_env, kill_tree


ENGINE_SCRIPT = """
import json, sys
from sglang_helix.srt.cpu import sgl_kernel_stub
sgl_kernel_stub.install()
import sglang
spec = json.loads(sys.argv[1])
engine = sglang.Engine(**spec["engine_kwargs"])
try:
    outs = engine.generate(input_ids=spec["prompts"], sampling_params=spec["sampling_params"])
    states = engine.get_server_info().get("internal_states") or [{}]
    result = {"output_ids": [o["output_ids"] for o in outs], "helix": states[0].get("helix")}
    print("SGLANG_HELIX_RESULT " + json.dumps(result), flush=True)
finally:
    engine.shutdown()
"""


def engine_kwargs(model_path: str | os.PathLike[str], tp: int,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """sglang.Engine keyword arguments matching CPU_DEFAULT_ARGS (overrides win)."""
    kwargs: dict[str, Any] = {
        "model_path": str(model_path), "tp_size": tp, "device": "cpu",
        "attention_backend": "torch_native", "dtype": "float32", "max_total_tokens": 4096,
        "mem_fraction_static": 0.05, "grammar_backend": "none", "sampling_backend": "pytorch",
        "log_level": "warning",
    }
    kwargs.update(overrides or {})
    return kwargs


@dataclass(frozen=True)
class EngineRun:
    """What run_engine returns: output_ids [prompt][token] and the Helix state (or None)."""

    output_ids: list[list[int]]
    helix: dict | None


def run_engine(
    model_path: str | os.PathLike[str],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    tp: int = 1,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_START_TIMEOUT_S,
) -> EngineRun:
    """Greedy-generate with an offline `sglang.Engine` in a fresh subprocess.

    Returns the output ids and the engine's Helix state (/server_info's "helix" entry; None when
    Helix is off). Helix is requested the way Engine users do it: SGLANG_HELIX in `env`.

    The subprocess runs in its own process group and is killed (whole tree) on timeout or error.
    """
    spec = {
        "engine_kwargs": engine_kwargs(model_path, tp, overrides),
        "prompts": [list(map(int, p)) for p in prompts],
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            "ignore_eos": True},
    }
    with tempfile.TemporaryFile() as log:
        popen = subprocess.Popen(
            [sys.executable, "-c", ENGINE_SCRIPT, json.dumps(spec)], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env(tp, env),
            start_new_session=True,
        )
        try:
            code = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_tree(popen)
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("SGLANG_HELIX_RESULT "):
            result = json.loads(line[len("SGLANG_HELIX_RESULT "):])
            return EngineRun(result["output_ids"], result["helix"])
    why = "timed out" if code is None else f"exited with code {code}"
    raise ServerStartError(f"sglang.Engine subprocess {why}:\n{text[-LOG_TAIL_CHARS:]}")

"""The `python -m sglang.launch_server` line of a layout, and the plugin's verdict on it.

Every line is checked with the function the plugin's resolution hooks run
(`rules.argv.check_argv` -> `rules.check_launch`, with the model's heads, experts and the weights
the line serves): `plugin_refusal` says why the plugin would refuse it, or None. The weights are
a parameter of the line (`Setting.weights`): fp4 lines serve an NVFP4 checkpoint, which the rules
accept for MLA (its MLA projections stay bf16).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import HelixConfigError
from ..rules.argv import check_argv
from ..rules.model import ModelInfo
from .layouts import Layout

PRECISIONS = ("fp4", "fp8", "bf16")
KV_CACHE_DTYPE_FLAG = {"bf16": "bf16", "fp8": "fp8_e4m3", "fp4": "nvfp4"}  # SGLang's spellings


@dataclass(frozen=True)
class Checkpoint:
    """What a launch line serves for weights at one precision."""

    model_path: str
    weights: str  # dtype of the served weights (attention projections included)
    quantization: str | None = None  # SGLang --quantization (online quantization at load)
    note: str = ""  # how to get model_path when it is not on the hub


def checkpoint(model, precision: str) -> Checkpoint:
    """The checkpoint a launch line names for `model` with `precision` weights: the upstream one
    at its own dtype; a bf16 one quantized to fp8 at load (SGLang `--quantization fp8`); else a
    local copy at `precision` (./<name>-<precision>, with a note on how to make it)."""
    native = model.checkpoint
    if precision == native:
        return Checkpoint(model.hf_id, native)
    if precision == "fp8" and native == "bf16":
        return Checkpoint(model.hf_id, "fp8", quantization="fp8")
    local = f"./{model.hf_id.rsplit('/', 1)[-1]}-{precision}"
    how = (f"dequantize its {native} weights, e.g. with DeepSeek-V3's inference/fp8_cast_bf16.py"
           if precision == "bf16" else "e.g. an NVFP4 export made with NVIDIA ModelOpt")
    article = "an" if precision[0] == "f" else "a"  # "an fp4", "a bf16"
    return Checkpoint(local, precision, note=f"{local}: {article} {precision} copy of {model.hf_id} ({how})")


def line_weights(model, argv) -> str | None:
    """Dtype of the weights a launch line serves (the inverse of `checkpoint`); None if unknown."""
    path, quant = _flag_value(argv, "--model-path"), _flag_value(argv, "--quantization")
    for precision in PRECISIONS:
        ck = checkpoint(model, precision)
        if (ck.model_path, ck.quantization) == (path, quant):
            return ck.weights
    return None


def _flag_value(argv, flag: str) -> str | None:
    argv = list(argv)
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


@dataclass(frozen=True)
class Launch:
    """An SGLang launch line as argv (empty: the layout has no SGLang equivalent) + a note."""

    argv: tuple[str, ...]
    note: str = ""

    @property
    def line(self) -> str:
        return shlex.join(self.argv)


def launch(st, lay: Layout, batch: int) -> Launch:
    """The SGLang command serving `lay` at `st`'s weights and KV dtype, `batch` requests.

    Helix lines leave --page-size out (the plugin uses 64) and name an attention backend the
    plugin accepts where SGLang's default might not be one: torch_native on CPU; flashinfer for
    GQA on GPU (SGLang 0.5.23 defaults GQA to trtllm_mha on Blackwell, which has no Helix path).
    GQA --dcp-size lines name triton, the GQA backend whose decode implements DCP in 0.5.23."""
    if lay.kind == "kvp":
        return Launch((), "no SGLang launch line: Medha-style KVP with a TP-tied FFN has no SGLang equivalent")
    if lay.kind == "dcp" and lay.engine == "vllm":
        return Launch((), f"vLLM, not SGLang: vllm serve {st.model.hf_id} --tensor-parallel-size {lay.tpa} "
                          f"--decode-context-parallel-size {lay.kvp}")
    ck = checkpoint(st.model, st.weights)
    cpu = st.hw.name == "cpu"
    argv = ["python", "-m", "sglang.launch_server", "--model-path", ck.model_path]
    argv += ["--quantization", ck.quantization] if ck.quantization else []
    argv += ["--device", "cpu"] if cpu else []
    argv += _parallel_flags(st, lay, batch, cpu)
    argv += ["--kv-cache-dtype", KV_CACHE_DTYPE_FLAG[st.kv]]
    argv += ["--max-running-requests", str(batch)]
    return Launch(tuple(argv), ck.note)


def _parallel_flags(st, lay: Layout, batch: int, cpu: bool) -> list[str]:
    ep = ["--ep-size", str(lay.ep)] if lay.ep > 1 else []
    if lay.kind == "helix":
        backend = "torch_native" if cpu else None if st.model.mla else "flashinfer"
        flags = ["--tp-size", str(lay.attn_group), *ep]
        flags += ["--attention-backend", backend] if backend else []
        flags += ["--enable-helix", "--helix-kvp-size", str(lay.kvp), "--helix-tpa-size", str(lay.tpa),
                  "--helix-hopb-slices", str(min(lay.hopb, batch))]
        flags += ["--helix-comm-backend", lay.xback] if lay.xback != "a2a" else []
        flags += ["--helix-mla-exchange", "value"] if lay.mla_x == "value" else []
        flags += ["--helix-exchange-dtype", "activation"] if st.exchange_dtype == "activation" else []
        return flags
    if lay.kind == "dcp":
        flags = ["--tp-size", str(lay.tpa), "--dcp-size", str(lay.kvp), *ep]
        if st.model.mla:
            flags += ["--dcp-comm-backend", lay.xback]
            flags += ["--dcp-replicate-q-proj"] if lay.qrep else []
        else:
            flags += ["--attention-backend", "torch_native" if cpu else "triton"]
        return flags
    if lay.kind == "pp":
        return ["--tp-size", str(lay.tpa), "--pp-size", str(lay.pp), *ep]
    if lay.kind == "dpa":
        return ["--tp-size", str(lay.attn_group), "--attn-dp-size", str(lay.dpa), *ep]
    return ["--tp-size", str(lay.attn_group), *ep]


def plugin_refusal(model, argv: Sequence[str]) -> str | None:
    """Why sglang_helix would refuse this launch line (rules.check_launch on the line's flags, the
    model's heads and experts, the weights it serves), or None if it accepts it."""
    info = ModelInfo(model.architecture, model.num_heads, model.num_kv_heads, model.mla, model.num_experts)
    try:
        check_argv(argv, info, line_weights(model, argv))
    except HelixConfigError as exc:
        return str(exc)
    return None

"""gpu_check's report: one row per check (check, shape, result, figure), a failing check turned
into a FAIL row instead of a crash, the markdown table, and `compare` of a kernel's output and LSE
with the fp32 reference under each dtype's tolerance."""

from __future__ import annotations

import dataclasses
import traceback

TOL = {  # dtype name -> (out atol, out rtol, lse atol) vs the fp32 reference
    "bfloat16": (2.5e-2, 2.5e-2, 1e-3),
    "float16": (3e-3, 3e-3, 1e-3),
    "float32": (1e-4, 1e-4, 1e-4),  # input_precision="ieee"; tf32 operands (10-bit mantissa) miss it
}


@dataclasses.dataclass
class Row:
    check: str
    shape: str
    result: str  # PASS / FAIL / SKIP / INFO / BELOW AIM
    figure: str


class Report:
    def __init__(self):
        self.rows: list[Row] = []

    def add(self, check, shape, result, figure=""):
        row = Row(check, shape, result, " ".join(str(figure).split()))
        self.rows.append(row)
        print(f"[{row.result}] {row.check} | {row.shape} | {row.figure}", flush=True)

    def guard(self, check, shape, fn, *args, **kwargs):
        """Run fn; an exception becomes a FAIL row with its text, never a crash."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is a reported row
            traceback.print_exc()
            self.add(check, shape, "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}")
            return None

    def failed(self) -> bool:
        return any(r.result == "FAIL" for r in self.rows)

    def markdown(self) -> str:
        cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| check | shape | result | figure |", "| --- | --- | --- | --- |"]
        lines += [f"| {cell(r.check)} | {cell(r.shape)} | {cell(r.result)} | {cell(r.figure)} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def compare(out, lse, ref_out, ref_lse, dtype_name: str):
    """(ok, figure): out (and lse unless None) vs the fp32 reference; the reference's empty rows
    (lse -inf) must be exactly out 0 / lse -inf; no NaN anywhere."""
    import torch  # noqa: PLC0415

    out, ref_out, ref_lse = out.float(), ref_out.float(), ref_lse.float()
    atol, rtol, lse_atol = TOL[dtype_name]
    empty = torch.isinf(ref_lse)
    problems = []
    if torch.isnan(out).any() or (lse is not None and torch.isnan(lse).any()):
        problems.append("NaN in output")
    if lse is not None and not torch.equal(torch.isneginf(lse), empty):
        problems.append("-inf rows differ from the empty rows")
    if empty.any() and (out[empty] != 0).any():
        problems.append("empty rows not 0")
    d_out = (out - ref_out).abs()
    err_out = float(d_out.max()) if d_out.numel() else 0.0
    if d_out.numel() and not bool((d_out <= atol + rtol * ref_out.abs()).all()):
        problems.append("out beyond tolerance")
    figure = f"max|dout| {err_out:.2e}"
    if lse is not None:
        live = ~empty
        err_lse = float((lse.float()[live] - ref_lse[live]).abs().max()) if live.any() else 0.0
        if err_lse > lse_atol:
            problems.append("lse beyond tolerance")
        figure += f", max|dlse| {err_lse:.2e}"
    figure += f" (tol {atol:g}+{rtol:g}rel" + (f", lse {lse_atol:g})" if lse is not None else ")")
    return not problems, figure + ("; " + "; ".join(problems) if problems else "")

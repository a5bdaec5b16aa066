"""The CPU demo: a real SGLang server with Helix on a tiny DeepSeek-V3-style model.

    python -m sglang_helix.demo                # MLA + MoE, --tp 2 --enable-helix (KVP 2)
    python -m sglang_helix.demo --model gqa --tp 2 --kvp 2 --tpa 1

Builds the tiny random-weight model into ~/.cache/sglang_helix/tiny (no hub), launches
`python -m sglang.launch_server ... --enable-helix` on CPU ranks, sends one request, prints the
completion and each KVP rank's KV pages from /server_info, and shuts the server down.
The weights are random, so the completion is gibberish; the point is the path it took.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import testing_sglang as ts
from .tiny_models import KINDS, ensure_tiny_model

PROMPT = "Helix splits the KV cache of every request by page across ranks, so"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[k for k in KINDS if k != "mla-compat"], default="mla",
                   help="tiny model family: mla (DeepSeek-V3-style MLA + MoE) or gqa (Llama-style)")
    p.add_argument("--tp", type=int, default=2, help="--tp-size = KVP x TPA (CPU ranks, one core each)")
    p.add_argument("--kvp", type=int, help="--helix-kvp-size (default: the plugin's rule)")
    p.add_argument("--tpa", type=int, help="--helix-tpa-size (default: the plugin's rule)")
    p.add_argument("--page-size", type=int, default=8)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    args = p.parse_args(argv)
    if args.tp < 1 or args.max_new_tokens < 1:
        p.error("--tp and --max-new-tokens must be >= 1")
    return args


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--enable-helix", "--page-size", str(args.page_size)]
    if args.kvp is not None:
        flags += ["--helix-kvp-size", str(args.kvp)]
    if args.tpa is not None:
        flags += ["--helix-tpa-size", str(args.tpa)]
    return flags


def print_kv_usage(state: dict) -> None:
    layout = state["layout"]
    print(f"Helix layout: KVP {layout['kvp']} x TPA {layout['tpa']} (N = {layout['world_size']}), "
          f"page size {state['page_size']}, backend {layout['comm_backend']}")
    print(f"logical KV capacity {state['logical_tokens']} tokens; each rank's pool holds "
          f"{state['local_pool_rows']} token rows (1/{layout['kvp']} of it)")
    for rank in state["per_kvp_rank"]:
        print(f"  KVP rank {rank['kvp_rank']}: {rank['used_pages']} of {rank['total_pages']} pages used")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    path = ensure_tiny_model(args.model)
    print(f"model: tiny {args.model} at {path} ({time.monotonic() - t0:.1f} s)")
    with ts.launch_server(path, server_flags(args), tp=args.tp, timeout=args.timeout) as server:
        print(f"server: {' '.join(server.argv[1:])}\n  healthy after {server.start_s:.1f} s at {server.base_url}")
        answer = ts.generate(server.base_url, text=args.prompt, max_new_tokens=args.max_new_tokens,
                             ignore_eos=False)
        print(f"prompt: {args.prompt!r}\ncompletion: {answer['text']!r}")
        meta = answer["meta_info"]
        print(f"({meta['prompt_tokens']} prompt tokens, {meta['completion_tokens']} generated)")
        # the finished request stays in the radix cache, so its pages still count as used
        print_kv_usage(ts.request_json(server.base_url + "/server_info")["internal_states"][0]["helix"])
    print(f"server shut down; total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

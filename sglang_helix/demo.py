"""The CPU demo: the same model served with Helix off and with Helix on must give the same tokens.

    python -m sglang_helix.demo                # DeepSeek-V3-style MLA + MoE, --tp-size 2 (KVP 2)
    python -m sglang_helix.demo --model gqa --tp 2 --kvp 2 --tpa 1

Builds a tiny model locally (sglang_helix.dev.tiny_models, cached under ~/.cache/sglang_helix/tiny
or $SGLANG_HELIX_CACHE; nothing is downloaded): by default "mla-trained", the DeepSeek-V3-style
MLA + MoE model trained here for a few seconds on a short text about Helix (dev.trained_models),
so its greedy continuation of the prompt is words of that text; the other kinds have random
weights and answer with noise. Then it runs two real SGLang servers on CPU ranks, one after the
other, with the same flags except `--enable-helix`:

1. Helix off: plain SGLang tensor parallelism (`--tp-size N`);
2. Helix on: `--tp-size N --enable-helix`; each request's KV pages are split across KVP ranks.

Each server answers the same prompt with greedy decoding. The demo prints both completions,
whether their token ids are identical, and how many KV pages each KVP rank of the Helix server
holds (from /server_info). What matters is that Helix on produces exactly the tokens Helix off
does. Exit status 1 if they differ.
"""

from __future__ import annotations

import argparse
import sys
import time

from .dev import server as ts
from .dev.tiny_models import KINDS, ensure_tiny_model
from .dev.trained_models import BASE_KIND

PROMPT = "Helix splits the KV cache of every request by page across ranks, so"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[k for k in KINDS if k != "mla-compat"], default="mla-trained",
                   help="tiny model: mla-trained (DeepSeek-V3-style MLA + MoE trained on a short "
                        "text, the default), or a random-weight kind: mla, gqa (Llama-style), "
                        "qwen2, qwen3, ...")
    p.add_argument("--tp", type=int, default=2,
                   help="--tp-size of both servers; under Helix = KVP x TPA (CPU ranks, one core each)")
    p.add_argument("--kvp", type=int, help="--helix-kvp-size (default: the plugin's rule)")
    p.add_argument("--tpa", type=int, help="--helix-tpa-size (default: the plugin's rule)")
    p.add_argument("--page-size", type=int, default=8)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each server")
    args = p.parse_args(argv)
    if args.tp < 1 or args.max_new_tokens < 1 or args.page_size < 1:
        p.error("--tp, --page-size and --max-new-tokens must be >= 1")
    return args


def server_flags(args: argparse.Namespace, helix: bool) -> list[str]:
    flags = ["--page-size", str(args.page_size)]
    if not helix:
        return flags
    flags.append("--enable-helix")
    if args.kvp is not None:
        flags += ["--helix-kvp-size", str(args.kvp)]
    if args.tpa is not None:
        flags += ["--helix-tpa-size", str(args.tpa)]
    return flags


def helix_state(base_url: str) -> dict | None:
    """internal_states[0]["helix"] of /server_info (None when Helix is off)."""
    states = ts.request_json(base_url + "/server_info").get("internal_states") or [{}]
    return states[0].get("helix")


def serve_once(path, args: argparse.Namespace, helix: bool) -> tuple[dict, dict | None, dict | None]:
    """Start one server, send the prompt (greedy, fixed length); return the answer and the Helix
    state before and after the request (None, None when Helix is off)."""
    name = "Helix on " if helix else "Helix off"
    t0 = time.monotonic()
    with ts.launch_server(path, server_flags(args, helix), tp=args.tp, timeout=args.timeout) as server:
        print(f"[{name}] python {' '.join(server.argv[1:])}")
        print(f"[{name}] healthy after {server.start_s:.0f} s")
        before = helix_state(server.base_url)
        # ignore_eos: both servers generate exactly max_new_tokens, so the comparison is full length
        answer = ts.generate(server.base_url, text=args.prompt, max_new_tokens=args.max_new_tokens)
        after = helix_state(server.base_url)
    print(f"[{name}] done, server shut down ({time.monotonic() - t0:.0f} s)")
    return answer, before, after


def print_kv_pages(before: dict, after: dict) -> None:
    """Pages per KVP rank: the request's (used after minus used before) and the totals."""
    layout, kvp, page = after["layout"], len(after["per_kvp_rank"]), after["page_size"]
    print(f"Helix on: KVP {layout['kvp']} x TPA {layout['tpa']}, page size {page}, exchange "
          f"{layout['comm_backend']}. Logical page j of a request lives on KVP rank j mod {kvp}.")
    print("KV pages per KVP rank (the finished request stays in the radix cache):")
    for old, new in zip(before["per_kvp_rank"], after["per_kvp_rank"]):
        print(f"  KVP rank {new['kvp_rank']}: {new['used_pages'] - old['used_pages']} pages of this "
              f"request ({new['used_pages']} used in all, of {new['total_pages']})")
    print(f"Each rank's KV pool: {after['local_pool_rows']} token rows, "
          f"{after['kv_bytes_per_rank'] / 2**20:.2f} MiB, for a logical capacity of "
          f"{after['logical_tokens']} tokens; plain TP on the same ranks would hold "
          f"{after['plain_tp_kv_bytes_per_rank'] / 2**20:.2f} MiB per rank for that capacity.")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    path = ensure_tiny_model(args.model)
    trained = args.model in BASE_KIND
    weights = "weights trained on a short text about Helix" if trained else "RANDOM weights"
    print(f"model: tiny {args.model} with {weights} at {path} ({time.monotonic() - t0:.1f} s)")
    print(f"prompt: {args.prompt!r}; greedy, {args.max_new_tokens} new tokens, --tp-size {args.tp}\n")

    off, _, _ = serve_once(path, args, helix=False)
    on, before, after = serve_once(path, args, helix=True)
    ids_off, ids_on = ts.output_ids(off), ts.output_ids(on)
    same = ids_off == ids_on

    if trained:
        print("\nThe model was trained for a few seconds on a short text, so both completions continue")
        print("it. What matters is that Helix on generates exactly the same tokens as Helix off.")
    else:
        print("\nThe model has random weights, so both completions are noise by design. What matters")
        print("is that Helix on generates exactly the same tokens as Helix off.")
    print(f"  Helix off: {off['text']!r}\n             ids {ids_off}")
    print(f"  Helix on : {on['text']!r}\n             ids {ids_on}")
    if same:
        print(f"token-identical: YES (all {len(ids_on)} generated token ids equal)\n")
    else:
        first = next((i for i, (a, b) in enumerate(zip(ids_off, ids_on)) if a != b),
                     min(len(ids_off), len(ids_on)))
        print(f"token-identical: NO (first difference at generated token {first})\n")
    if before is None or after is None:
        print("Helix on: /server_info has no 'helix' state (the plugin did not switch Helix on)")
        same = False
    else:
        print_kv_pages(before, after)
    print(f"\ntotal {time.monotonic() - t0:.0f} s; " + ("OK" if same else "FAILED"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

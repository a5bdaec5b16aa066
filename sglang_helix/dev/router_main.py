"""`python -m sglang_helix.dev.router_main ARGS`: sglang-router's own launcher (the argument parser
and Rust router of `python -m sglang_router.launch_router`) without its import of the Python mini
load balancer, which imports all of SGLang at module level: 7.4-7.6 s of CPU per router start
on the 2-core dev VM (`/usr/bin/time python -c "import sglang_router.launch_router"`, user + sys),
for a debugging mode (`--mini-lb`) these tools never use and refuse here.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence


def main(argv: Sequence[str]) -> None:
    if "--mini-lb" in argv:
        raise SystemExit("--mini-lb: run `python -m sglang_router.launch_router` for the Python "
                         "mini load balancer; this launcher starts the Rust router only")
    stub = types.ModuleType("sglang_router.mini_lb")
    stub.MiniLoadBalancer = None  # the name launch_router imports; only --mini-lb would call it
    sys.modules.setdefault("sglang_router.mini_lb", stub)
    from sglang_router.launch_router import launch_router, parse_router_args

    launch_router(parse_router_args(list(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])

"""One server factory for the whole e2e suite (tests/e2e/servers.py lists every configuration).

- `@pytest.mark.server("name")` on a test or class: the `served` fixture yields that running
  server; its tests run next to each other (collection order is grouped by configuration), so
  each configuration starts once per session;
- one server alive at a time (2 cores): asking for another configuration stops the current one;
  fixtures that launch processes of their own (PD deployments, the offline Engine, a start that
  must fail) take `exclusive_cpu` first, which stops it too;
- transformers references are computed once per (model, prompts, length) in the session;
- at the end, each server's start time and lifetime is printed (growth stays visible).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from servers import SERVERS, ServerSpec

from sglang_helix.dev import server as ts
from sglang_helix.dev.eagle3_training import ensure_eagle3_draft
from sglang_helix.dev.tiny_models import ensure_tiny_model

START_TIMEOUT_S = 300


@dataclass
class Served:
    """A running configuration: its name, spec, model directory and SGLang server."""

    name: str
    spec: ServerSpec
    model: Path
    server: ts.Server

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def log(self) -> str:
        return self.server.log(10**7)


@dataclass
class ServerFactory:
    """Starts configurations by name, at most one alive; records start and alive seconds."""

    cache: Path
    log_dir: Path
    current: tuple[Served, object] | None = None
    timings: dict[str, list[float]] = field(default_factory=dict)

    def get(self, name: str) -> Served:
        if self.current is not None and self.current[0].name == name:
            return self.current[0]
        self.release()
        spec = SERVERS[name]
        model = ensure_tiny_model(spec.model, self.cache)
        args = spec.args
        if spec.draft == "eagle3":
            args += ("--speculative-draft-model-path", str(ensure_eagle3_draft(model)))
        # "{run_dir}" in an env value: a directory of this session (e.g. HiCache storage files)
        env = {k: v.replace("{run_dir}", str(self.log_dir)) for k, v in spec.env}
        context = ts.launch_server(model, args, tp=spec.tp, env=env,
                                   timeout=START_TIMEOUT_S, log_dir=self.log_dir)
        server = context.__enter__()
        self.current = (Served(name, spec, model, server), context)
        start_s, alive_s, starts = self.timings.get(name, (0.0, 0.0, 0))
        # a second start means its tests were not grouped (e.g. a -k selection): shown at the end
        self.timings[name] = [start_s + server.start_s, alive_s - time.monotonic(), starts + 1]
        return self.current[0]

    def release(self) -> None:
        if self.current is None:
            return
        served, context = self.current
        self.current = None
        self.timings[served.name][1] += time.monotonic()
        context.__exit__(None, None, None)


_FACTORY: list[ServerFactory] = []


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny-cache"


@pytest.fixture(scope="session")
def server_factory(tiny_cache, tmp_path_factory):
    factory = ServerFactory(tiny_cache, tmp_path_factory.mktemp("e2e-server-logs"))
    _FACTORY.append(factory)
    yield factory
    factory.release()


@pytest.fixture
def served(request, server_factory) -> Served:
    """The configuration named by the test's `server` marker, running."""
    marker = request.node.get_closest_marker("server")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses `served` without @pytest.mark.server")
    return server_factory.get(marker.args[0])


@pytest.fixture
def exclusive_cpu(server_factory) -> None:
    """Stop the factory's server before a fixture launches processes of its own."""
    server_factory.release()


def pytest_configure(config):
    config.addinivalue_line("markers", "server(name): the e2e server configuration a test uses")


def pytest_collection_modifyitems(session, config, items):
    """Group the e2e tests of each configuration (first appearance order), so every
    configuration starts once; tests without a marker keep their module's place."""
    slots = [i for i, item in enumerate(items) if item.get_closest_marker("server") is not None]
    if not slots:
        return
    unknown = {m.args[0] for m in (items[i].get_closest_marker("server") for i in slots)} - set(SERVERS)
    if unknown:
        raise pytest.UsageError(f"unknown e2e server configuration(s) {sorted(unknown)}: "
                                f"add them to tests/e2e/servers.py")
    order: dict[str, int] = {}
    for i in slots:
        order.setdefault(items[i].get_closest_marker("server").args[0], len(order))
    grouped = sorted((items[i] for i in slots),
                     key=lambda item: order[item.get_closest_marker("server").args[0]])
    for i, item in zip(slots, grouped):
        items[i] = item
    _LAST_SERVER_TEST[:] = [items[slots[-1]].nodeid]


_LAST_SERVER_TEST: list[str] = []


def pytest_runtest_teardown(item, nextitem):
    """After the session's last server test, stop its server (not idle through the rest)."""
    if _FACTORY and _LAST_SERVER_TEST == [item.nodeid]:
        _FACTORY[0].release()


def pytest_terminal_summary(terminalreporter):
    if not _FACTORY or not _FACTORY[0].timings:
        return
    timings = _FACTORY[0].timings
    terminalreporter.write_sep("=", f"e2e servers: {len(timings)} configurations")
    for name, (start_s, alive_s, starts) in sorted(timings.items(), key=lambda kv: -kv[1][1]):
        again = f"  (started {starts} times: its tests were not grouped)" * (starts > 1)
        terminalreporter.write_line(f"{start_s:6.1f}s start {alive_s:6.1f}s in use  {name}{again}")
    total = sum(t[0] for t in timings.values())
    terminalreporter.write_line(f"{total:7.1f}s spent starting servers")

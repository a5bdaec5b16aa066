"""One server factory for the whole e2e suite (tests/e2e/servers.py lists every configuration).

- `@pytest.mark.server("name")` on a test or class: the `served` fixture yields that running
  server; its tests run next to each other (collection order is grouped by configuration, and
  the e2e tests that launch processes of their own come after them), so each configuration
  starts once per session;
- while one configuration serves its tests, the next one in that order is already starting
  (a start is mostly interpreter imports, one launcher process at a time, leaving CPU idle):
  at most two servers exist, the one in use and the next; asking for a configuration stops the
  one in use. Fixtures that launch processes of their own (PD deployments, the offline Engine)
  take `exclusive_cpu` first, which stops both;
- transformers references are computed once per (model, prompts, length) in the session;
- at the end, each server's start time, the time tests waited for it, and its time in use are
  printed (growth stays visible).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import SUMMARY_KEY, write_summary
from servers import E2E_COMMON, SERVERS, ServerSpec

from sglang_helix.dev import server as ts
from sglang_helix.dev.eagle3_training import ensure_eagle3_draft
from sglang_helix.dev.tiny_models import ensure_tiny_model

@dataclass
class Served:
    """A configuration's SGLang server: its name, spec, model directory and server."""

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
class Timing:
    start_s: float = 0.0  # launch -> healthy
    waited_s: float = 0.0  # what the tests spent blocked on it
    alive_s: float = 0.0  # healthy and in use
    starts: int = 0


@dataclass
class ServerFactory:
    """Starts configurations by name: the one in use plus the next one of `order`, starting."""

    cache: Path
    log_dir: Path
    order: list[str] = field(default_factory=list)  # configurations in test order
    current: Served | None = None
    next: Served | None = None  # started, not yet waited for
    in_use_since: float = 0.0
    timings: dict[str, Timing] = field(default_factory=dict)

    def get(self, name: str) -> Served:
        if self.current is not None and self.current.name == name:
            return self.current
        self.release(keep_next=True)
        if self.next is not None and self.next.name == name:
            served, self.next = self.next, None
        else:
            self._stop_next()
            served = self._start(name)
        self.current = served
        later = self.order[self.order.index(name) + 1:] if name in self.order else []
        if later and self.next is None:
            try:
                self.next = self._start(later[0])  # its model is built here, during this start
            except Exception:  # noqa: BLE001 - not this test's failure: its own tests start it
                self.next = None  # again and report why
        waited_from = time.monotonic()
        ts.wait_healthy(served.server, ts.DEFAULT_START_TIMEOUT_S)
        timing = self.timings[name]
        timing.waited_s += time.monotonic() - waited_from
        timing.start_s += served.server.start_s
        self.in_use_since = time.monotonic()
        return served

    def release(self, keep_next: bool = False) -> None:
        """Stop the configuration in use (and the one starting, unless `keep_next`)."""
        if self.current is not None:
            served, self.current = self.current, None
            self.timings[served.name].alive_s += time.monotonic() - self.in_use_since
            ts.kill_tree(served.server.process)
        if not keep_next:
            self._stop_next()

    def _start(self, name: str) -> Served:
        spec = SERVERS[name]
        model = ensure_tiny_model(spec.model, self.cache)
        args = (*E2E_COMMON, *spec.args)
        if spec.draft == "eagle3":
            args += ("--speculative-draft-model-path", str(ensure_eagle3_draft(model)))
        # "{run_dir}" in an env value: a directory of this session (e.g. HiCache storage files)
        env = {k: v.replace("{run_dir}", str(self.log_dir)) for k, v in spec.env}
        server = ts.start_server(model, args, tp=spec.tp, env=env, log_dir=self.log_dir)
        # a second start means its tests were not grouped (e.g. a -k selection): shown at the end
        self.timings.setdefault(name, Timing()).starts += 1
        return Served(name, spec, model, server)

    def _stop_next(self) -> None:
        if self.next is not None:
            served, self.next = self.next, None
            ts.kill_tree(served.server.process)


_FACTORY: list[ServerFactory] = []


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny-cache"


@pytest.fixture(scope="session")
def server_factory(tiny_cache, tmp_path_factory):
    factory = ServerFactory(tiny_cache, tmp_path_factory.mktemp("e2e-server-logs"), order=_ORDER)
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
    """Stop the factory's servers before a fixture launches processes of its own."""
    server_factory.release()


def pytest_configure(config):
    config.addinivalue_line("markers", "server(name): the e2e server configuration a test uses")


def _server_name(item) -> str | None:
    marker = item.get_closest_marker("server")
    return marker.args[0] if marker is not None else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(session, config, items):
    """Group the e2e tests of each configuration (first appearance order), so every
    configuration starts once, and put the tests that launch processes of their own
    (`exclusive_cpu` / `server_factory` without a marker) after them, so they never stop a
    server that later tests need; every other test keeps its place. Under pytest-xdist
    (`--dist loadgroup`) all of them run on one worker, in this order."""
    slots = [i for i, item in enumerate(items) if _server_name(item) is not None
             or {"exclusive_cpu", "server_factory"} & set(item.fixturenames)]
    marked = [items[i] for i in slots if _server_name(items[i]) is not None]
    if not marked:
        return
    unknown = {_server_name(item) for item in marked} - set(SERVERS)
    if unknown:
        raise pytest.UsageError(f"unknown e2e server configuration(s) {sorted(unknown)}: "
                                f"add them to tests/e2e/servers.py")
    first = {name: i for i, name in enumerate(dict.fromkeys(_server_name(item) for item in marked))}
    order = list(first)
    grouped = sorted(marked, key=lambda item: first[_server_name(item)])
    own = [items[i] for i in slots if _server_name(items[i]) is None]
    for i, item in zip(slots, grouped + own):
        items[i] = item
        item.add_marker(pytest.mark.xdist_group("e2e-servers"))
    _ORDER[:] = order
    _LAST_SERVER_TEST[:] = [grouped[-1]]


_ORDER: list[str] = []  # configurations in the order their tests run (the factory starts the next)
_LAST_SERVER_TEST: list[pytest.Item] = []


def pytest_runtest_teardown(item, nextitem):
    """After the session's last server test, stop its server (not idle through the rest)."""
    if _FACTORY and _LAST_SERVER_TEST and _LAST_SERVER_TEST[0] is item:
        _FACTORY[0].release()


def summary_lines() -> list[str]:
    """Each configuration's start, wait and use times (empty if no server ran)."""
    if not _FACTORY or not _FACTORY[0].timings:
        return []
    timings = _FACTORY[0].timings
    lines = []
    for name, t in sorted(timings.items(), key=lambda kv: -kv[1].alive_s):
        again = f"  (started {t.starts} times: its tests were not grouped)" * (t.starts > 1)
        lines.append(f"{t.start_s:6.1f}s start {t.waited_s:6.1f}s waited {t.alive_s:6.1f}s in use  "
                     f"{name}{again}")
    lines.append(f"{sum(t.waited_s for t in timings.values()):7.1f}s waited for servers to start")
    return lines


def pytest_sessionfinish(session):
    """On a pytest-xdist worker, hand the lines to the controller (tests/conftest.py prints them)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[SUMMARY_KEY] = summary_lines()


def pytest_terminal_summary(terminalreporter):
    write_summary(terminalreporter, summary_lines())

"""The SGLang version check at register() (srt.sglang_version), with the installed version faked:
outside the supported range nothing is installed and one warning names both versions; a launch
that asks for Helix there stops, naming the supported version and the fix."""

from __future__ import annotations

import importlib.util
import logging

import pytest
from helpers import NEEDS_SGLANG

from sglang_helix.srt import sglang_version
from sglang_helix.srt.sglang_version import SUPPORTED_SGLANG

pytestmark = NEEDS_SGLANG

if importlib.util.find_spec("sglang") is not None:
    from sglang_helix.srt.cpu import sgl_kernel_stub

    sgl_kernel_stub.install()


@pytest.mark.parametrize("version, ok", [("0.5.23", True), ("0.5.23.post2", True), ("0.5.24", False),
                                         ("0.5.22", False), ("0.6.0", False), (None, False),
                                         ("not-a-version", False)])
def test_supported_range(version, ok):
    assert sglang_version.supported(version) is ok


@pytest.mark.parametrize("argv, env, asked", [
    (["--model-path", "m", "--enable-helix"], {}, True),
    (["--enable-helix=true"], {}, True),
    (["--helix-kvp-size", "2"], {}, True),
    (["--model-path", "m"], {"SGLANG_HELIX": "--enable-helix"}, True),
    (["--model-path", "m"], {"SGLANG_HELIX": " "}, False),
    (["--model-path", "helix-model", "-k", "enable_helix"], {}, False),
])
def test_helix_requested(argv, env, asked):
    assert sglang_version.helix_requested(argv, env) is asked


def _registry_state():
    from sglang.srt.arg_groups.resolution_hooks import _HOOKS
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry

    return ({k: list(v) for k, v in HookRegistry._hooks.items()}, {k: list(v) for k, v in _HOOKS.items()},
            dict(ATTENTION_BACKENDS))


@pytest.fixture
def sglang_0_5_24(monkeypatch):
    from sglang_helix.srt import plugin

    monkeypatch.setattr(sglang_version, "installed_sglang", lambda: "0.5.24")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv("SGLANG_HELIX", raising=False)
    return plugin


def test_unsupported_sglang_installs_nothing_and_logs_one_line(sglang_0_5_24, monkeypatch, caplog):
    monkeypatch.setattr("sys.argv", ["sglang.launch_server", "--model-path", "m"])
    before = _registry_state()
    with caplog.at_level(logging.WARNING, logger="sglang_helix.srt.plugin"):
        sglang_0_5_24.register()
    assert _registry_state() == before and sglang_0_5_24._registered is False
    lines = [r.getMessage() for r in caplog.records if r.name == "sglang_helix.srt.plugin"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "sglang 0.5.24" in lines[0] and SUPPORTED_SGLANG in lines[0]
    assert "installs nothing" in lines[0] and "pip install 'sglang>=0.5.23,<0.5.24'" in lines[0]


@pytest.mark.parametrize("argv, env", [(["--model-path", "m", "--enable-helix"], None),
                                       (["--model-path", "m"], "--enable-helix --helix-kvp-size 2")],
                         ids=["flag", "SGLANG_HELIX"])
def test_helix_on_unsupported_sglang_is_refused_naming_the_version(sglang_0_5_24, monkeypatch, argv, env):
    """SystemExit, not an exception: SGLang's load_plugins() logs and swallows those and would go
    on to argparse's "unrecognized arguments: --enable-helix"."""
    monkeypatch.setattr("sys.argv", ["sglang.launch_server", *argv])
    if env is not None:
        monkeypatch.setenv("SGLANG_HELIX", env)
    before = _registry_state()
    with pytest.raises(SystemExit) as exit_:
        sglang_0_5_24.register()
    message = str(exit_.value)
    assert "--enable-helix" in message and SUPPORTED_SGLANG in message and "sglang 0.5.24" in message
    assert "pip install 'sglang>=0.5.23,<0.5.24'" in message
    assert _registry_state() == before and sglang_0_5_24._registered is False


def test_the_installed_sglang_is_supported():
    """This checkout's tests run against a supported SGLang (else the suite tests nothing real)."""
    assert sglang_version.supported(sglang_version.installed_sglang()), sglang_version.installed_sglang()

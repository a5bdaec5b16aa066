"""The SGLang versions this plugin supports, and what it does on any other.

The hook table's targets (srt.hook_table) are internal paths of SGLang 0.5.23 and move between
releases. On a version outside SUPPORTED_SGLANG `register()` installs nothing (no Helix, no
CPU-engine fixes: SGLang runs as if the plugin were absent) and logs one warning naming the
installed and the supported versions. The Helix flags are then unknown to SGLang's parser, so a
launch that asks for Helix (`--enable-helix` or any `--helix-*` flag on the command line, or
SGLANG_HELIX) is refused right there, before SGLang parses its arguments, with the same two
versions and the fix, instead of argparse's "unrecognized arguments".
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion

from ..rules.flags import ENV_VAR

SUPPORTED_SGLANG = ">=0.5.23,<0.5.24"
INSTALL_HINT = "pip install 'sglang>=0.5.23,<0.5.24'"


def installed_sglang() -> str | None:
    """The installed SGLang distribution's version (None: not installed)."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def supported(version: str | None) -> bool:
    """True if `version` lies in SUPPORTED_SGLANG."""
    try:
        return version is not None and SpecifierSet(SUPPORTED_SGLANG).contains(version)
    except InvalidVersion:
        return False


def helix_requested(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """True if this launch asks for Helix: a Helix flag in `argv`, or SGLANG_HELIX set."""
    if environ.get(ENV_VAR, "").strip():
        return True
    return any(arg == "--enable-helix" or arg.startswith(("--enable-helix=", "--helix-"))
               for arg in argv)


def unsupported_warning(version: str | None) -> str:
    """The one line register() logs on an unsupported SGLang."""
    return (f"sglang_helix: sglang {version or '(not installed)'} is outside the supported "
            f"{SUPPORTED_SGLANG}; the plugin installs nothing (no Helix, no CPU-engine fixes). "
            f"To use it: {INSTALL_HINT}")


def helix_refusal(version: str | None) -> str:
    """Why a launch asking for Helix stops on an unsupported SGLang, and the fix."""
    return (f"sglang_helix: --enable-helix / SGLANG_HELIX needs sglang {SUPPORTED_SGLANG}, but "
            f"sglang {version or '(not installed)'} is installed; {INSTALL_HINT}, or launch "
            f"without --enable-helix, the --helix-* flags and SGLANG_HELIX")

"""Reading a command line (the argparse edge of the rules): the "Helix" argument group, the Helix
flags of an argv or of SGLANG_HELIX, the ServerLayout of a launch line, and a launch line checked
as a whole (`check_argv`, what the planner runs on every line it prints)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from ..config import HelixConfig
from .flags import GROUP_DESCRIPTION, GROUP_TITLE, HELIX_FLAGS, HelixServerArgs
from .model import ModelInfo
from .server import SGLANG_FLAGS, ServerLayout
from .whole_launch import check_launch


def add_helix_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the "Helix" argument group to `parser` (idempotent)."""
    for group in parser._action_groups:
        if group.title == GROUP_TITLE:
            return group
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    for flag in HELIX_FLAGS:
        flag.add_to(group)
    return group


def helix_args_from_namespace(namespace: argparse.Namespace) -> HelixServerArgs:
    values = {f.dest: getattr(namespace, f.dest) for f in HELIX_FLAGS if hasattr(namespace, f.dest)}
    return HelixServerArgs(**values)


def parse_helix_argv(argv: Sequence[str]) -> HelixServerArgs:
    """Pick the Helix flags out of a full SGLang argv (other flags are ignored)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_helix_group(parser)
    known, _unknown = parser.parse_known_args(list(argv))
    return helix_args_from_namespace(known)


def parse_helix_env(value: str | None) -> HelixServerArgs | None:
    """SGLANG_HELIX="--enable-helix --helix-kvp-size 2": the same flags, for sglang.Engine users."""
    if not value or not value.strip():
        return None
    return parse_helix_argv(shlex.split(value))


def layout_from_argv(argv: Sequence[str]) -> ServerLayout:
    """The ServerLayout a launch line asks for, from SGLang's spellings of its flags (other flags
    are ignored; nothing is resolved: an absent flag keeps SGLang's parser default)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    defaults = ServerLayout()
    for flags, dest, kind in SGLANG_FLAGS:
        if kind is bool:
            parser.add_argument(*flags, dest=dest, action="store_true")
        else:
            parser.add_argument(*flags, dest=dest, type=kind, default=getattr(defaults, dest))
    known, _unknown = parser.parse_known_args(list(argv))
    return ServerLayout(**vars(known))


def check_argv(argv: Sequence[str], model: ModelInfo, weights: Any = None) -> HelixConfig | None:
    """check_launch on a launch line: its Helix flags and ServerLayout read as above."""
    return check_launch(parse_helix_argv(argv), layout_from_argv(argv), model, weights)

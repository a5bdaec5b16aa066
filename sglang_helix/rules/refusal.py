"""The one launch refusal every Helix rule raises: HelixConfigError("Helix: <flag + fix>")."""

from __future__ import annotations

from typing import NoReturn

from ..config import HelixConfigError

PREFIX = "Helix: "


def refuse(message: str) -> NoReturn:
    """Refuse a launch; `message` names the flag (or feature) and the fix."""
    raise HelixConfigError(PREFIX + message)

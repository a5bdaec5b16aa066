"""The one exception base of sglang-helix: every error the package raises on purpose is a HelixError.

Catch `HelixError` to handle any refusal or failure of Helix itself; each subclass's message names
the flag, field or call at fault and the fix.
"""

from __future__ import annotations


class HelixError(RuntimeError):
    """Base of every deliberate sglang-helix error; the message names the fix."""

"""sglang-helix: Helix parallelism for SGLang decode."""

from .config import COMM_BACKENDS, HelixConfig, HelixConfigError

__all__ = ["COMM_BACKENDS", "HelixConfig", "HelixConfigError"]
__version__ = "0.1.0"

"""adaquantfl: communication-efficient federated learning with adaptive quantization.

``adaquantfl.run(config)`` and ``adaquantfl.compare(config)`` do what the
``adaquantfl run`` and ``adaquantfl compare`` commands do. The building blocks
live in :mod:`adaquantfl.compression.qsgd`, :mod:`adaquantfl.compression.codec`,
:mod:`adaquantfl.policy`, :mod:`adaquantfl.compression.compressor` and :mod:`adaquantfl.fl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "compare", "run"]

if TYPE_CHECKING:
    from adaquantfl.runner.experiment import compare, run


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import adaquantfl.compression.qsgd` stays light.
    if name in ("run", "compare"):
        from adaquantfl.runner import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'adaquantfl' has no attribute {name!r}")

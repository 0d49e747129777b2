"""adaquantfl: communication-efficient federated learning with adaptive quantization.

The main entry points, by name::

    import adaquantfl

    adaquantfl.run(config)            # one method, as `adaquantfl run CONFIG --out DIR`
    adaquantfl.compare(config)        # every method of [compare], as `adaquantfl compare`
    adaquantfl.load_config(path)      # a TOML config, validated

    adaquantfl.make_compressor("qsgd", bucket_size=512)   # COMPRESSORS by name
    adaquantfl.make_policy("adaquantfl", levels=2)        # POLICIES by name
    adaquantfl.FedServer(params, policy, compressor)      # the server of any engine
    adaquantfl.Simulator(...)                             # many clients, one process

The Flower integration is :mod:`adaquantfl.flower` (``pip install 'adaquantfl[flower]'``);
the quantizer and the wire format are :mod:`adaquantfl.quantize` and
:mod:`adaquantfl.codec` (DESIGN §7), both in :mod:`adaquantfl.compression`.
Names are imported on first use, so ``import adaquantfl`` stays light.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

#: Where each entry point lives.
_ENTRY_POINTS = {
    "run": "adaquantfl.runner.experiment",
    "compare": "adaquantfl.runner.experiment",
    "load_config": "adaquantfl.runner.config",
    "COMPRESSORS": "adaquantfl.compression.compressor",
    "make_compressor": "adaquantfl.compression.compressor",
    "POLICIES": "adaquantfl.policy.registry",
    "make_policy": "adaquantfl.policy.registry",
    "FedServer": "adaquantfl.fl.server",
    "Simulator": "adaquantfl.sim.simulator",
}

__all__ = [
    "COMPRESSORS",
    "POLICIES",
    "FedServer",
    "Simulator",
    "__version__",
    "compare",
    "load_config",
    "make_compressor",
    "make_policy",
    "run",
]

if _typing.TYPE_CHECKING:
    from adaquantfl.compression.compressor import COMPRESSORS, make_compressor
    from adaquantfl.fl.server import FedServer
    from adaquantfl.policy.registry import POLICIES, make_policy
    from adaquantfl.runner.config import load_config
    from adaquantfl.runner.experiment import compare, run
    from adaquantfl.sim.simulator import Simulator


def __getattr__(name: str) -> _typing.Any:
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adaquantfl' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})

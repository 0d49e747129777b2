"""Derived random streams.

Every random draw in a run (client sampling, minibatches, quantizer noise,
dropout, model initialisation, data partitioning) comes from a generator whose
seed is derived from ``(run seed, round, client id, purpose)``. Nothing reads
global random state, and nothing depends on the order in which clients happen
to run. This is what lets the in-process simulator, the Flower engine and a
resumed run produce the same bytes (DESIGN §2).

Notes
-----
The derivation is a BLAKE2b hash of the packed tuple rather than arithmetic on
the seed, so that neighbouring rounds or clients get unrelated streams and the
mapping is stable across Python, NumPy and PyTorch versions.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from adaquantfl.validation import check_int

__all__ = ["PURPOSES", "derive_seed", "numpy_generator", "torch_generator"]

#: The purposes a stream may be drawn for. A fixed list, so that a typo cannot
#: silently create a new, unrelated stream.
PURPOSES: tuple[str, ...] = (
    "sample",  # which clients take part in a round
    "batch",  # a client's minibatch indices
    "quantize",  # the quantizer's rounding noise
    "dropout",  # which selected clients drop out of a round
    "straggler",  # simulated client compute times
    "init",  # the initial global model
    "partition",  # how a data set is split over clients
    "data",  # generated data sets and train/test splits
    "downlink",  # the server's compression of the model it sends
    "probe",  # a client's measurement of what other levels' noise would cost
)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def derive_seed(seed: int, *, purpose: str, round_idx: int = -1, client_id: int = -1) -> int:
    """Return a 64-bit seed for one random stream.

    Parameters
    ----------
    seed : int
        The run seed.
    purpose : str
        One of :data:`PURPOSES`.
    round_idx : int, optional
        Round index, or -1 for streams that do not depend on the round.
    client_id : int, optional
        Client id, or -1 for server-side streams.

    Returns
    -------
    int
        An integer in ``[0, 2**64)``.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random-stream purpose {purpose!r}; allowed: {list(PURPOSES)}")
    for name, value in (("seed", seed), ("round_idx", round_idx), ("client_id", client_id)):
        check_int(name, value, _INT64_MIN, _INT64_MAX)
    material = struct.pack("<qqq", int(seed), int(round_idx), int(client_id)) + purpose.encode()
    digest = hashlib.blake2b(material, digest_size=8, person=b"adaquantfl-rng").digest()
    return int.from_bytes(digest, "little")


def torch_generator(
    seed: int, *, purpose: str, round_idx: int = -1, client_id: int = -1
) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(
        derive_seed(seed, purpose=purpose, round_idx=round_idx, client_id=client_id)
    )
    return generator


def numpy_generator(
    seed: int, *, purpose: str, round_idx: int = -1, client_id: int = -1
) -> np.random.Generator:
    """A NumPy ``Generator`` (PCG64) seeded by :func:`derive_seed`."""
    return np.random.default_rng(
        derive_seed(seed, purpose=purpose, round_idx=round_idx, client_id=client_id)
    )

"""The in-process simulator: many clients in one process, on the shared :mod:`adaquantfl.fl` code.

- :mod:`.simulator`: the round loop and its fault model (:class:`Simulator`,
  :class:`ClientFaults`);
- :mod:`.vectorized`: all participants of a round trained in one batched
  computation (:class:`BatchedTrainer`).
"""

from adaquantfl.sim.simulator import ClientFaults, Simulator
from adaquantfl.sim.vectorized import BatchedTrainer, can_vectorize

__all__ = ["BatchedTrainer", "ClientFaults", "Simulator", "can_vectorize"]

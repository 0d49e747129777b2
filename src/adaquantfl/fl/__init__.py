"""The federated algorithm itself, shared by every engine (DESIGN §2).

- :mod:`.client`: a client's round: the loss on the received model, local SGD,
  the compressed update (:func:`client_update`, :func:`compress_update`);
- :mod:`.server`: the server's round: which clients, their levels, checking,
  combining and the policy (:class:`FedServer`);
- :mod:`.guard`: what the server accepts from a client, and the bounds that
  protect the aggregate and the policy;
- :mod:`.downlink`: what the participants of a round receive: their levels and the
  model, raw or as a compressed change (:class:`RoundPlan`);
- :mod:`.record`: what happened in a round, the results row every engine emits
  (:class:`RoundRecord`).
"""

from adaquantfl.fl.client import (
    ClientError,
    ClientReply,
    LocalTraining,
    client_update,
    compress_update,
    evaluate,
    train_locally,
)
from adaquantfl.fl.downlink import Downlink, RoundPlan
from adaquantfl.fl.record import RoundRecord
from adaquantfl.fl.server import FedServer, select_clients, weighted_mean

__all__ = [
    "ClientError",
    "ClientReply",
    "Downlink",
    "FedServer",
    "LocalTraining",
    "RoundPlan",
    "RoundRecord",
    "client_update",
    "compress_update",
    "evaluate",
    "select_clients",
    "train_locally",
    "weighted_mean",
]

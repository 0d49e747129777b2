"""``adaquant_mod``: the client half of AdaQuantFL for any Flower ClientApp.

    app = ClientApp(mods=[adaquant_mod])

The user's train function stays as it is: it receives the global arrays,
trains, and replies with its local arrays and metrics. Around it, the mod

1. reads the round's plan (levels, seed, round, compressor) from the
   ``aq-*`` keys that :class:`~adaquantfl.flower.AdaQuantFedAvg` put in the
   train ConfigRecord, and flattens the received arrays to ``w_k``;
2. calls the train function (``call_next``);
3. forms ``Delta_i = w_i - w_k`` from the reply's arrays, quantizes it at
   ``s_k`` with the noise stream (seed, round, client id, "quantize") and
   encodes it with :mod:`adaquantfl.compression.codec` (DESIGN §2, step 3), exactly as
   :func:`adaquantfl.fl.client.client_update` does;
4. replies with the encoded bytes (a uint8 Array), ``F_i(w_k)`` and ``n_i``.

Messages without an AdaQuantFL plan (evaluate, query, or a plain FedAvg's
train) pass through untouched.

Notes
-----
The schedule's input is the pre-training loss ``F_i(w_k)``: the mean loss of
the *received* model on the node's training data, measured before training.
The mod cannot measure it itself (it knows neither the model nor the data),
and it cannot call the app's evaluate function instead: Flower 1.41 wraps each
registered function separately with the app's mods
(``flwr.clientapp.client_app._get_decorator``), so ``call_next`` inside a train
message always leads to the train function. The mod therefore reads it from
the train reply's MetricRecord:

- ``pre-train-loss`` (``loss_key``) when the reply has it: the exact rule.
  The example app and the experiment runner's Flower engine report it.
- Otherwise ``train_loss`` (``fallback_loss_key``), the training loss that
  Flower's app templates already report and that Flower's own ``QFedAvg``
  reads as a client's loss. A stock train function then works unchanged, but
  the schedule follows the loss *during* local training (typically below
  ``F_i(w_k)``), not the paper's ``F(w_k)``; the mod logs a warning once.
  ``make_adaquant_mod(fallback_loss_key=None)`` turns this off.

A reply with neither is an error (the strategy drops that node for the
round) rather than a silently invented loss.
"""

from __future__ import annotations

import math
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.fl.client import ClientState, encode_update
from adaquantfl.flower.records import (
    CLIENT_ID_KEY,
    CLIENT_STATE_RECORD,
    DISTORTION_KEY,
    LOSS_PROXY_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PAYLOAD_KEY,
    PRE_TRAIN_LOSS_KEY,
    UPDATE_NORM_KEY,
    ArrayLayout,
    RecordError,
    RoundPlan,
    client_id_of,
    payload_array,
    single_array_record,
    single_metric_record,
)

__all__ = ["FLOWER_TRAIN_LOSS_KEY", "adaquant_mod", "encode_update", "make_adaquant_mod"]

RESIDUAL_KEY = "residual"

#: The training-loss metric of Flower's app templates (and of Flower's ``QFedAvg``).
FLOWER_TRAIN_LOSS_KEY = "train_loss"


def make_adaquant_mod(
    *,
    loss_key: str = PRE_TRAIN_LOSS_KEY,
    fallback_loss_key: str | None = FLOWER_TRAIN_LOSS_KEY,
) -> Mod:
    """Build the client mod; ``loss_key`` names the train reply's pre-training loss metric.

    Parameters
    ----------
    loss_key : str
        Metric of the user's train reply that holds ``F_i(w_k)``.
    fallback_loss_key : str or None
        Metric used instead when the reply has no ``loss_key`` (with a warning,
        once); None makes a missing ``loss_key`` an error. See the module notes.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> msg``, for ``ClientApp(mods=[...])``.
    """

    warned = False

    def read_loss(metrics: MetricRecord) -> tuple[float, bool]:
        """The loss to report, and whether it is the fallback."""
        nonlocal warned
        if loss_key in metrics or fallback_loss_key is None or fallback_loss_key not in metrics:
            # The exact rule, or the error that names both keys.
            return _loss(metrics, loss_key, fallback_loss_key), False
        if not warned:
            warned = True
            log(
                WARNING,
                "adaquant_mod: the train reply has no %r metric; the AdaQuantFL schedule uses "
                "%r (the loss during local training) instead of the received model's loss "
                "before training. Report %r for the exact rule.",
                loss_key,
                fallback_loss_key,
                loss_key,
            )
        return _loss(metrics, fallback_loss_key, None), True

    def adaquant_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not _is_adaquant_train(msg):
            return call_next(msg, context)
        plan = RoundPlan.from_config(_plan_config(msg))
        client_id = client_id_of(context)
        if plan.probe:
            # The strategy only wants to know which client this node is.
            return Message(
                RecordDict({METRICS_RECORD: MetricRecord({CLIENT_ID_KEY: client_id})}),
                reply_to=msg,
            )
        name, received = single_array_record(msg.content, "the train instruction")
        layout = ArrayLayout.of(received)
        params = layout.flatten(received)

        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        _, local_record = single_array_record(reply.content, "the train function's reply")
        metrics = single_metric_record(reply.content, "the train function's reply")
        local = layout.flatten(local_record)
        loss, proxy = read_loss(metrics)
        num_examples = _num_examples(metrics)

        state = _load_client_state(context) if isinstance(plan.compressor, ErrorFeedback) else None
        encoded = encode_update(
            local - params,
            levels=plan.levels,
            compressor=plan.compressor,
            seed=plan.seed,
            round_idx=plan.round_idx,
            client_id=client_id,
            state=state,
        )
        if state is not None:
            _store_client_state(context, state)
        payload = encoded.payload
        out_metrics = MetricRecord(dict(metrics))
        out_metrics[CLIENT_ID_KEY] = client_id
        out_metrics[PRE_TRAIN_LOSS_KEY] = loss
        out_metrics[NUM_EXAMPLES_KEY] = num_examples
        out_metrics[UPDATE_NORM_KEY] = encoded.update_norm
        out_metrics[DISTORTION_KEY] = encoded.distortion
        if proxy:
            out_metrics[LOSS_PROXY_KEY] = 1
        content = RecordDict(
            {
                name: ArrayRecord({PAYLOAD_KEY: payload_array(payload)}),
                METRICS_RECORD: out_metrics,
            }
        )
        return Message(content, reply_to=msg)

    adaquant_mod.__doc__ = __doc__
    return adaquant_mod


#: The mod with the default ``pre-train-loss`` convention (see the module notes).
adaquant_mod: Mod = make_adaquant_mod()


def _load_client_state(context: Context) -> ClientState:
    """The node's own state (its error-feedback residual) from ``Context.state``."""
    record = context.state.array_records.get(CLIENT_STATE_RECORD)
    if record is None or RESIDUAL_KEY not in record:
        return ClientState()
    residual = torch.from_numpy(record[RESIDUAL_KEY].numpy().astype(np.float32, copy=True))
    return ClientState(residual.reshape(-1))


def _store_client_state(context: Context, state: ClientState) -> None:
    if state.residual is None:
        return
    array = Array(state.residual.detach().cpu().numpy())
    context.state[CLIENT_STATE_RECORD] = ArrayRecord({RESIDUAL_KEY: array})


def _is_adaquant_train(msg: Message) -> bool:
    if not msg.has_content():
        return False
    category = msg.metadata.message_type.split(".", 1)[0]
    if category != "train":
        return False
    return any(RoundPlan.present(c) for c in msg.content.config_records.values())


def _plan_config(msg: Message) -> dict[str, object]:
    for config in msg.content.config_records.values():
        if RoundPlan.present(config):
            return dict(config)
    raise RecordError("the train instruction has no AdaQuantFL plan")  # pragma: no cover


def _loss(metrics: MetricRecord, key: str, fallback: str | None) -> float:
    if key not in metrics:
        also = f" (nor the fallback {fallback!r})" if fallback is not None else ""
        raise RecordError(
            f"the train function's reply has no {key!r} metric{also}. adaquant_mod needs "
            "F_i(w_k), the mean loss of the received model on the local training data before "
            f"training (the AdaQuantFL schedule's input): add it to the reply's MetricRecord as "
            f"{key!r}, or build the mod with make_adaquant_mod(loss_key=...) to name the metric "
            "that holds it"
        )
    value = metrics[key]
    if isinstance(value, list) or not math.isfinite(float(value)) or float(value) < 0:
        raise RecordError(f"metric {key!r} must be a finite non-negative number, got {value!r}")
    return float(value)


def _num_examples(metrics: MetricRecord) -> int:
    value = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise RecordError(
            f"the train function's reply must report {NUM_EXAMPLES_KEY!r} as a positive integer "
            f"(the client's aggregation weight n_i), got {value!r}"
        )
    return value

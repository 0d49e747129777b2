"""``adaquant_mod``: the client half of AdaQuantFL for any Flower ClientApp.

    app = ClientApp(mods=[adaquant_mod])

The user's train function stays as it is: it receives the global arrays,
trains, and replies with its local arrays and metrics. Around it, the mod

1. reads the node's plan (levels, seed, round, compressor, which arrays
   travel uncompressed) from the ``aq-*`` keys that
   :class:`~adaquantfl.flower.AdaQuant` added to the train ConfigRecord
   (:mod:`adaquantfl.flower.plan`), and takes the received model ``w_k``;
   with a compressed downlink it first rebuilds ``x_k`` from the change
   messages and the replica it keeps in ``Context.state``, and hands the
   train function ``x_k`` in the model's arrays
   (:mod:`adaquantfl.flower.downlink`);
2. calls the train function (``call_next``);
3. forms ``Delta_i = w_i - w_k`` of the compressed arrays, quantizes it at
   ``s_k`` with the noise stream (seed, round, client id, "quantize") and
   encodes it with :func:`adaquantfl.fl.client.compress_update` (DESIGN §2,
   step 3), exactly as the simulator does;
4. replies with the encoded bytes (a uint8 Array), the arrays that travel
   beside the update (BatchNorm statistics, integer buffers) as the train
   function returned them, and the train function's metrics plus the
   mod's ``aq-*`` keys (:mod:`adaquantfl.flower.records`).

Messages without an AdaQuantFL plan (evaluate, query, or a plain FedAvg's
train) pass through untouched.

Notes
-----
The level policy's input is the pre-training loss ``F_i(w_k)``: the mean loss
of the *received* model on the node's training data, measured before
training. The mod cannot measure it itself (it knows neither the model nor
the data), and it cannot call the app's evaluate function instead: Flower
wraps each registered function separately with the app's mods
(``flwr.clientapp.client_app._get_decorator``), so ``call_next`` inside a
train message always leads to the train function. The mod therefore reads it
from the train reply's MetricRecord:

- ``pre-train-loss`` (``loss_key``) when the reply has it: the exact rule.
  The example app and the experiment runner's Flower engine report it.
- Otherwise ``train_loss`` (``fallback_loss_key``), the training loss that
  Flower's app templates already report and that Flower's own ``QFedAvg``
  reads as a client's loss. A stock train function then works unchanged, but
  the policy follows the loss *during* local training (typically below
  ``F_i(w_k)``), not the paper's ``F(w_k)``; the mod logs a warning once
  per node and sets ``aq-loss-proxy``. ``make_adaquant_mod(fallback_loss_key=None)``
  turns this off.

Either way the value is sent as ``aq-loss``; the user's own metrics are
never changed. A reply with neither is an error (the strategy drops that node
for the round) rather than a silently invented loss.
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from adaquantfl.compression.feedback import ClientCompressor
from adaquantfl.fl.client import compress_update
from adaquantfl.flower.downlink import receive_model
from adaquantfl.flower.layout import ArrayLayout
from adaquantfl.flower.node_state import load_client_state, store_client_state, warn_once
from adaquantfl.flower.plan import RoundPlan
from adaquantfl.flower.records import (
    CLIENT_ID_KEY,
    DISTORTION_KEY,
    LOSS_KEY,
    LOSS_PROXY_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PAYLOAD_KEY,
    PRE_TRAIN_LOSS_KEY,
    UPDATE_NORM_KEY,
    RecordError,
    client_id_of,
    payload_array,
    single_array_record,
    single_metric_record,
    with_content,
)

__all__ = ["FLOWER_TRAIN_LOSS_KEY", "adaquant_mod", "make_adaquant_mod"]

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
        once per node); None makes a missing ``loss_key`` an error. See the module notes.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> msg``, for ``ClientApp(mods=[...])``.
    """
    for name, key in (("loss_key", loss_key), ("fallback_loss_key", fallback_loss_key)):
        if key is not None and (not isinstance(key, str) or not key or key.startswith("aq-")):
            raise ValueError(f"{name} must be the name of a metric of the train reply, got {key!r}")

    def read_loss(metrics: MetricRecord, context: Context) -> tuple[float, bool]:
        """The loss to report, and whether it is the fallback."""
        if loss_key in metrics or fallback_loss_key is None or fallback_loss_key not in metrics:
            # The exact rule, or the error that names both keys.
            return _loss(metrics, loss_key, fallback_loss_key), False
        warn_once(
            context,
            "loss-proxy",
            "adaquant_mod: the train reply has no %r metric; the AdaQuantFL policy is fed %r "
            "(the loss during local training) instead of the received model's loss before "
            "training. Report %r for the exact rule. (Logged once per node.)",
            loss_key,
            fallback_loss_key,
            loss_key,
        )
        return _loss(metrics, fallback_loss_key, None), True

    def adaquant_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        plan_config = _plan_config(msg)
        if plan_config is None:
            return call_next(msg, context)
        plan = RoundPlan.from_config(plan_config)
        client_id = client_id_of(context)
        if plan.probe:
            # The strategy only wants to know which client this node is.
            return Message(
                RecordDict({METRICS_RECORD: MetricRecord({CLIENT_ID_KEY: client_id})}),
                reply_to=msg,
            )
        name, received = single_array_record(msg.content, "the train instruction")
        if plan.downlink is not None:
            model, params, layout = receive_model(context, received, plan.downlink, plan.round_idx)
            # The train function gets x_k in the model's arrays (a copy: the
            # instruction itself stays as the server sent it).
            train_msg = with_content(msg, RecordDict({**dict(msg.content.items()), name: model}))
        else:
            layout = ArrayLayout.of(received, plan.uncompressed)
            params = layout.flatten(received)
            train_msg = msg

        reply = call_next(train_msg, context)
        if reply.has_error():
            return reply
        _, local_record = single_array_record(reply.content, "the train function's reply")
        metrics_name, metrics = single_metric_record(reply.content, "the train function's reply")
        local = layout.flatten(local_record)
        side = layout.side_arrays(local_record)
        loss, proxy = read_loss(metrics, context)
        _num_examples(metrics)  # the server's weight n_i: fail here, with the reason

        client = ClientCompressor(plan.compressor)
        load_client_state(context, client)
        encoded = compress_update(
            local - params,
            levels=plan.levels,
            compressor=client,
            seed=plan.seed,
            round_idx=plan.round_idx,
            client_id=client_id,
        )
        store_client_state(context, client)
        out_metrics = MetricRecord(dict(metrics))
        out_metrics[CLIENT_ID_KEY] = client_id
        out_metrics[LOSS_KEY] = loss
        out_metrics[LOSS_PROXY_KEY] = int(proxy)
        out_metrics[UPDATE_NORM_KEY] = encoded.update_norm
        out_metrics[DISTORTION_KEY] = encoded.distortion
        content = RecordDict(
            {
                name: ArrayRecord({PAYLOAD_KEY: payload_array(encoded.payload), **side}),
                metrics_name: out_metrics,
            }
        )
        return Message(content, reply_to=msg)

    adaquant_mod.__doc__ = __doc__
    return adaquant_mod


#: The mod with the default ``pre-train-loss`` convention (see the module notes).
adaquant_mod: Mod = make_adaquant_mod()


def _plan_config(msg: Message) -> ConfigRecord | None:
    """The ConfigRecord of a train instruction that carries an AdaQuantFL plan, if any."""
    if not msg.has_content() or msg.metadata.message_type.split(".", 1)[0] != "train":
        return None
    for config in msg.content.config_records.values():
        if RoundPlan.present(config):
            return config
    return None


def _loss(metrics: MetricRecord, key: str, fallback: str | None) -> float:
    if key not in metrics:
        also = f" (nor the fallback {fallback!r})" if fallback is not None else ""
        raise RecordError(
            f"the train function's reply has no {key!r} metric{also}. adaquant_mod needs "
            "F_i(w_k), the mean loss of the received model on the local training data before "
            f"training (the AdaQuantFL policy's input): add it to the reply's MetricRecord as "
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
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecordError(
            f"the train function's reply must report {NUM_EXAMPLES_KEY!r} as a positive integer "
            f"(the client's aggregation weight n_i), got {value!r}"
        )
    return value

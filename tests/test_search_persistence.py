"""Checkpointing and resuming the search wrappers mid-stream: ``AutoEmbSearch`` and ``ESAPNSearch``.

A long streaming search is checkpointed after a few batches (``tf.train.Checkpoint(search=...)``, the wrapper's
``save_weights``), restored into a freshly built wrapper of the same configuration, and continued. The restored
wrapper must predict as the original, give the same controller / policy outputs, hold the same optimizer state
and, stepped on the same next batch, end with the same weights as the uninterrupted original. A checkpoint of
another configuration must fail naming what differs. Runs under Keras 3 and, with TF_USE_LEGACY_KERAS=1, Keras 2.
Sizes are tiny (40 users, 30 items, batches of 40).
"""

import numpy as np
import pytest
import tensorflow as tf

from tfemb._keras import IS_KERAS_3, keras
from tfemb.autoemb import AutoEmbSearch, autoemb_layers
from tfemb.esapn import ESAPNSearch, esapn_layers
from tfemb.layers import AutoEmbEmbedding, ESAPNEmbedding

ROWS, BATCH = 200, 40
STEPS = 3  # stream batches before the checkpoint


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    from tfemb.data.synthetic import make_synthetic_cf, synthetic_cf_schema

    df, _ = make_synthetic_cf(num_users=40, num_items=30, num_rows=ROWS, seed=0, task="binary")
    schema = synthetic_cf_schema(df, task="binary")
    schema.fit(df)
    x, y = schema.transform(df)
    return schema, x, y


def batch(data, t):
    _, x, y = data
    rows = slice(BATCH * t, BATCH * (t + 1))
    return {k: tf.constant(v[rows]) for k, v in x.items()}, tf.constant(y[rows])


def _autoemb_model(schema, selection="controller", candidate_dims=(2, 4), **kwargs):
    from tfemb.models import CFNetwork

    def make(name, vocabulary_size, frequencies):
        return AutoEmbEmbedding(vocabulary_size, output_dim=4, candidate_dims=candidate_dims, selection=selection,
                                controller_units=5, max_popularity=9, name=f"{name}_embedding")

    return CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=4, hidden_units=(5,),
                     **kwargs)


def _esapn_model(schema, candidate_dims=(2, 3, 5), **kwargs):
    from tfemb.models import CFNetwork

    def make(name, vocabulary_size, frequencies):
        return ESAPNEmbedding(vocabulary_size, candidate_dims=candidate_dims, history_length=3,
                              name=f"{name}_embedding")

    return CFNetwork(schema, embeddings={"user_id": make, "item_id": make}, embedding_dim=candidate_dims[-1],
                     hidden_units=(5,), **kwargs)


#: case -> schema -> a compiled search wrapper (fresh weights each call: the same configuration).
CASES = {
    # AutoEmb bilevel, with its lazy-Adam twin for the controllers' popularity kernels.
    "autoemb": lambda s: _compiled_autoemb(AutoEmbSearch(_autoemb_model(s))),
    # DARTS logits per id (a row-sparse θ table), SAM's joint mode with θ in the W optimizer.
    "darts_joint": lambda s: _compiled_autoemb(AutoEmbSearch(_autoemb_model(s, selection="darts"), mode="joint"),
                                               controller=False),
    "esapn": lambda s: _compiled_esapn(ESAPNSearch(_esapn_model(s), popularity_embedding_dim=3, policy_units=5,
                                                   seed=3)),
}


def _compiled_autoemb(search, controller=True):
    search.compile(optimizer=keras.optimizers.Adam(0.02),
                   controller_optimizer=keras.optimizers.Adam(0.05) if controller else None)
    return search


def _compiled_esapn(search):
    search.compile(optimizer=keras.optimizers.Adam(0.02), policy_optimizer=keras.optimizers.Adam(0.05))
    return search


def make_search(case, data):
    return CASES[case](data[0])


def run_stream(search, data, start, stop):
    """``stream_batch`` of batches ``start .. stop - 1`` (each with its previous batch, as ``stream_fit``)."""
    for t in range(start, stop):
        search.stream_batch(t, *batch(data, t), batch(data, t - 1) if t else None)


# ---------------------------------------------------------------------------------------------- the state
def optimizers(search):
    """The wrapper's optimizers that hold state: W's, θ's / the policies', the lazy θ twin, the embedding one."""
    out = {"optimizer": search.optimizer}
    for name in ("controller_optimizer", "policy_optimizer", "_theta_sparse_optimizer"):
        if getattr(search, name, None) is not None:
            out[name] = getattr(search, name)
    if search.rec_model.embedding_optimizer is not None:
        out["embedding_optimizer"] = search.rec_model.embedding_optimizer
    return out


def state(search):
    """``{name: value}`` of everything a continued search reads: the recommender's weights (per-id stream state
    included), the policies' weights (batch-norm statistics included), the step counter, every optimizer's
    variables."""
    out = {}
    rec = search.rec_model
    for i, w in enumerate(rec.weights):
        out[f"rec_model/{i}:{w.name}"] = np.asarray(w)
    for name, policy in getattr(search, "policies", {}).items():
        for i, w in enumerate(policy.weights):
            out[f"policies/{name}/{i}:{w.name}"] = np.asarray(w)
    if hasattr(search, "policy_updates"):
        out["policy_updates"] = np.asarray(search.policy_updates)
    for label, optimizer in optimizers(search).items():
        for i, v in enumerate(optimizer.variables):
            out[f"{label}/{i}:{v.name}"] = np.asarray(v)
    return out


def assert_same_state(a, b, what=""):
    sa, sb = state(a), state(b)
    assert len(sa) == len(sb), (what, sorted(set(sa) ^ set(sb)))
    for (ka, va), (kb, vb) in zip(sa.items(), sb.items()):
        np.testing.assert_array_equal(va, vb, err_msg=f"{what}: {ka} vs {kb}")


def decisions(search, data, t=0):
    """The controllers' softmax weights (AutoEmb) or the policies' logits (ESAPN) for the ids of batch ``t``."""
    x, _ = batch(data, t)
    out = {}
    if isinstance(search, ESAPNSearch):
        for name, layer in esapn_layers(search).items():
            ids = x[name]
            state_ = (tf.gather(layer.counts, ids), tf.gather(layer.size_index, ids), layer.last_losses(tf.cast(ids, tf.int64)))
            out[name] = np.asarray(search.policies[name](state_, training=False))
    else:
        for name, layer in autoemb_layers(search).items():
            out[name] = layer.selection_weights(np.asarray(x[name]))
    return out


# ------------------------------------------------------------------------------------------ tf.train.Checkpoint
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_resumes_the_stream_as_the_uninterrupted_run(case, data, tmp_path):
    search = make_search(case, data)
    run_stream(search, data, 0, STEPS)
    path = tf.train.Checkpoint(search=search).save(str(tmp_path / "ckpt"))

    fresh = make_search(case, data)  # what a new process builds: the same configuration, compiled
    assert not np.allclose(np.asarray(fresh.rec_model(batch(data, 0)[0], training=False)),
                           np.asarray(search.rec_model(batch(data, 0)[0], training=False)))
    status = tf.train.Checkpoint(search=fresh).restore(path)
    status.assert_existing_objects_matched()
    # Predictions and the controllers' / policies' decisions, before any step.
    x = batch(data, STEPS)[0]
    np.testing.assert_array_equal(np.asarray(fresh.rec_model(x, training=False)),
                                  np.asarray(search.rec_model(x, training=False)))
    for name, value in decisions(search, data).items():
        np.testing.assert_array_equal(decisions(fresh, data)[name], value, err_msg=name)
    # The continued stream: the same steps give the same weights, stream state, policies and optimizer slots.
    run_stream(search, data, STEPS, STEPS + 2)
    run_stream(fresh, data, STEPS, STEPS + 2)
    assert_same_state(fresh, search, case)


# ------------------------------------------------------------------------------------- weights files, callbacks
def weights_formats():
    """Keras 3 writes ``.weights.h5`` (the only name its ``save_weights`` and ``ModelCheckpoint`` take); Keras 2
    writes the TF checkpoint format for other names, and also ``.weights.h5``."""
    return ["weights.h5"] if IS_KERAS_3 else ["tf", "weights.h5"]


def weights_file(tmp_path, fmt, name="search"):
    return str(tmp_path / (f"{name}.weights.h5" if fmt == "weights.h5" else f"{name}_ckpt"))


@pytest.mark.parametrize("fmt", weights_formats())
@pytest.mark.parametrize("case", list(CASES))
def test_weights_file_resumes_the_stream_as_the_uninterrupted_run(case, fmt, data, tmp_path):
    """``search.save_weights`` / ``search.load_weights`` into a fresh compiled wrapper: weights, per-id state,
    policies, step counter and every optimizer's state (Keras skipped the state of optimizers not built yet, with
    a warning; the lazy θ twin's slots were not in ``.weights.h5`` files)."""
    search = make_search(case, data)
    run_stream(search, data, 0, STEPS)
    path = weights_file(tmp_path, fmt)
    search.save_weights(path)
    fresh = make_search(case, data)
    fresh.load_weights(path)
    x = batch(data, STEPS)[0]
    np.testing.assert_array_equal(np.asarray(fresh.rec_model(x, training=False)),
                                  np.asarray(search.rec_model(x, training=False)))
    for name, value in decisions(search, data).items():
        np.testing.assert_array_equal(decisions(fresh, data)[name], value, err_msg=name)
    assert_same_state(fresh, search, f"{case} after load_weights")
    run_stream(search, data, STEPS, STEPS + 2)
    run_stream(fresh, data, STEPS, STEPS + 2)
    assert_same_state(fresh, search, case)


# ------------------------------------------------------------------------------------------ what goes wrong
@pytest.mark.parametrize("fmt", ["checkpoint"] + weights_formats())
def test_state_of_another_policy_configuration_fails_naming_it(fmt, data, tmp_path):
    """Restoring an ESAPNSearch's state into one with wider policies: an error naming the policy and the shapes (a
    ``.weights.h5`` file: its arguments too; Keras 3 reported "expected 4 variables, but received 0 variables")."""
    search = make_search("esapn", data)
    run_stream(search, data, 0, 2)
    other = _compiled_esapn(ESAPNSearch(_esapn_model(data[0]), popularity_embedding_dim=3, policy_units=7, seed=3))
    if fmt == "checkpoint":
        path = tf.train.Checkpoint(search=search).save(str(tmp_path / "ckpt"))
        with pytest.raises(ValueError, match=r"incompatible tensor with shape \(5,\) .* shape \(7,\) .*_id_policy/"):
            tf.train.Checkpoint(search=other).restore(path)
        return
    path = weights_file(tmp_path, fmt)
    search.save_weights(path)
    with pytest.raises(ValueError) as error:
        other.load_weights(path)
    message = str(error.value)
    # The policy and both shapes of a variable; Keras 2 names the first variable it cannot assign (under
    # .weights.h5 an optimizer slot, "m/user_id_policy/popularity_kernel"), tfemb's check the policy's arguments.
    assert "_id_policy" in message and ("(5,)" in message and "(7,)" in message
                                        or "(3, 5)" in message and "(3, 7)" in message), message
    if IS_KERAS_3:
        assert "_id_policy: the saved weights do not fit this ESAPNPolicy" in message, message
        assert "hidden_units=7" in message, message

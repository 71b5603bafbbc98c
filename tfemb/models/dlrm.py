"""DLRM: bottom MLP, dot interaction of all feature pairs, top MLP (Naumov et al. 2019)."""

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class DLRM(RecModel):
    """Deep Learning Recommendation Model with the dot interaction.

    ``x = BottomMLP(dense)`` (its last layer has ``embedding_dim`` units, so ``x`` is one more vector beside the
    embeddings); ``z = [<u_i, u_j> for i < j]`` over ``u = [x, v_1..v_F]`` (upper triangle without the diagonal,
    the reference's default ``arch_interaction_itself=False``); ``logits = Dense(out)(TopMLP(concat(x, z)))``.
    Without dense features there is no bottom MLP: ``u = [v_1..v_F]`` and the top MLP reads
    ``concat(v_1..v_F, z)``.

    Defaults follow the reference implementation (facebookresearch/dlrm) for Criteo Kaggle
    (``--arch-mlp-bot 13-512-256-64-16 --arch-mlp-top 512-256-1``): ``bottom_units=(512, 256, 64)`` followed by
    the ``embedding_dim`` layer, ``top_units=(512, 256)`` followed by the output layer, ReLU, no
    regularisation.

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: scheme spec (see ``RecModel``).
        embedding_dim: the embedding dimension (also the bottom MLP's output). Default 16.
        bottom_units: hidden widths of the bottom MLP, before its ``embedding_dim`` layer. Default
            ``(512, 256, 64)``.
        top_units: widths of the top MLP, before the output layer. Default ``(512, 256)``.
        activation: activation of both MLPs. Default ``"relu"``.
        dropout: dropout rate in the top MLP. Default 0.
        l2_dnn: L2 strength of the MLP kernels. Default 0.
        l2_embedding: L2 strength on the looked-up embeddings. Default 0.
        self_interaction: include ``<u_i, u_i>`` in ``z``. Default False.
        **kwargs: ``RecModel`` arguments.

    References:
        - Naumov et al., "Deep Learning Recommendation Model for Personalization and Recommendation Systems",
          arXiv 1906.00091.
    """

    def __init__(self, schema, embeddings=None, embedding_dim=16, bottom_units=(512, 256, 64), top_units=(512, 256),
                 activation="relu", dropout=0.0, l2_dnn=0.0, l2_embedding=0.0, self_interaction=False, **kwargs):
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        self.bottom_units = blocks.check_units("bottom_units", bottom_units)
        self.top_units = blocks.check_units("top_units", top_units)
        self.activation = activation
        self.dropout = blocks.check_rate("dropout", dropout)
        self.l2_dnn = blocks.check_l2("l2_dnn", l2_dnn)
        self.l2_embedding = blocks.check_l2("l2_embedding", l2_embedding)
        self.self_interaction = bool(self_interaction)
        self.bottom = None
        if self.raw_dense_names:  # numeric features embedded as fields (numeric_embeddings) skip the bottom MLP
            self.bottom = blocks.MLP(self.bottom_units + (self.embedding_dim,), activation=activation, l2=self.l2_dnn,
                                     name="bottom_mlp")
        self.top = blocks.MLP(self.top_units, activation=activation, dropout=self.dropout, l2=self.l2_dnn,
                              name="top_mlp")
        self.output_layer = keras.layers.Dense(self.output_units, name="output")

    def interact(self, embedded, dense, training=None):
        blocks.add_embedding_l2(self, embedded, self.l2_embedding, training)
        vectors = [embedded[n] for n in self.field_names]  # F x [batch, dim]
        if self.bottom is not None:
            x = tf.cast(self.bottom(dense, training=training), vectors[0].dtype if vectors else self.compute_dtype)
            vectors = [x] + vectors
            head = [x]  # [batch, dim]
        else:
            head = vectors  # no dense features: the embeddings themselves
        parts = list(head)
        if len(vectors) > 1 or self.self_interaction:
            stacked = tf.stack(vectors, axis=1)  # [batch, 1 + F, dim]
            parts.append(blocks.pairwise_inner_products(stacked, self.self_interaction))  # [batch, pairs]
        x = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
        return self.output_layer(self.top(x, training=training))  # [batch, output_units]

    def get_config(self):
        config = super().get_config()
        config.update({
            "bottom_units": list(self.bottom_units),
            "top_units": list(self.top_units),
            "activation": self.activation,
            "dropout": self.dropout,
            "l2_dnn": self.l2_dnn,
            "l2_embedding": self.l2_embedding,
            "self_interaction": self.self_interaction,
        })
        return config

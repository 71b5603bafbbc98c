"""NeuMF: neural matrix factorisation (GMF + MLP) of He et al. 2017."""

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class NeuMF(RecModel):
    """Neural matrix factorisation: ``logits = Dense(out)(concat(e_u ⊙ e_i, MLP(concat(e_u, e_i))))``.

    The GMF branch is the element-wise product of the user and item embeddings; the MLP branch is a ReLU tower
    over their concatenation; the output layer reads both.

    Simplification: the original NeuMF gives the GMF and MLP branches separate embedding tables. Here both
    branches share the one embedding of each feature that the scheme under study provides, so that the scheme
    is the only table in the model (its size is what tfemb measures). Side features of the schema are ignored
    (no table is built for them).

    Args:
        schema: a fitted ``tfemb.data.Schema`` with the user and item id features.
        embeddings: scheme spec (see ``RecModel``): None, a factory or a dict per feature.
        embedding_dim: dimension of the (shared) embeddings. Default 16.
        user_feature: name of the user id feature. Default ``"user_id"``.
        item_feature: name of the item id feature. Default ``"item_id"``.
        mlp_units: widths of the MLP tower. Default ``(32, 16, 8)`` (the authors' ``--layers [64,32,16,8]``:
            64 is the concatenated input, then 32, 16, 8).
        activation: activation of the tower. Default ``"relu"``.
        dropout: dropout rate in the tower. Default 0.
        l2: L2 strength of the tower and output kernels. Default 0 (the authors' ``reg_layers`` are 0).
        **kwargs: ``RecModel`` arguments.

    References:
        - He et al., "Neural Collaborative Filtering", WWW 2017 (arXiv 1708.05031).
    """

    def __init__(self, schema, embeddings=None, embedding_dim=16, user_feature="user_id", item_feature="item_id",
                 mlp_units=(32, 16, 8), activation="relu", dropout=0.0, l2=0.0, **kwargs):
        self.user_feature = str(user_feature)
        self.item_feature = str(item_feature)
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        self.mlp_units = blocks.check_units("mlp_units", mlp_units)
        self.activation = activation
        self.dropout = blocks.check_rate("dropout", dropout)
        self.l2 = blocks.check_l2("l2", l2)
        self.mlp = blocks.MLP(self.mlp_units, activation=activation, dropout=self.dropout, l2=self.l2, name="mlp")
        self.output_layer = keras.layers.Dense(
            self.output_units, kernel_initializer="lecun_uniform",
            kernel_regularizer=keras.regularizers.L2(self.l2) if self.l2 else None, name="output",
        )

    def _input_features(self):
        return blocks.cf_input_features(self.schema, self.user_feature, self.item_feature)

    def interact(self, embedded, dense, training=None):
        user, item = embedded[self.user_feature], embedded[self.item_feature]  # [batch, dim] each
        gmf = user * item  # [batch, dim]
        mlp = self.mlp(tf.concat([user, item], axis=-1), training=training)  # [batch, mlp_units[-1]]
        return self.output_layer(tf.concat([gmf, mlp], axis=-1))  # [batch, output_units]

    def get_config(self):
        config = super().get_config()
        config.update({
            "user_feature": self.user_feature,
            "item_feature": self.item_feature,
            "mlp_units": list(self.mlp_units),
            "activation": self.activation,
            "dropout": self.dropout,
            "l2": self.l2,
        })
        return config

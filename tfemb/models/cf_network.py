"""CFNetwork: the collaborative-filtering network of the AutoEmb and ESAPN papers."""

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class CFNetwork(RecModel):
    """The "embedding layer -> hidden layer -> output layer" recommender of AutoEmb and ESAPN.

    ``logits = Dense(out)(MLP(BN(concat(e_user, e_item))))``: the user and item embeddings are concatenated,
    batch-normalised, passed through the hidden layer(s) and a linear output layer (1 unit for a binary or
    regression task, 5 for the papers' 5-class rating task).

    The defaults follow the authors' code (github.com/zgahhblhc/ESAPN, ``RS_MLP`` in ``model/train.py`` and in
    the AutoEmb and fixed-size baselines): ``BatchNorm(2d) -> Linear(2d, 512) -> BatchNorm(512) -> Tanh ->
    Linear(512, out)``, i.e. ONE hidden layer of 512 units with tanh and batch normalisation. The papers' "three
    layers" are the embedding, hidden and output layers. A two-hidden-layer ReLU variant is
    ``hidden_units=(h, h), activation="relu", batch_norm=False, input_batch_norm=False``.

    Side features: ignored by default (the papers use user and item ids only; no table is built for other
    features, and their inputs are not needed). With ``side_features=True`` the embeddings of every other sparse
    feature and the dense features are concatenated to the input of the hidden layer.

    Args:
        schema: a fitted ``tfemb.data.Schema`` with the user and item id features.
        embeddings: scheme spec (see ``RecModel``): None, a factory or a dict per feature.
        embedding_dim: dimension of every embedding. Default 16.
        user_feature: name of the user id feature. Default ``"user_id"``.
        item_feature: name of the item id feature. Default ``"item_id"``.
        hidden_units: widths of the hidden layers. Default ``(512,)`` (authors' code).
        activation: activation of the hidden layers. Default ``"tanh"`` (authors' code).
        batch_norm: batch normalisation before each hidden activation. Default True (authors' code).
        input_batch_norm: batch normalisation of the concatenated embeddings. Default True (authors' code).
        dropout: dropout rate after each hidden layer. Default 0.
        l2: L2 strength of the hidden and output kernels. Default 0.
        side_features: also use the schema's other features (see above). Default False.
        **kwargs: ``RecModel`` arguments (``embedding_optimizer``, ``num_classes``, ``name``...).

    References:
        - Zhao et al., "AutoEmb: Automated Embedding Dimensionality Search in Streaming Recommendations",
          arXiv 2002.11252.
        - Liu et al., "Automated Embedding Size Search in Deep Recommender Systems", SIGIR 2020.
    """

    def __init__(self, schema, embeddings=None, embedding_dim=16, user_feature="user_id", item_feature="item_id",
                 hidden_units=(512,), activation="tanh", batch_norm=True, input_batch_norm=True, dropout=0.0,
                 l2=0.0, side_features=False, **kwargs):
        # Read by _input_features(), which the base constructor calls before it builds the schemes.
        self.user_feature = str(user_feature)
        self.item_feature = str(item_feature)
        self.side_features = bool(side_features)
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        self.hidden_units = blocks.check_units("hidden_units", hidden_units)
        self.activation = activation
        self.batch_norm = bool(batch_norm)
        self.input_batch_norm = bool(input_batch_norm)
        self.dropout = blocks.check_rate("dropout", dropout)
        self.l2 = blocks.check_l2("l2", l2)
        self.input_norm = keras.layers.BatchNormalization(name="input_batch_norm") if self.input_batch_norm else None
        self.mlp = blocks.MLP(self.hidden_units, activation=activation, dropout=self.dropout, l2=self.l2,
                              batch_norm=self.batch_norm, name="mlp")
        self.output_layer = keras.layers.Dense(
            self.output_units, kernel_regularizer=keras.regularizers.L2(self.l2) if self.l2 else None, name="output",
        )

    def _input_features(self):
        return blocks.cf_input_features(self.schema, self.user_feature, self.item_feature, self.side_features)

    def interact(self, embedded, dense, training=None):
        x = blocks.concat_inputs([embedded[n] for n in self.field_names], dense)  # [batch, 2 * dim (+ side)]
        if self.input_norm is not None:
            x = self.input_norm(x, training=training)
        x = self.mlp(x, training=training)  # [batch, hidden_units[-1]]
        return self.output_layer(x)  # [batch, output_units]

    def get_config(self):
        config = super().get_config()
        config.update({
            "user_feature": self.user_feature,
            "item_feature": self.item_feature,
            "hidden_units": list(self.hidden_units),
            "activation": self.activation,
            "batch_norm": self.batch_norm,
            "input_batch_norm": self.input_batch_norm,
            "dropout": self.dropout,
            "l2": self.l2,
            "side_features": self.side_features,
        })
        return config


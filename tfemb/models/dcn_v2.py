"""DCNv2: the improved Deep & Cross Network (Wang et al. 2021)."""

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel

STRUCTURES = ("stacked", "parallel")


@register
class DCNv2(RecModel):
    """DCN-v2: cross layers ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` and a DNN over
    ``x_0 = concat(v_1..v_F, dense)``.

    ``structure="stacked"`` (default): ``Dense(out)(DNN(Cross(x_0)))``; ``"parallel"``:
    ``Dense(out)(concat(Cross(x_0), DNN(x_0)))``. ``W_l`` is full rank by default, or low rank ``U_l V_l`` with
    ``low_rank=r`` (``blocks.CrossNetwork``). As in the paper, there is no separate linear (wide) part.

    Defaults: structure and full-rank cross layers from the paper; ``cross_layers=2``, ``l2_cross=1e-5``,
    ``dnn_units=(256, 128, 64)`` and ``l2_embedding=1e-5`` (on the looked-up vectors) from DeepCTR's ``DCN`` /
    ``DCNMix`` (deepctr/models/dcn.py, dcnmix.py), whose low-rank default is 32.

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: scheme spec (see ``RecModel``).
        embedding_dim: the embedding dimension. Default 16.
        cross_layers: number of cross layers. Default 2.
        low_rank: None (full-rank cross kernels) or their rank. Default None.
        structure: ``"stacked"`` or ``"parallel"``. Default ``"stacked"``.
        dnn_units: widths of the DNN layers (``()``: cross network only). Default ``(256, 128, 64)``.
        dnn_activation: DNN activation. Default ``"relu"``.
        dnn_dropout: DNN dropout rate. Default 0.
        dnn_batch_norm: batch normalisation in the DNN. Default False.
        l2_dnn: L2 strength of the DNN kernels. Default 0.
        l2_cross: L2 strength of the cross kernels. Default 1e-5.
        l2_embedding: L2 strength on the looked-up embeddings. Default 1e-5.
        **kwargs: ``RecModel`` arguments.

    References:
        - Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to
          Rank Systems", WWW 2021 (arXiv 2008.13535).
    """

    def __init__(self, schema, embeddings=None, embedding_dim=16, cross_layers=2, low_rank=None, structure="stacked",
                 dnn_units=(256, 128, 64), dnn_activation="relu", dnn_dropout=0.0, dnn_batch_norm=False, l2_dnn=0.0,
                 l2_cross=1e-5, l2_embedding=1e-5, **kwargs):
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}. Received: structure={structure!r}")
        self.structure = structure
        self.l2_cross = blocks.check_l2("l2_cross", l2_cross)
        self.cross = blocks.CrossNetwork(cross_layers, low_rank=low_rank, l2=self.l2_cross, name="cross")
        self.cross_layers, self.low_rank = self.cross.num_layers, self.cross.low_rank
        self.dnn = blocks.add_dnn(self, dnn_units, dnn_activation, dnn_dropout, dnn_batch_norm, l2_dnn)
        self.l2_embedding = blocks.check_l2("l2_embedding", l2_embedding)
        self.output_layer = keras.layers.Dense(self.output_units, name="output")

    def interact(self, embedded, dense, training=None):
        blocks.add_embedding_l2(self, embedded, self.l2_embedding, training)
        x0 = blocks.concat_inputs([embedded[n] for n in self.field_names], dense)  # [batch, d]
        crossed = self.cross(x0)  # [batch, d]
        if self.structure == "stacked":
            x = self.dnn(crossed, training=training)  # [batch, dnn_units[-1]] (or [batch, d])
        else:
            x = tf.concat([crossed, self.dnn(x0, training=training)], axis=-1) if self.dnn_units else crossed
        return self.output_layer(x)  # [batch, output_units]

    def get_config(self):
        config = super().get_config()
        config.update(blocks.dnn_config(self))
        config.update({
            "cross_layers": self.cross_layers,
            "low_rank": self.low_rank,
            "structure": self.structure,
            "l2_cross": self.l2_cross,
            "l2_embedding": self.l2_embedding,
        })
        return config

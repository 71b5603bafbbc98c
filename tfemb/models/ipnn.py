"""IPNN: the inner-product-based neural network (Qu et al. 2016)."""

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class IPNN(RecModel):
    """Inner-product PNN: ``logits = Dense(out)(DNN(concat(v_1..v_F, p, dense)))``, ``p = [<v_i, v_j>]_{i<j}``.

    The product layer's linear signal (the embeddings) and quadratic signal (the inner products of all pairs of
    field embeddings, ``blocks.pairwise_inner_products``) are concatenated and read by the first DNN layer, whose
    weights play the role of the paper's product-layer weights (exact form, without the paper's low-rank
    factorisation of the quadratic weights). Dense features join the DNN input, as in DeepCTR.

    Defaults are DeepCTR's ``PNN`` with ``use_inner=True`` (deepctr/models/pnn.py, v0.9):
    ``dnn_hidden_units=(256, 128, 64)``, ReLU, no dropout, ``l2_reg_embedding=1e-5`` (here on the looked-up
    vectors), ``l2_reg_dnn=0``.

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: scheme spec (see ``RecModel``).
        embedding_dim: the embedding dimension. Default 16.
        dnn_units: widths of the DNN layers. Default ``(256, 128, 64)``.
        dnn_activation: DNN activation. Default ``"relu"``.
        dnn_dropout: DNN dropout rate. Default 0.
        dnn_batch_norm: batch normalisation in the DNN. Default False.
        l2_dnn: L2 strength of the DNN kernels. Default 0.
        l2_embedding: L2 strength on the looked-up embeddings. Default 1e-5.
        **kwargs: ``RecModel`` arguments.

    References:
        - Qu et al., "Product-based Neural Networks for User Response Prediction", ICDM 2016 (arXiv 1611.00144).
    """

    def __init__(self, schema, embeddings=None, embedding_dim=16, dnn_units=(256, 128, 64), dnn_activation="relu",
                 dnn_dropout=0.0, dnn_batch_norm=False, l2_dnn=0.0, l2_embedding=1e-5, **kwargs):
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        self.dnn = blocks.add_dnn(self, dnn_units, dnn_activation, dnn_dropout, dnn_batch_norm, l2_dnn,
                                  allow_empty=False)
        self.l2_embedding = blocks.check_l2("l2_embedding", l2_embedding)
        self.output_layer = keras.layers.Dense(self.output_units, name="output")

    def interact(self, embedded, dense, training=None):
        blocks.add_embedding_l2(self, embedded, self.l2_embedding, training)
        vectors = [embedded[n] for n in self.field_names]  # F x [batch, dim]
        if len(vectors) > 1:
            stacked = blocks.stack_fields(embedded, self.field_names)  # [batch, F, dim]
            vectors = vectors + [blocks.pairwise_inner_products(stacked)]  # + [batch, F(F-1)/2]
        x = blocks.concat_inputs(vectors, dense)  # [batch, F*dim + pairs + n_dense]
        return self.output_layer(self.dnn(x, training=training))  # [batch, output_units]

    def get_config(self):
        config = super().get_config()
        config.update(blocks.dnn_config(self))
        config.update({
            "l2_embedding": self.l2_embedding,
        })
        return config

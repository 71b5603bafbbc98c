"""DeepFM: factorization machine and a DNN over shared embeddings (Guo et al. 2017)."""

import tensorflow as tf

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class DeepFM(RecModel):
    """DeepFM: ``logit = linear + FM(v) + Dense(out)(DNN(concat(v_1..v_F, dense)))``.

    The linear part (``blocks.LinearTerms``: first-order tables ``f"{feature}_linear"``, dense weights, bias),
    the FM pairwise term over the sparse embeddings, and a DNN over the concatenated embeddings and dense features
    share the embeddings of the schemes under study. Numeric features embedded by ``numeric_embeddings`` (e.g.
    ``"autodis"``, the setting of the AutoDis paper) are fields of the FM and DNN parts instead of raw DNN inputs. With a multiclass head the linear and DNN parts have one
    output per class and the (scalar) FM term is added to every class, where the softmax cancels it.

    Defaults are DeepCTR's ``DeepFM`` (deepctr/models/deepfm.py, v0.9): ``dnn_hidden_units=(256, 128, 64)``,
    ReLU, no dropout, no batch norm, ``l2_reg_linear=1e-5``, ``l2_reg_embedding=1e-5``, ``l2_reg_dnn=0``. One
    difference: DeepCTR's embedding L2 penalises the whole table every step; here it penalises the vectors a
    batch looked up (``blocks.l2_penalty``), which keeps gradients row-sparse and works with any scheme.

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: scheme spec (see ``RecModel``).
        embedding_dim: the embedding (factor) dimension. Default 16.
        dnn_units: widths of the DNN layers. Default ``(256, 128, 64)``; ``()`` leaves linear + FM.
        dnn_activation: DNN activation. Default ``"relu"``.
        dnn_dropout: DNN dropout rate. Default 0.
        dnn_batch_norm: batch normalisation in the DNN. Default False.
        l2_dnn: L2 strength of the DNN kernels. Default 0.
        l2_linear: L2 strength of the first-order weights. Default 1e-5.
        l2_embedding: L2 strength on the looked-up embeddings. Default 1e-5.
        use_fm: include the FM pairwise term. Default True.
        **kwargs: ``RecModel`` arguments.

    References:
        - Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction", IJCAI 2017.
    """

    linear_terms_attribute = "linear"

    def __init__(self, schema, embeddings=None, embedding_dim=16, dnn_units=(256, 128, 64), dnn_activation="relu",
                 dnn_dropout=0.0, dnn_batch_norm=False, l2_dnn=0.0, l2_linear=1e-5, l2_embedding=1e-5, use_fm=True,
                 **kwargs):
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        dnn = blocks.add_dnn(self, dnn_units, dnn_activation, dnn_dropout, dnn_batch_norm, l2_dnn)
        self.l2_linear = blocks.check_l2("l2_linear", l2_linear)
        self.l2_embedding = blocks.check_l2("l2_embedding", l2_embedding)
        self.use_fm = bool(use_fm)
        self.linear = blocks.make_linear_terms(self, l2=self.l2_linear)
        self.dnn = None
        if self.dnn_units:
            self.dnn = dnn
            self.dnn_output = keras.layers.Dense(self.output_units, use_bias=False, name="dnn_output")

    def interact(self, embedded, dense, training=None):
        blocks.add_embedding_l2(self, embedded, self.l2_embedding, training)
        logits = []
        if self.use_fm and self.field_names:
            stacked = blocks.stack_fields(embedded, self.field_names)  # [batch, fields, dim]
            fm = blocks.fm_second_order(stacked)  # [batch, 1]
            logits.append(tf.broadcast_to(fm, (tf.shape(fm)[0], self.output_units)))
        if self.dnn is not None:
            x = blocks.concat_inputs([embedded[n] for n in self.field_names], dense)  # [batch, F*dim + n_dense]
            logits.append(self.dnn_output(self.dnn(x, training=training)))  # [batch, output_units]
        return tf.add_n(logits) if logits else None

    def get_config(self):
        config = super().get_config()
        config.update(blocks.dnn_config(self))
        config.update({
            "l2_linear": self.l2_linear,
            "l2_embedding": self.l2_embedding,
            "use_fm": self.use_fm,
        })
        return config

"""WideAndDeep: a linear (wide) model and a DNN (deep) trained jointly (Cheng et al. 2016)."""

from tfemb._keras import keras, register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class WideAndDeep(RecModel):
    """Wide & Deep: ``logit = wide + Dense(out)(DNN(concat(v_1..v_F, dense)))``.

    The wide part is first-order: one weight per id of every sparse feature (tables ``f"{feature}_linear"``),
    one per dense feature, and a bias (``blocks.LinearTerms``). The paper's wide part also holds hand-made
    cross-product features; tfemb does not generate crosses: add a crossed column to the schema (a categorical
    feature of concatenated values) to give the wide part one. The deep part is a DNN over the embeddings of the
    schemes under study and the dense features.

    Defaults are DeepCTR's ``WDL`` (deepctr/models/wdl.py, v0.9): ``dnn_hidden_units=(256, 128, 64)``, ReLU,
    no dropout, ``l2_reg_linear=1e-5``, ``l2_reg_embedding=1e-5`` (here on the looked-up vectors,
    ``blocks.l2_penalty``), ``l2_reg_dnn=0``.

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: scheme spec (see ``RecModel``).
        embedding_dim: the embedding dimension. Default 16.
        dnn_units: widths of the DNN layers. Default ``(256, 128, 64)``.
        dnn_activation: DNN activation. Default ``"relu"``.
        dnn_dropout: DNN dropout rate. Default 0.
        dnn_batch_norm: batch normalisation in the DNN. Default False.
        l2_dnn: L2 strength of the DNN kernels. Default 0.
        l2_linear: L2 strength of the wide weights. Default 1e-5.
        l2_embedding: L2 strength on the looked-up embeddings. Default 1e-5.
        **kwargs: ``RecModel`` arguments.

    References:
        - Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016 (arXiv 1606.07792).
    """

    linear_terms_attribute = "wide"

    def __init__(self, schema, embeddings=None, embedding_dim=16, dnn_units=(256, 128, 64), dnn_activation="relu",
                 dnn_dropout=0.0, dnn_batch_norm=False, l2_dnn=0.0, l2_linear=1e-5, l2_embedding=1e-5, **kwargs):
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        self.dnn = blocks.add_dnn(self, dnn_units, dnn_activation, dnn_dropout, dnn_batch_norm, l2_dnn,
                                  allow_empty=False)
        self.l2_linear = blocks.check_l2("l2_linear", l2_linear)
        self.l2_embedding = blocks.check_l2("l2_embedding", l2_embedding)
        self.wide = blocks.make_linear_terms(self, l2=self.l2_linear, name="wide")
        self.dnn_output = keras.layers.Dense(self.output_units, use_bias=False, name="dnn_output")

    def interact(self, embedded, dense, training=None):
        blocks.add_embedding_l2(self, embedded, self.l2_embedding, training)
        x = blocks.concat_inputs([embedded[n] for n in self.field_names], dense)  # [batch, F*dim + n_dense]
        return self.dnn_output(self.dnn(x, training=training))  # [batch, output_units]

    def get_config(self):
        config = super().get_config()
        config.update(blocks.dnn_config(self))
        config.update({
            "l2_linear": self.l2_linear,
            "l2_embedding": self.l2_embedding,
        })
        return config

"""LogisticRegression: first-order weights of every feature (the LR baseline of CTR prediction)."""

from tfemb._keras import register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class LogisticRegression(RecModel):
    """Logistic regression on one-hot ids and dense values: ``logit = b + sum_f w_f[id_f] + dense @ w``.

    Each sparse feature has a first-order table ``FixedEmbedding(vocabulary_size, 1)`` named
    ``f"{feature}_linear"`` (zeros at start; a multi-hot feature pools its weights with its combiner) and the
    dense features have one weight each (``blocks.LinearTerms``). LR uses no embedding scheme: no scheme is built
    (``uses_embeddings = False``), so ``embeddings`` is accepted for a uniform model interface and ignored, and
    ``embedding_report()`` is empty. The linear tables are in ``sparse_variables()``, so a row-sparse
    ``embedding_optimizer`` updates them lazily. A multiclass head gets one weight per class (multinomial LR).

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: ignored (LR has no embedding scheme).
        embedding_dim: kept for the common model interface; unused. Default 16.
        l2_linear: L2 strength on the looked-up first-order weights and the dense weights. Default 1e-5
            (DeepCTR's ``l2_reg_linear``).
        **kwargs: ``RecModel`` arguments.
    """

    uses_embeddings = False
    linear_terms_attribute = "linear"

    def __init__(self, schema, embeddings=None, embedding_dim=16, l2_linear=1e-5, **kwargs):
        super().__init__(schema, embeddings=None, embedding_dim=embedding_dim, **kwargs)
        self.l2_linear = blocks.check_l2("l2_linear", l2_linear)
        self.linear = blocks.make_linear_terms(self, l2=self.l2_linear)

    def interact(self, embedded, dense, training=None):
        return None  # LR has only first-order terms (linear_logits)

    def get_config(self):
        config = super().get_config()
        config.update({"l2_linear": self.l2_linear})
        return config

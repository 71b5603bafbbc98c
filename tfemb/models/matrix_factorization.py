"""MatrixFactorization: dot product of user and item embeddings plus biases."""

import tensorflow as tf

from tfemb._keras import register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class MatrixFactorization(RecModel):
    """Biased matrix factorisation: ``score = <e_user, e_item> + b_user + b_item + b``.

    The user and item embeddings come from the embedding schemes under study; the biases are separate
    ``FixedEmbedding(vocabulary_size, 1)`` tables named ``f"{feature}_bias"`` (zeros at start). They are not part
    of the scheme (``embedding_report`` does not count them) but are listed by ``bias_layers()`` and their tables
    are in ``sparse_variables()``, so a row-sparse ``embedding_optimizer`` updates them lazily too. Side features
    of the schema are ignored (no table is built for them).

    The score is a logit for a binary task (sigmoid head) or the predicted rating for a regression task;
    a multiclass schema is rejected (one score per example).

    Args:
        schema: a fitted ``tfemb.data.Schema`` with the user and item id features.
        embeddings: scheme spec (see ``RecModel``): None, a factory or a dict per feature.
        embedding_dim: the latent dimension. Default 16.
        user_feature: name of the user id feature. Default ``"user_id"``.
        item_feature: name of the item id feature. Default ``"item_id"``.
        l2: L2 strength on the looked-up user/item vectors and biases (``blocks.l2_penalty``: per example, so
            frequent ids are regularised more, as in SGD-trained MF). Default 0.
        use_bias: add the user, item and global biases. Default True.
        **kwargs: ``RecModel`` arguments.

    References:
        - Koren, Bell & Volinsky, "Matrix Factorization Techniques for Recommender Systems", IEEE Computer 2009.
    """

    def __init__(self, schema, embeddings=None, embedding_dim=16, user_feature="user_id", item_feature="item_id",
                 l2=0.0, use_bias=True, **kwargs):
        self.user_feature = str(user_feature)
        self.item_feature = str(item_feature)
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        blocks.require_single_score(self)
        self.l2 = blocks.check_l2("l2", l2)
        self.use_bias = bool(use_bias)
        self.biases = None
        if self.use_bias:
            self.biases = blocks.make_linear_terms(self, l2=self.l2, suffix="bias", with_dense=False, name="biases")

    def _input_features(self):
        return blocks.cf_input_features(self.schema, self.user_feature, self.item_feature)

    def bias_layers(self):
        """The per-id bias tables (``FixedEmbedding(vocabulary_size, 1)``): user first, then item."""
        return [] if self.biases is None else list(self.biases.tables)

    def _embedding_like_layers(self):
        return super()._embedding_like_layers() + self.bias_layers()

    def interact(self, embedded, dense, training=None):
        user, item = embedded[self.user_feature], embedded[self.item_feature]  # [batch, dim] each
        blocks.add_embedding_l2(self, [user, item], self.l2, training)
        return tf.reduce_sum(user * item, axis=-1, keepdims=True)  # [batch, 1]

    def linear_logits(self, inputs, dense, training=None):
        return None if self.biases is None else self.biases(inputs, training=training)  # [batch, 1]

    def get_config(self):
        config = super().get_config()
        config.update({
            "user_feature": self.user_feature,
            "item_feature": self.item_feature,
            "l2": self.l2,
            "use_bias": self.use_bias,
        })
        return config

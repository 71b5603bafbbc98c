"""FactorizationMachine: Rendle's second-order factorization machine."""

from tfemb._keras import register
from tfemb.models import blocks
from tfemb.models.rec_model import RecModel


@register
class FactorizationMachine(RecModel):
    """Factorization machine: ``logit = b + sum_f w_f[id_f] + dense @ w + sum_{i<j} <v_i, v_j>``.

    The pairwise term runs over the embeddings of all sparse features (the schemes under study), computed as
    ``0.5 * sum_d ((sum_i v_id)^2 - sum_i v_id^2)`` (``blocks.fm_second_order``). Dense features enter the
    linear part, and, embedded by ``numeric_embeddings`` (e.g. ``"autodis"``), the pairwise term as fields too. The first-order tables are ``FixedEmbedding(vocabulary_size, 1)`` named
    ``f"{feature}_linear"`` (``blocks.LinearTerms``), listed by ``linear_tables()`` and in
    ``sparse_variables()``. One score per example: binary or regression tasks only.

    Args:
        schema: a fitted ``tfemb.data.Schema``.
        embeddings: scheme spec (see ``RecModel``).
        embedding_dim: the factor dimension. Default 16.
        l2_linear: L2 strength on the looked-up first-order weights and the dense weights. Default 1e-5.
        l2_embedding: L2 strength on the looked-up embeddings (``blocks.l2_penalty``). Default 1e-5.
        **kwargs: ``RecModel`` arguments.

    References:
        - Rendle, "Factorization Machines", ICDM 2010.
    """

    linear_terms_attribute = "linear"

    def __init__(self, schema, embeddings=None, embedding_dim=16, l2_linear=1e-5, l2_embedding=1e-5, **kwargs):
        super().__init__(schema, embeddings=embeddings, embedding_dim=embedding_dim, **kwargs)
        blocks.require_single_score(self)
        self.l2_linear = blocks.check_l2("l2_linear", l2_linear)
        self.l2_embedding = blocks.check_l2("l2_embedding", l2_embedding)
        self.linear = blocks.make_linear_terms(self, l2=self.l2_linear)

    def interact(self, embedded, dense, training=None):
        blocks.add_embedding_l2(self, embedded, self.l2_embedding, training)
        stacked = blocks.stack_fields(embedded, self.field_names)  # [batch, fields, dim]
        return blocks.fm_second_order(stacked)  # [batch, 1]

    def get_config(self):
        config = super().get_config()
        config.update({"l2_linear": self.l2_linear, "l2_embedding": self.l2_embedding})
        return config

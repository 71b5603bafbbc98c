"""Embedding schemes: every method is a Keras layer following the EmbeddingScheme contract; numeric features'
embeddings (AutoDis, the field embedding) follow the NumericEmbedding contract."""

from tfemb.layers.autodis_embedding import AGGREGATIONS as AUTODIS_AGGREGATIONS
from tfemb.layers.autodis_embedding import AutoDisEmbedding
from tfemb.layers.autoemb_controller import AutoEmbController, popularity_buckets
from tfemb.layers.autoemb_embedding import AutoEmbEmbedding
from tfemb.layers.deep_hash_embedding import DeepHashEmbedding, dhe_parameter_count, dhe_width_for_budget
from tfemb.layers.double_hashing_embedding import DoubleHashingEmbedding, IndexedRowsEmbedding
from tfemb.layers.embedding_scheme import COMBINERS, PADDING_ID, EmbeddingScheme
from tfemb.layers.esapn_embedding import ESAPNCompactEmbedding, ESAPNEmbedding
from tfemb.layers.factory import NUMERIC_SCHEMES, SCHEMES, get_scheme_class, numeric_factory, scheme_factory
from tfemb.layers.field_embedding import FieldEmbedding
from tfemb.layers.fixed_embedding import FixedEmbedding
from tfemb.layers.hashing import universal_hash_np, universal_hash_params, universal_hash_tf
from tfemb.layers.hashing_embedding import HashingEmbedding
from tfemb.layers.low_precision_embedding import LowPrecisionEmbedding
from tfemb.layers.md_dims import (
    alpha_power_dims,
    block_probabilities,
    budget_dims,
    cf_blocks,
    dlrm_md_solver,
    md_field_dims,
    pow2_round,
    stacked_md_blocks,
)
from tfemb.layers.mixed_dimension_embedding import HeadTailEmbedding, MixedDimensionEmbedding, md_field_factory
from tfemb.layers.multi_dim_embedding import MultiDimEmbedding
from tfemb.layers.numeric_embedding import NumericEmbedding
from tfemb.layers.packed_embedding import PackedEmbedding
from tfemb.layers.pep_embedding import PEPEmbedding, pep_preset
from tfemb.layers.qr_embedding import QREmbedding

"""Data: schemas with per-id counts, dataset readers, splits, synthetic data and tf.data pipelines."""

from tfemb.data.pipeline import make_dataset
from tfemb.data.readers import (
    AVAZU_COLUMNS,
    CRITEO_CATEGORICAL,
    CRITEO_COLUMNS,
    CRITEO_NUMERIC,
    DATA_DIR_ENV,
    MOVIELENS_COLUMNS,
    MOVIELENS_LATEST_COLUMNS,
    DataFileNotFoundError,
    criteo_schema,
    data_dir,
    movielens_schema,
    read_avazu,
    read_criteo,
    read_criteo_csv,
    read_csv,
    read_movielens_100k,
    read_movielens_1m,
    read_movielens_1m_sample,
    read_movielens_latest,
    require_data,
)
from tfemb.data.schema import (
    DISCRETIZERS,
    LABEL_KINDS,
    MULTI_HOT_COMBINERS,
    NUMERIC_TRANSFORMS,
    PADDING_ID,
    CategoricalFeature,
    Label,
    MultiHotFeature,
    NumericFeature,
    Schema,
    Vocabulary,
    schema_from_dataframe,
)
from tfemb.data.splits import random_split, sort_by_time, stream_batches, temporal_split, user_split
from tfemb.data.synthetic import (
    effective_dims,
    make_synthetic_cf,
    make_synthetic_ctr,
    synthetic_cf_schema,
    synthetic_ctr_schema,
)
from tfemb.errors import DataError

__all__ = [
    "AVAZU_COLUMNS", "CRITEO_CATEGORICAL", "CRITEO_COLUMNS", "CRITEO_NUMERIC", "DATA_DIR_ENV", "DISCRETIZERS",
    "LABEL_KINDS", "MOVIELENS_COLUMNS", "MOVIELENS_LATEST_COLUMNS", "MULTI_HOT_COMBINERS", "NUMERIC_TRANSFORMS",
    "PADDING_ID", "CategoricalFeature", "DataError", "DataFileNotFoundError", "Label", "MultiHotFeature",
    "NumericFeature", "Schema", "Vocabulary", "criteo_schema", "data_dir", "effective_dims", "make_dataset",
    "make_synthetic_cf", "make_synthetic_ctr", "movielens_schema", "random_split", "read_avazu", "read_criteo",
    "read_criteo_csv", "read_csv", "read_movielens_100k", "read_movielens_1m", "read_movielens_1m_sample",
    "read_movielens_latest", "require_data", "schema_from_dataframe", "sort_by_time", "stream_batches",
    "synthetic_cf_schema", "synthetic_ctr_schema", "temporal_split", "user_split",
]

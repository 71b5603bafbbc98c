"""tfemb's recommender networks: CF (CFNetwork, MF, NeuMF) and CTR (LR, FM, DeepFM, Wide&Deep, DCN-v2, DLRM,
IPNN), each a ``RecModel`` built from a fitted Schema and any embedding scheme."""

from tfemb.models.blocks import MLP, CrossNetwork, LinearTerms
from tfemb.models.cf_network import CFNetwork
from tfemb.models.dcn_v2 import DCNv2
from tfemb.models.deepfm import DeepFM
from tfemb.models.dlrm import DLRM
from tfemb.models.fm import FactorizationMachine
from tfemb.models.ipnn import IPNN
from tfemb.models.logistic_regression import LogisticRegression
from tfemb.models.matrix_factorization import MatrixFactorization
from tfemb.models.neumf import NeuMF
from tfemb.models.rec_model import RecModel
from tfemb.models.wide_deep import WideAndDeep

#: Model name (as recipes and the CLI spell it) -> class.
MODELS = {
    "cf": CFNetwork,
    "mf": MatrixFactorization,
    "neumf": NeuMF,
    "lr": LogisticRegression,
    "fm": FactorizationMachine,
    "deepfm": DeepFM,
    "wide_deep": WideAndDeep,
    "dcn_v2": DCNv2,
    "dlrm": DLRM,
    "ipnn": IPNN,
}

#: Models whose schema needs user and item id features.
CF_MODELS = ("cf", "mf", "neumf")


def get_model_class(name):
    """The model class of a name in ``MODELS`` (e.g. ``"deepfm"``)."""
    if isinstance(name, str) and name in MODELS:
        return MODELS[name]
    raise ValueError(f"unknown model name {name!r}; known models: {sorted(MODELS)}")


__all__ = [
    "CF_MODELS", "CFNetwork", "CrossNetwork", "DCNv2", "DLRM", "DeepFM", "FactorizationMachine", "IPNN",
    "LinearTerms", "LogisticRegression", "MLP", "MODELS", "MatrixFactorization", "NeuMF", "RecModel",
    "WideAndDeep", "get_model_class",
]

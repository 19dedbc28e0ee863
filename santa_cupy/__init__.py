"""santa_cupy: stochastic sparse decode attention (SANTA) for CuPy, with a float64 NumPy reference."""
from .decode import EXACT_BELOW_BYTES, bernoulli_scores, decode, decode_exact, sample, ternary_query
from .layout import append_feature_major, from_feature_major, to_feature_major
from .reference import SCHEMES, TILE

__version__ = "0.1.0"
__all__ = ["decode", "decode_exact", "sample", "ternary_query", "bernoulli_scores", "to_feature_major",
           "from_feature_major", "append_feature_major", "EXACT_BELOW_BYTES", "SCHEMES", "TILE"]

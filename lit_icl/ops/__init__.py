"""Pure tensor functions (no nn.Module, no Lightning): attention kernels with state in/out."""
from lit_icl.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
from lit_icl.ops.feature_maps import FEATURE_MAPS, feature_dim, feature_map, positive_random_features, taylor
from lit_icl.ops.gla import gla_chunked, gla_recurrent
from lit_icl.ops.linear_attention import (
    CHUNK_SIZE,
    linear_attention_chunked,
    linear_attention_chunked_autograd,
    linear_attention_quadratic,
    linear_attention_recurrent,
)
from lit_icl.ops.momentum import momentum_chunked, momentum_recurrent
from lit_icl.ops.retention import retention_gamma, retention_recurrent
from lit_icl.ops.rope import rope
from lit_icl.ops.simple_gla import simple_gla_chunked, simple_gla_recurrent
from lit_icl.ops.softmax_attention import (attention_mask, repeat_kv, sliding_window_attention,
                                            sliding_window_reference, softmax_attention)

__all__ = [
    "FEATURE_MAPS", "feature_dim", "feature_map", "positive_random_features", "taylor",
    "linear_attention_chunked", "linear_attention_quadratic", "linear_attention_recurrent",
    "CHUNK_SIZE", "linear_attention_chunked_autograd",
    "momentum_chunked", "momentum_recurrent", "rope", "attention_mask", "repeat_kv", "softmax_attention",
    "sliding_window_attention", "sliding_window_reference",
    "retention_gamma", "retention_recurrent", "simple_gla_chunked", "simple_gla_recurrent",
    "gla_chunked", "gla_recurrent", "delta_rule_chunked", "delta_rule_recurrent",
]

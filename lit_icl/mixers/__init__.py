"""Token mixers: one module per attention kind, each with its typed state, by config name.

    MIXERS["linear"]   LinearAttention   (LinearState: S, z)
    MIXERS["softmax"]  SoftmaxAttention  (KVPrefix: k, v, kv_mask; ICLAA modes: FeatureSums)

`lit_icl.mixers.base` holds what they share and `register`, which adds a kind.
"""
from lit_icl.mixers.base import MIXERS, LayerState, Mixer, MixerOutput, MomentumState, Pass, State, register
from lit_icl.mixers.linear import LinearAttention, LinearState
from lit_icl.mixers.softmax import KVPrefix, SoftmaxAttention
from lit_icl.mixers.approximate import APPROXIMATE_MODES, ApproximateDecoding, FeatureSums  # noqa: E402,I001

__all__ = ["MIXERS", "APPROXIMATE_MODES", "ApproximateDecoding", "FeatureSums", "KVPrefix", "LayerState",
           "LinearAttention", "LinearState", "Mixer", "MixerOutput", "MomentumState", "Pass", "SoftmaxAttention",
           "State", "register"]

"""Token mixers: one module per attention kind, each with its typed state, by config name.

    MIXERS["linear"]   LinearAttention   (LinearState: S, z)
    MIXERS["softmax"]  SoftmaxAttention  (KVPrefix: k, v, kv_mask; ICLAA modes: FeatureSums)
    MIXERS["sliding"]  SlidingWindowAttention  (WindowKV: k, v, kv_mask, kv_pos of the last `window` tokens)
    MIXERS["retention"], ["simple_gla"], ["gla"], ["deltanet"]   (RecurrentState: S)

`lit_icl.mixers.base` holds what they share and `register`, which adds a kind.
"""
from lit_icl.mixers.base import MIXERS, LayerState, Mixer, MixerOutput, MomentumState, Pass, State, register
from lit_icl.mixers.linear import LinearAttention, LinearState
from lit_icl.mixers.kv_prefix import KVPrefix
from lit_icl.mixers.softmax import SoftmaxAttention
from lit_icl.mixers.sliding import SlidingWindowAttention, WindowKV
from lit_icl.mixers.approximate import APPROXIMATE_MODES, ApproximateDecoding, FeatureSums
from lit_icl.mixers.recurrent import GatedMixer, RecurrentMixer, RecurrentState
from lit_icl.mixers.retention import Retention
from lit_icl.mixers.simple_gla import SimpleGLA
from lit_icl.mixers.gla import GatedLinearAttention
from lit_icl.mixers.deltanet import DeltaNet

__all__ = ["MIXERS", "APPROXIMATE_MODES", "ApproximateDecoding", "DeltaNet", "FeatureSums", "GatedLinearAttention",
           "GatedMixer", "KVPrefix", "LayerState", "LinearAttention", "LinearState", "Mixer", "MixerOutput",
           "MomentumState", "Pass", "RecurrentMixer", "RecurrentState", "Retention", "SimpleGLA", "SlidingWindowAttention",
           "SoftmaxAttention", "State", "WindowKV", "register"]

"""lit_icl: train linear/momentum/softmax attention LMs and measure in-context learning by
exact conversion of demonstrations into attention bias terms."""
from lit_icl.context import ContextState, bake, convert
from lit_icl.config import TransformerConfig
from lit_icl.model import TransformerLM

__version__ = "0.1.0"
__all__ = ["TransformerConfig", "TransformerLM", "ContextState", "convert", "bake", "__version__"]

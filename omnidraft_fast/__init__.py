"""omnidraft_fast: speculative decoding for Hugging Face causal LMs, as a drop-in ``generate()``."""

from .api import generate
from .config import AdaptiveConfig, CascadeConfig, DistillConfig, EngineConfig, SamplingParams
from .engine import GenerateOutput, SpeculativeEngine
from .stats import GenerationStats

__all__ = [
    "AdaptiveConfig",
    "CascadeConfig",
    "DistillConfig",
    "EngineConfig",
    "GenerateOutput",
    "GenerationStats",
    "SamplingParams",
    "SpeculativeEngine",
    "generate",
]
__version__ = "0.1.0"

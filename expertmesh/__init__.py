"""expertmesh: serve and fine-tune Mixture-of-Experts LLMs on Ray.

Users import from here: `from expertmesh import LLM, SamplingParams`.
"""

from expertmesh.engine import LLM, CompletionOutput, EngineConfig, LLMEngine, RequestOutput, SamplingParams
from expertmesh.model import ModelConfig, load_model

__version__ = "0.1.0"

__all__ = [
    "LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams",
    "load_model", "__version__",
]

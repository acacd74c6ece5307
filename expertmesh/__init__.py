"""expertmesh: serve and fine-tune Mixture-of-Experts LLMs on Ray.

Users import from here: `from expertmesh import LLM, SamplingParams`, and for the actor graph
`LLM(model, executor=ActorGraph({"expert_shards": 2, "transport": "grpc"}))` (`ActorGraph` loads Ray when
first used, so `import expertmesh` does not).
"""

from expertmesh.engine import (
    LLM,
    CompletionOutput,
    EngineConfig,
    LLMEngine,
    LoRARequest,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)
from expertmesh.graph import DeploymentConfig
from expertmesh.model import ModelConfig, load_model

__version__ = "0.1.0"

__all__ = [
    "LLM", "ActorGraph", "CompletionOutput", "DeploymentConfig", "EngineConfig", "LLMEngine", "LoRARequest",
    "ModelConfig", "RequestOutput", "RequestOutputKind", "SamplingParams", "load_model", "__version__",
]


def __getattr__(name: str):
    if name == "ActorGraph":
        from expertmesh.graph import ActorGraph

        return ActorGraph
    raise AttributeError(f"module 'expertmesh' has no attribute {name!r}")

"""The engine: the executor seam, paged cache, continuous-batching scheduler, sampler, tokenizer, and the
offline LLM API."""

from expertmesh.engine.executor import Executor, ExecutorFactory, ExecutorSpec, ExecutorUnavailable, LocalExecutor
from expertmesh.engine.llm import LLM
from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.engine.lora_request import LoRARequest
from expertmesh.engine.outputs import CompletionOutput, RequestOutput
from expertmesh.engine.sampling_params import RequestOutputKind, SamplingParams
from expertmesh.engine.tokenizer import Tokenizer

__all__ = [
    "LLM", "CompletionOutput", "EngineConfig", "Executor", "ExecutorFactory", "ExecutorSpec", "ExecutorUnavailable",
    "LLMEngine", "LocalExecutor", "LoRARequest", "RequestOutput", "RequestOutputKind", "SamplingParams", "Tokenizer",
]

"""Expert-aware LoRA fine-tuning (issue 14), as `python -m expertmesh.jobs.finetune --config` (`job.py` drives Ray
Train's TorchTrainer, `worker.py` is each worker's loop). The parts: the config (`config.py`), the data
(`data.py`), the loss over a packed batch (`loss.py`, gradients equal to transformers'), LoRA on our model
(`expertmesh.model.lora`, read and written as peft adapters by `expertmesh.model.peft_format`, logits equal to
peft's: serving loads them too, so both live in the model layer), ESFT's expert scores
(`esft.py`), one process's step with the routed load and router checksums (`local_step.py`, `routing.py`) and
the imbalance guard (`guard.py`). Training on the actor graph's shards (`deployment:`) is not there yet."""

from expertmesh.jobs.finetune.config import FinetuneConfig, GuardConfig
from expertmesh.jobs.finetune.data import Example, load_examples
from expertmesh.jobs.finetune.guard import GuardEvent, ImbalanceGuard
from expertmesh.jobs.finetune.local_step import LocalTrainer, StepResult, router_checksums
from expertmesh.model.lora import apply_lora
from expertmesh.jobs.finetune.loss import causal_lm_loss
from expertmesh.model.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "Example", "FinetuneConfig", "GuardConfig", "GuardEvent", "ImbalanceGuard", "LocalTrainer", "StepResult",
    "apply_lora", "causal_lm_loss", "load_examples", "load_peft_adapter", "router_checksums", "save_peft_adapter",
]

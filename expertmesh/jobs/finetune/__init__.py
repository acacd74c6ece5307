"""Expert-aware LoRA fine-tuning on the actor graph (issue 14). Landed so far: the job's config (`config.py`),
its training data (`data.py`), the loss over a packed batch (`loss.py`, gradients equal to transformers'),
expert-aware LoRA on our model (`lora.py`) read and written as peft adapters (`peft_format.py`, logits equal to
peft's), the imbalance guard (`guard.py`) and one process's training step (`local_step.py`: AdamW on the adapters, the
routed load per step, router checksums) and ESFT's expert scores (`esft.py`); the Ray Train job and the entry
point follow."""

from expertmesh.jobs.finetune.config import FinetuneConfig, GuardConfig
from expertmesh.jobs.finetune.data import Example, load_examples
from expertmesh.jobs.finetune.guard import GuardEvent, ImbalanceGuard
from expertmesh.jobs.finetune.local_step import LocalTrainer, StepResult, router_checksums
from expertmesh.jobs.finetune.lora import apply_lora
from expertmesh.jobs.finetune.loss import causal_lm_loss
from expertmesh.jobs.finetune.peft_format import load_peft_adapter, save_peft_adapter

__all__ = [
    "Example", "FinetuneConfig", "GuardConfig", "GuardEvent", "ImbalanceGuard", "LocalTrainer", "StepResult",
    "apply_lora", "causal_lm_loss", "load_examples", "load_peft_adapter", "router_checksums", "save_peft_adapter",
]

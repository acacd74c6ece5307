"""Expert-aware LoRA fine-tuning on the actor graph (issue 14). Landed so far: the job's config (`config.py`),
its training data (`data.py`) and the imbalance guard (`guard.py`); the trainer and the entry point follow."""

from expertmesh.jobs.finetune.config import FinetuneConfig, GuardConfig
from expertmesh.jobs.finetune.data import Example, load_examples
from expertmesh.jobs.finetune.guard import GuardEvent, ImbalanceGuard

__all__ = ["Example", "FinetuneConfig", "GuardConfig", "GuardEvent", "ImbalanceGuard", "load_examples"]

"""Expert-aware LoRA fine-tuning on the actor graph (issue 14). Landed so far: the job's config (`config.py`)
and its training data (`data.py`); the trainer, the guard and the entry point follow."""

from expertmesh.jobs.finetune.config import FinetuneConfig
from expertmesh.jobs.finetune.data import Example, load_examples

__all__ = ["Example", "FinetuneConfig", "load_examples"]

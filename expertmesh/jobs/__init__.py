"""Jobs run on a Ray cluster with `ray job submit`: fine-tuning (`finetune/`, being built: its config and data
so far)."""

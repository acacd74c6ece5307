"""`python -m expertmesh.jobs.finetune --config finetune.yaml`: the job, for `ray job submit` (it joins the
cluster the job runs on) or run directly (it starts a private Ray)."""

from __future__ import annotations

import argparse
import os
import sys

# Every step line is the job's record: Ray's driver folds lines that differ only in their numbers, from
# different processes, into "[repeated Nx across cluster]", which after a worker restart hid most of them.
# Read when ray is imported, so set before any import of it.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.jobs.finetune",
                                     description="Expert-aware LoRA fine-tuning of a MoE checkpoint on Ray Train.")
    parser.add_argument("--config", required=True, help="the job's YAML config")
    args = parser.parse_args(argv)
    from expertmesh.jobs.finetune.config import FinetuneConfig
    from expertmesh.jobs.finetune.job import run

    try:
        config = FinetuneConfig.load(args.config)
        report = run(config)
    except (ValueError, OSError) as e:
        print(f"expertmesh finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"fine-tuning {report['status']}: {report['steps_completed']} steps, adapter in "
          f"{config.output_dir}/adapter, report in {config.output_dir}/report.json", flush=True)
    return 0 if report["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Knowledge distillation with Ray Train: a student (``base_model``, LoRA or full) learns from a
teacher's logits (KL divergence at a temperature) plus the data's cross-entropy:

    RAY_AUTH_MODE=token .venv/bin/ray job submit --working-dir . -- $PWD/.venv/bin/python jobs/distill.py \\
        --config configs/train/distill_tiny.yaml --data-dir $PWD/data

The teacher and the student must share a tokenizer (checked before anything trains).
"""

import sys

from ray_app.training.config import DistillConfig
from ray_app.training.driver import train_main

if __name__ == "__main__":
    sys.exit(train_main(DistillConfig, __doc__))

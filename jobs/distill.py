"""Knowledge distillation with Ray Train: a student (``base_model``, LoRA or full) learns from a
teacher's logits (KL divergence at a temperature) plus the data's cross-entropy:

    ray job submit --working-dir . -- python jobs/distill.py --config configs/train/distill_tiny.yaml

The teacher and the student must share a tokenizer (checked before anything trains).
"""

import sys

from finetune import main

from ray_app.training.config import DistillConfig

if __name__ == "__main__":
    sys.exit(main(DistillConfig, __doc__))

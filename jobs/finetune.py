"""Fine-tune a LoRA / DoRA / QLoRA adapter (or the full model) with Ray Train, track it in MLflow and
register it in the MLflow Model Registry:

    RAY_AUTH_MODE=token .venv/bin/ray job submit --working-dir . -- $PWD/.venv/bin/python jobs/finetune.py \\
        --config configs/train/lora_smollm2.yaml --data-dir $PWD/data
    .venv/bin/python jobs/finetune.py --config configs/train/lora_tiny.yaml --set method=dora --set optim.max_steps=4

Exit status: 0 trained (and registered), 2 the data or config cannot be trained on, 1 training failed.
"""

import sys

from ray_app.training.config import TrainConfig
from ray_app.training.driver import train_main

if __name__ == "__main__":
    sys.exit(train_main(TrainConfig, __doc__))

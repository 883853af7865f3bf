"""Fine-tune a LoRA / DoRA / QLoRA adapter (or the full model) with Ray Train, track it in MLflow and
register it in the MLflow Model Registry:

    ray job submit --working-dir . -- python jobs/finetune.py --config configs/train/lora_smollm2.yaml
    python jobs/finetune.py --config configs/train/lora_tiny.yaml --set method=dora --set optim.max_steps=4

Exit status: 0 trained (and registered), 2 the data or config cannot be trained on, 1 training failed.
"""

import argparse
import json
import sys

from ray_app.schema import ConfigError
from ray_app.training.config import TrainConfig
from ray_app.training.data import DatasetError
from ray_app.training.finetune import run_training


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def main(config_cls=TrainConfig, doc: str = __doc__) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a training YAML under configs/train/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, dotted (e.g. optim.max_steps=4); repeatable")
    parser.add_argument("--no-register", action="store_true", help="train and evaluate, do not register")
    parser.add_argument("--data-dir", help="the data directory with the prepared models (absolute under `ray job "
                                           "submit`, whose working dir is a copy without ./data)")
    args = parser.parse_args()
    overrides = parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir else {})
    try:
        config = config_cls.load(args.config, overrides)
        result = run_training(config, register=False if args.no_register else None)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": result.run_id, "version": result.version, "adapter": str(result.artifact),
                      "metrics": result.metrics, "eval": result.eval, "parity": result.parity}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

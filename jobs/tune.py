"""Search LoRA hyperparameters (learning rate, rank, alpha, dropout) with Ray Tune and ASHA; every
trial is tracked in MLflow and the best one is registered:

    RAY_AUTH_MODE=token .venv/bin/ray job submit --working-dir . -- $PWD/.venv/bin/python jobs/tune.py \
        --config configs/train/tune_tiny.yaml --data-dir $PWD/data
"""

import argparse
import json
import sys

from ray_app.cluster import prepare_driver_env
from ray_app.schema import ConfigError, parse_overrides
from ray_app.training.config import TuneConfig
from ray_app.training.data import DatasetError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--data-dir", help="the data directory with the prepared models (absolute under `ray job submit`)")
    args = parser.parse_args()
    prepare_driver_env()  # before anything imports Ray
    from ray_app.training.search import run_search

    try:
        overrides = parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir else {})
        result = run_search(TuneConfig.load(args.config, overrides))
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"best_params": result.best_params, "best": result.best_metric, "run_id": result.best_run_id,
                      "version": result.version, "trials": result.trials}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

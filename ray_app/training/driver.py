"""The command line of a training job (``jobs/finetune.py``, ``jobs/distill.py``): read the config,
apply ``--set`` overrides, train, print the result as JSON. Exit status: 0 trained (and registered),
2 the data or config cannot be trained on, 1 training failed."""

from __future__ import annotations

import argparse
import json
import sys

from ray_app.cluster import prepare_driver_env


def train_main(config_cls, doc: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a training YAML under configs/train/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, dotted (e.g. optim.max_steps=4); repeatable")
    parser.add_argument("--no-register", action="store_true", help="train and evaluate, do not register")
    parser.add_argument("--data-dir", help="the data directory with the prepared models (absolute under `ray job "
                                           "submit`, whose working dir is a copy without ./data)")
    args = parser.parse_args(argv)
    prepare_driver_env()  # before anything imports Ray

    from ray_app.cluster import in_cluster
    from ray_app.schema import ConfigError, parse_overrides
    from ray_app.training.data import DatasetError
    from ray_app.training.finetune import run_training

    try:
        overrides = parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir else {})
        config = config_cls.load(args.config, overrides)
        result = in_cluster(run_training, config, register=False if args.no_register else None)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_id": result.run_id, "version": result.version, "adapter": str(result.artifact),
                      "metrics": result.metrics, "eval": result.eval, "parity": result.parity}))
    return 0

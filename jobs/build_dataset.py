"""Build a fine-tuning set from a collection (and captured conversations) on a Ray cluster:

    ray job submit --working-dir . -- $PWD/.venv/bin/python jobs/build_dataset.py --collection handbook \\
        --out $PWD/data/datasets/handbook.jsonl --data-dir $PWD/data

Exit status: 0 with at least one record written, 2 when nothing survived the filters, 1 on failure.
"""

import argparse
import json
import sys

from ray_app.cluster import prepare_driver_env

prepare_driver_env()  # a driver joining the server's cluster uses its token; before Ray is imported

from ray_app.datasets.build import build_dataset
from ray_app.datasets.config import DatasetConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", help="the collection to learn from")
    parser.add_argument("--conversations", help="a folder of captured conversations (<data_dir>/captures)")
    parser.add_argument("--out", required=True, help="the JSONL to write (its report goes beside it)")
    parser.add_argument("--config", default="configs/dataset.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, dotted (e.g. teacher.model=auto); repeatable")
    parser.add_argument("--data-dir", help="the data directory (absolute under `ray job submit`)")
    args = parser.parse_args()
    if not args.collection and not args.conversations:
        parser.error("give --collection, --conversations or both")
    from ray_app.schema import parse_overrides

    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    config = DatasetConfig.load(args.config, overrides)
    report = build_dataset(args.collection, config, args.out, conversations=args.conversations, address="auto")
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "examples"}))
    return 0 if report.kept else 2


if __name__ == "__main__":
    sys.exit(main())

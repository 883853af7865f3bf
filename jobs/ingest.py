"""Ingest documents into a collection on a Ray cluster:

    RAY_AUTH_MODE=token .venv/bin/ray job submit --working-dir . -- $PWD/.venv/bin/python jobs/ingest.py \
        --input $PWD/docs --collection handbook --data-dir $PWD/data
"""

import argparse
import json
import sys

from ray_app.cluster import prepare_driver_env

prepare_driver_env()  # a driver joining the server's cluster uses its token; before Ray is imported

from ray_app.documents.config import IngestConfig
from ray_app.documents.pipeline import run_ingest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder, file or s3:// prefix")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--config", default="configs/ingest.yaml")
    parser.add_argument("--sensitivity", choices=["public", "internal", "confidential"])
    parser.add_argument("--report", help="per-file JSONL report (default: under the data dir)")
    parser.add_argument("--data-dir", help="the data directory (absolute under `ray job submit`, whose working dir "
                                           "is a copy without ./data)")
    args = parser.parse_args()

    config = IngestConfig.load(args.config, {"data_dir": args.data_dir} if args.data_dir else None)
    report = run_ingest(args.input, args.collection, config, sensitivity=args.sensitivity, address="auto")
    path = report.write_jsonl(args.report or config.paths.root / "reports" / f"{args.collection}.jsonl")
    for outcome in report.files:
        if outcome.status == "refused":
            print(f"refused {outcome.path}: [{outcome.code}] {outcome.reason}")
    print(json.dumps({**report.summary(), "report": str(path)}))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())

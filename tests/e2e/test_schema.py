"""The live app fuzzed from its own ``/openapi.json`` with schemathesis: a fixed seed, a bounded run.

Every generated request must get an answer that is not a server error, in the content type and the
shape the schema declares. Collections the fuzzer creates are dropped afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_the_live_api_answers_its_own_schema_without_a_server_error(served, tmp_path):
    before = {c["name"] for c in httpx.get(served.v1 + "/collections", timeout=60).json()["data"]}
    cli = Path(sys.executable).parent / "schemathesis"
    try:
        run = subprocess.run(
            [str(cli), "run", served.base_url + "/openapi.json", "--seed", "20261201", "--max-examples", "12",
             "--max-time", "150", "--workers", "1", "--request-timeout", "60", "--no-color",
             # one worker: hypothesis parses lambda sources, and CPython 3.11's parser is not thread-safe
             "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
             "--report", "junit", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=600)
    finally:
        for name in {c["name"] for c in httpx.get(served.v1 + "/collections", timeout=60).json()["data"]} - before:
            httpx.delete(f"{served.v1}/collections/{name}", timeout=60)
    summary = run.stdout[-6000:]
    print(summary)
    assert run.returncode == 0, summary
    assert "generated" in summary and "failure" not in summary.split("Test cases:")[-1]

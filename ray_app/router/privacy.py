"""The privacy rule for data that is not a chat request: a training file bound for a cloud provider's
fine-tuning API leaves the machine under the same rule as a prompt. A record whose provenance says it
came from a confidential chunk, or any PII found in it (the same scanner as requests), keeps the whole
file local."""

from __future__ import annotations

import json

from ray_app.router.pii import request_strings, scan

__all__ = ["training_file_reasons"]


def training_file_reasons(data: bytes) -> list[str]:
    """Why this training file may not leave the machine (empty: it may)."""
    confidential, pii_lines, kinds = [], [], set()
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        provenance = record.get("metadata") or {}
        if isinstance(provenance, dict) and provenance.get("sensitivity") == "confidential":
            confidential.append(number)
        found = scan(request_strings({k: v for k, v in record.items() if k != "metadata"}))
        if found:
            pii_lines.append(number)
            kinds |= found
    reasons = []
    if confidential:
        reasons.append(f"{len(confidential)} record(s) come from confidential chunks (lines "
                       f"{', '.join(map(str, confidential[:10]))})")
    if pii_lines:
        reasons.append(f"PII ({', '.join(sorted(kinds))}) in {len(pii_lines)} record(s) (lines "
                       f"{', '.join(map(str, pii_lines[:10]))})")
    return reasons

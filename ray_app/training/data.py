"""Training data: JSONL in, token rows out.

Two formats, recognised per line: OpenAI's fine-tuning chat format (``{"messages": [...]}``) and
instruction records (``instruction``, optional ``input``, ``output``). Conversations are rendered with
the base model's own chat template; only assistant tokens carry labels (the rest is -100), found by
rendering each prefix of the conversation and mapping character spans to tokens. Bad lines are
collected with their line numbers; a dataset with no usable line fails before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100
ROLES = {"system", "user", "assistant"}


class DatasetError(ValueError):
    """The data cannot be trained on; the message lists what is wrong, by line."""


@dataclass
class LineProblem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Examples:
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    problems: list[LineProblem] = field(default_factory=list)
    sha256: str = ""


def _conversation(record: Any) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("`messages` must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}]: role must be one of {sorted(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: content must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise ValueError("no assistant message to learn from")
        return out
    if "instruction" in record or "output" in record:
        instruction, output = record.get("instruction"), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("`instruction` must be a non-empty string")
        if not isinstance(output, str) or not output.strip():
            raise ValueError("`output` must be a non-empty string")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("`input` must be a string")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError("neither `messages` (chat format) nor `instruction`/`output` (instruction format)")


def read_jsonl(path: str | Path) -> Examples:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    data = path.read_bytes()
    examples = Examples(sha256=hashlib.sha256(data).hexdigest())
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.conversations.append(_conversation(json.loads(line)))
        except json.JSONDecodeError as e:
            examples.problems.append(LineProblem(str(path), number, f"not JSON: {e.msg}"))
        except ValueError as e:
            examples.problems.append(LineProblem(str(path), number, str(e)))
    return examples


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids a model is prompted with for ``messages`` (the generation prompt included): the
    same rendering the training data uses, compared with the serving path by the parity check."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_seq_len: int) -> dict[str, list[int]]:
    """input_ids and labels; labels are the ids of assistant turns' tokens and -100 elsewhere."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if not full.startswith(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)):
            raise DatasetError("the chat template does not render conversations incrementally; "
                               "assistant tokens cannot be located")
        spans.append((start, end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(encoded["offset_mapping"]):
        if any(start <= a < end for start, end in spans) and b > a:
            labels[t] = ids[t]
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}


def pack(rows: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into blocks of exactly ``max_seq_len`` tokens (the tail is kept shorter)."""
    blocks, ids, labels = [], [], []
    for row in rows:
        ids.extend(row["input_ids"])
        labels.extend(row["labels"])
        while len(ids) >= max_seq_len:
            blocks.append({"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]})
            ids, labels = ids[max_seq_len:], labels[max_seq_len:]
    if ids:
        blocks.append({"input_ids": ids, "labels": labels})
    return blocks


@dataclass
class TokenizedData:
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    validation_conversations: list[list[dict[str, str]]]
    problems: list[LineProblem]
    truncated: int
    sha256: str  # of the training file (and the validation file): tags the registered version

    @property
    def train_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.train)


def prepare(tokenizer, train_path: str, validation_path: str | None, validation_fraction: float,
            max_seq_len: int, packing: bool, seed: int) -> TokenizedData:
    """Read, validate, split and tokenize; raises ``DatasetError`` when nothing can be trained on."""
    train = read_jsonl(train_path)
    problems = list(train.problems)
    digest = train.sha256
    if validation_path:
        held = read_jsonl(validation_path)
        problems += held.problems
        digest = hashlib.sha256((train.sha256 + held.sha256).encode()).hexdigest()
        train_conv, val_conv = train.conversations, held.conversations
    else:
        conversations = list(train.conversations)
        random.Random(seed).shuffle(conversations)
        n_val = int(round(len(conversations) * validation_fraction)) if len(conversations) > 1 else 0
        if validation_fraction > 0 and len(conversations) > 1:
            n_val = max(n_val, 1)
        val_conv, train_conv = conversations[:n_val], conversations[n_val:]
    if not train_conv:
        shown = "\n  ".join(str(p) for p in problems[:10])
        raise DatasetError(f"{train_path}: no usable training example"
                           + (f" ({len(problems)} bad lines):\n  {shown}" if problems else " (the file is empty)"))
    truncated = 0

    def tokenize_all(conversations):
        nonlocal truncated
        rows = []
        for conv in conversations:
            row = tokenize_conversation(tokenizer, conv, max_seq_len=1 << 30)
            if len(row["input_ids"]) > max_seq_len:
                truncated += 1
                row = {k: v[:max_seq_len] for k, v in row.items()}
            if any(label != IGNORE for label in row["labels"]):
                rows.append(row)
        return rows

    train_rows, val_rows = tokenize_all(train_conv), tokenize_all(val_conv)
    if not train_rows:
        raise DatasetError(f"{train_path}: every example lost its assistant tokens to max_seq_len={max_seq_len}")
    if packing:
        train_rows = pack(train_rows, max_seq_len)
    return TokenizedData(train_rows, val_rows, val_conv, problems, truncated, digest)


def collate(rows: list[dict[str, list[int]]], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

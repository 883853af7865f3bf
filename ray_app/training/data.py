"""Training data: JSONL in, token rows out.

Two formats, recognised per line: OpenAI's fine-tuning chat format (``{"messages": [...]}``, with
function calling: ``tools`` on the record, assistant ``tool_calls``, ``tool`` messages, ``weight``) and
instruction records (``instruction``, optional ``input``, ``output``). Conversations are rendered with
the base model's chat template (or the one the served model uses for tools, ``data.chat_template``);
only learned assistant tokens, answers and tool calls, carry labels (the rest is -100), found by
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
ROLES = {"system", "developer", "user", "assistant", "tool"}


class DatasetError(ValueError):
    """The data cannot be trained on; the message lists what is wrong, by line."""


@dataclass
class LineProblem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Conversation:
    """One training example: messages as the chat template takes them, the tools offered to the model,
    and which assistant turns are learned from (OpenAI's ``weight``: 0 keeps a turn as context only)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    weights: tuple[int, ...] = ()  # one per message; 1 = learn this assistant turn

    def learned(self, i: int) -> bool:
        return self.messages[i]["role"] == "assistant" and (not self.weights or self.weights[i] == 1)

    @property
    def answer(self) -> str:
        """The last learned assistant turn as text: its content, or its calls as JSON (the task score's reference)."""
        last = self.messages[max(i for i in range(len(self.messages)) if self.learned(i))]
        if last.get("content"):
            return last["content"]
        return "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                         for c in last.get("tool_calls") or [])


@dataclass
class Examples:
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[LineProblem] = field(default_factory=list)
    sha256: str = ""


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: text only (no images in training data)
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"{where}: only text content parts can be trained on")
        return "".join(p["text"] for p in content)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` with each call's ``arguments`` parsed into an object: what chat templates
    take, and what vLLM hands them when it renders a served request (so training and serving agree)."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}.tool_calls must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where}.tool_calls[{j}]: needs function.name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise ValueError(f"{where}.tool_calls[{j}].function.arguments is not JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}.tool_calls[{j}].function.arguments must be a JSON object")
        out.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise ValueError("`tools` must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}")
    return tools or None


def _chat(record: dict[str, Any]) -> Conversation:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    out, weights = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{where}.role must be one of {sorted(ROLES)}")
        role = "system" if m["role"] == "developer" else m["role"]
        weight = m.get("weight", 1)
        if weight not in (0, 1) or (weight == 0 and role != "assistant"):
            raise ValueError(f"{where}.weight must be 0 or 1, and only on assistant messages")
        message: dict[str, Any] = {"role": role}
        if role == "assistant" and m.get("tool_calls") is not None:
            message["content"] = _text(m["content"], where) if m.get("content") is not None else ""
            message["tool_calls"] = _tool_calls(m["tool_calls"], where)
        else:
            message["content"] = _text(m.get("content"), where)
        if role == "tool":
            message["tool_call_id"] = str(m.get("tool_call_id") or "")
        out.append(message)
        weights.append(weight)
    conversation = Conversation(out, _tools(record.get("tools")), tuple(weights))
    if not any(conversation.learned(i) and (m["content"].strip() or m.get("tool_calls")) for i, m in enumerate(out)):
        raise ValueError("no assistant message to learn from")
    return conversation


def parse_record(record: Any) -> Conversation:
    """One line of a training file as a conversation; ``ValueError`` says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    if "messages" in record:
        return _chat(record)
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
        return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": output}])
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
            examples.conversations.append(parse_record(json.loads(line)))
        except json.JSONDecodeError as e:
            examples.problems.append(LineProblem(str(path), number, f"not JSON: {e.msg}"))
        except ValueError as e:
            examples.problems.append(LineProblem(str(path), number, str(e)))
    return examples


def _render(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
    """The token ids a model is prompted with for ``messages`` (the generation prompt included): the
    same rendering the training data uses, compared with the serving path by the parity check."""
    return tokenizer(_render(tokenizer, messages, tools, True), add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, conversation: Conversation, max_seq_len: int) -> dict[str, list[int]]:
    """input_ids and labels; labels are the ids of learned assistant turns' tokens (their text and their
    tool calls) and -100 elsewhere (system, user and tool turns, and the template's own markup)."""
    messages, tools = conversation.messages, conversation.tools
    full = _render(tokenizer, messages, tools)
    spans = []
    for i in range(len(messages)):
        if not conversation.learned(i):
            continue
        start = len(_render(tokenizer, messages[:i], tools, True))
        upto = _render(tokenizer, messages[: i + 1], tools)
        if not full.startswith(upto):
            raise DatasetError("the chat template does not render conversations incrementally; "
                               "assistant tokens cannot be located")
        spans.append((start, len(upto)))
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
    validation_conversations: list[Conversation]
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

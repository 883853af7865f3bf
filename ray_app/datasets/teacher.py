"""The teacher: the model that writes a document's summary and a chunk's question-and-answer pairs,
reached over the server's own OpenAI API (so keys, budgets, the ledger and the privacy rule apply to it
like to any client: a confidential chunk is sent with ``X-Confidential: true`` and never leaves the
machine, whatever the route)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from ray_app.datasets.config import TeacherConfig

__all__ = ["PAIR_SCHEMA", "Teacher"]

PAIR_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["question", "answer"],
               "properties": {"question": {"type": "string", "minLength": 1, "maxLength": 200},
                              "answer": {"type": "string", "minLength": 1, "maxLength": 400}}}
_PAIR_PROMPT = ("Write one question that the passage below answers, and its answer, using only the passage. "
                "Reply in JSON with the keys question and answer.\n\nPassage:\n{text}")
_SUMMARY_PROMPT = "Summarise this document in two or three sentences.\n\nTitle: {title}\n\n{text}"


class Teacher:
    def __init__(self, config: TeacherConfig):
        import openai

        self.config = config
        key = os.environ.get(config.api_key_env or "", "") or "unused"
        self.client = openai.AsyncOpenAI(base_url=config.endpoint, api_key=key, max_retries=2,
                                         timeout=config.timeout_s)
        self._slots = asyncio.Semaphore(config.concurrency)

    def _headers(self, sensitivity: str | None) -> dict[str, str]:
        return {"x-confidential": "true"} if sensitivity == "confidential" else {}

    async def _ask(self, prompt: str, max_tokens: int, sensitivity: str | None, **extra: Any) -> str:
        async with self._slots:
            reply = await self.client.chat.completions.create(
                model=self.config.model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=self.config.temperature, seed=self.config.seed,
                extra_headers=self._headers(sensitivity), **extra)
        return reply.choices[0].message.content or ""

    async def summary(self, title: str, text: str, sensitivity: str | None) -> str:
        prompt = _SUMMARY_PROMPT.format(title=title, text=text[: self.config.summary_source_chars])
        return (await self._ask(prompt, self.config.summary_max_tokens, sensitivity)).strip()

    async def pair(self, text: str, sensitivity: str | None) -> tuple[str, str] | str:
        """(question, answer), or why there is none (the reply did not parse)."""
        reply = await self._ask(_PAIR_PROMPT.format(text=text), self.config.pair_max_tokens, sensitivity,
                                response_format={"type": "json_schema",
                                                 "json_schema": {"name": "pair", "schema": PAIR_SCHEMA}})
        try:
            parsed = json.loads(reply)
            return str(parsed["question"]).strip(), str(parsed["answer"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            return f"the teacher's reply is not a question-and-answer object: {reply[:120]!r}"

"""The benchmarks' load generator against a loopback server that streams at a pace set per model."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from benchmarks.load import output_length, run_interleaved, run_level
from tests.router_servers import LoopbackServer


class PacedServer(LoopbackServer):
    """Chat completions that stream ``max_tokens`` one-word tokens, ``pace[model]`` seconds apart."""

    def __init__(self, pace: dict[str, float]):
        super().__init__()
        self.pace = pace
        self.app.post("/v1/chat/completions")(self._chat)

    async def _chat(self, request: Request) -> StreamingResponse:
        body, _ = await self._record(request)
        n, pace = body["max_tokens"], self.pace[body["model"]]

        async def events():
            for _ in range(n):
                await asyncio.sleep(pace)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': 'w'}}]})}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


async def test_interleaved_clients_take_the_models_in_turn_and_each_model_gets_its_own_rate():
    server = PacedServer({"fast": 0.0, "slow": 0.02}).start()
    try:
        levels = await run_interleaved(server.url, ["fast", "slow"], "hi", 4, 4, 5)
        shared = await run_level(server.url, ["fast", "slow"], "hi", 4, 2, 5)
    finally:
        server.stop()
    asked = [r.body["model"] for r in server.requests]
    assert asked[:16].count("fast") == asked[:16].count("slow") == 8
    for level in levels.values():
        assert (level.requests, level.output_tokens, level.errors) == (8, 40, 0)
    # both kinds ran in the same seconds: a shared tokens / wall would make their figures equal
    assert levels["slow"].tokens_per_s < levels["fast"].tokens_per_s
    assert levels["fast"].wall_s == levels["slow"].wall_s
    # a plain level keeps each client on its model and counts every token over its wall time
    assert asked[16:].count("fast") == asked[16:].count("slow") == 4
    assert (shared.requests, shared.output_tokens) == (8, 40) and shared.tokens_per_s > 0


def test_output_lengths_spread_around_the_mean_and_repeat_for_the_same_seed():
    assert {output_length(64, 0.0, seed, i, j) for seed in range(3) for i in range(8) for j in range(4)} == {64}
    drawn = [output_length(64, 0.5, 7, i, j) for i in range(32) for j in range(12)]
    assert min(drawn) >= 32 and max(drawn) <= 96 and len(set(drawn)) > 30
    assert abs(sum(drawn) / len(drawn) - 64) < 4  # the same tokens in all, on average, as without a spread
    assert drawn == [output_length(64, 0.5, 7, i, j) for i in range(32) for j in range(12)]
    assert drawn != [output_length(64, 0.5, 8, i, j) for i in range(32) for j in range(12)]
    assert output_length(1, 0.9, 0, 0, 0) >= 1


async def test_a_level_with_a_spread_asks_each_client_for_its_drawn_lengths_and_counts_them():
    server = PacedServer({"m": 0.0}).start()
    try:
        level = await run_level(server.url, "m", "hi", 3, 4, 10, spread=0.5, seed=5)
    finally:
        server.stop()
    expected = [output_length(10, 0.5, 5, i, j) for i in range(3) for j in range(4)]
    assert len(set(expected)) > 1
    assert sorted(r.body["max_tokens"] for r in server.requests) == sorted(expected)
    assert (level.requests, level.output_tokens, level.errors) == (12, sum(expected), 0)

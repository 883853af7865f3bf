"""Tool calling on a running server: how often the calls are valid, and what they cost in latency.

50 prompts, each meant for one of 5 tools (weather, time, currency, document search, reminders), all
5 tools offered on every request. Three ways of asking:

- named: ``tool_choice`` names the meant tool (arguments decoded against its JSON schema);
- required: ``tool_choice: required`` (some tool must be called; the model picks which);
- auto: the model decides, and vLLM's tool-call parser reads any call out of its text.

For each: the share of requests that produced a call, that called the meant tool, and whose
arguments validate against the tool's schema; latency p50/p95. The baseline is the same prompt as a
plain chat without tools, in the same run, alternating: the ratio is what offering the tools costs.

    python benchmarks/tool_bench.py                                   # the README's server on :8000
    python benchmarks/tool_bench.py --smoke --base-url http://127.0.0.1:PORT

Writes ``<out>/tool_bench.json`` and ``tool_bench.png`` (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, percentile, write_results  # noqa: E402


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS = [
    _tool("get_weather", "The current weather in a city.",
          {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city", "unit"]),
    _tool("get_time", "The local time in a city.", {"city": {"type": "string"}}, ["city"]),
    _tool("convert_currency", "Convert an amount of money between currencies.",
          {"amount": {"type": "number"}, "source": {"type": "string", "description": "ISO code, e.g. EUR"},
           "target": {"type": "string", "description": "ISO code, e.g. USD"}}, ["amount", "source", "target"]),
    _tool("search_documents", "Search the company's documents.",
          {"query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "maximum": 20}}, ["query"]),
    _tool("create_reminder", "Remind the user of something later.",
          {"text": {"type": "string"}, "minutes": {"type": "integer", "minimum": 1}}, ["text", "minutes"]),
]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Berlin", "Nairobi"]
PROMPTS = (
    [(f"What's the weather like in {c} right now, in {u}?", "get_weather")
     for c, u in zip(CITIES, ["celsius", "fahrenheit"] * 5)]
    + [(f"What time is it in {c}?", "get_time") for c in CITIES]
    + [(f"Convert {a} {s} to {t}.", "convert_currency")
       for a, s, t in zip([10, 250, 99.5, 1000, 42, 7, 3000, 15, 600, 80],
                          ["EUR", "USD", "GBP", "JPY", "CHF", "EUR", "INR", "CAD", "USD", "AUD"],
                          ["USD", "EUR", "EUR", "USD", "GBP", "JPY", "USD", "EUR", "MXN", "NZD"])]
    + [(f"Find our documents about {q}.", "search_documents")
       for q in ["the travel policy", "parental leave", "the security incident process", "expense limits",
                 "onboarding laptops", "the holiday calendar", "remote work", "the pension plan", "code review rules",
                 "the office in Berlin"]]
    + [(f"Remind me to {t} in {m} minutes.", "create_reminder")
       for t, m in zip(["call Ana", "stretch", "send the report", "water the plants", "book the train",
                        "check the oven", "join the stand-up", "buy milk", "reply to Sam", "back up the laptop"],
                       [5, 30, 15, 60, 10, 20, 2, 45, 25, 90])]
)
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MODES = ("named", "required", "auto")


def ask(client: openai.OpenAI, model: str, prompt: str, meant: str, mode: str | None, max_tokens: int) -> dict:
    kwargs: dict = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0}
    if mode is not None:
        kwargs["tools"] = TOOLS
        kwargs["tool_choice"] = ({"type": "function", "function": {"name": meant}} if mode == "named"
                                 else mode)
    start = time.perf_counter()
    try:
        reply = client.chat.completions.create(**kwargs)
    except openai.APIError as e:
        return {"seconds": time.perf_counter() - start, "error": f"{type(e).__name__}: {e}"[:200]}
    seconds = time.perf_counter() - start
    calls = reply.choices[0].message.tool_calls or []
    result = {"seconds": seconds, "called": bool(calls), "right_tool": bool(calls) and calls[0].function.name == meant,
              "valid": False, "completion_tokens": reply.usage.completion_tokens}
    if calls and calls[0].function.name in SCHEMAS:
        try:
            jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
            result["valid"] = True
        except (ValueError, jsonschema.ValidationError) as e:
            result["invalid_because"] = str(e).splitlines()[0][:160]
    return result


def summary(results: list[dict]) -> dict:
    n = len(results)
    seconds = [r["seconds"] for r in results]
    return {"requests": n, "errors": sum("error" in r for r in results),
            "call_rate": round(sum(r.get("called", False) for r in results) / n, 3),
            "right_tool_rate": round(sum(r.get("right_tool", False) for r in results) / n, 3),
            "valid_rate": round(sum(r.get("valid", False) for r in results) / n, 3),
            "latency_p50_ms": round(statistics.median(seconds) * 1000, 1),
            "latency_p95_ms": round(percentile(seconds, 95) * 1000, 1),
            "invalid_examples": [r["invalid_because"] for r in results if "invalid_because" in r][:3],
            "error_examples": [r["error"] for r in results if "error" in r][:3]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in report["results"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, (key, label) in enumerate([("call_rate", "a call"), ("right_tool_rate", "the meant tool"),
                                      ("valid_rate", "schema-valid arguments")]):
        left.bar([x + (i - 1) * width for x in range(len(modes))], [report["results"][m][key] for m in modes],
                 width, label=label)
    left.set_xticks(range(len(modes)), modes)
    left.set_ylim(0, 1.05)
    left.set_ylabel(f"share of {report['settings']['prompts']} prompts")
    left.legend(fontsize=8)
    left.set_title("Tool calls")
    names = ["plain chat"] + modes
    p50 = [report["baseline"]["latency_p50_ms"]] + [report["results"][m]["latency_p50_ms"] for m in modes]
    right.bar(names, p50, color=["#6b7280"] + ["#2563eb"] * len(modes))
    right.set_ylabel("latency p50 (ms)")
    right.set_title("Latency, same prompts")
    fig.suptitle(f"Tool calling on {report['settings']['model']}, {report['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: the README's)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default all; smoke named required")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--smoke", action="store_true", help="one prompt per tool, for the test suite")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    prompts = PROMPTS[::10] if args.smoke else PROMPTS
    modes = args.modes or (["named", "required"] if args.smoke else list(MODES))
    client = openai.OpenAI(base_url=args.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ask(client, args.model, prompts[0][0], prompts[0][1], None, args.max_tokens)  # warm-up

    raw: dict[str, list[dict]] = {m: [] for m in ["baseline", *modes]}
    for i, (prompt, meant) in enumerate(prompts):  # mode order rotates per prompt, so drift hits all alike
        order = ["baseline", *modes]
        order = order[i % len(order):] + order[:i % len(order)]
        for mode in order:
            raw[mode].append(ask(client, args.model, prompt, meant, None if mode == "baseline" else mode,
                                 args.max_tokens))
        print(f"\r{i + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    report: dict = {"benchmark": "tool_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
                    "settings": {"base_url": args.base_url, "model": args.model, "prompts": len(prompts),
                                 "tools": len(TOOLS), "max_tokens": args.max_tokens, "smoke": args.smoke},
                    "baseline": summary(raw["baseline"]), "results": {m: summary(raw[m]) for m in modes}}
    base = report["baseline"]["latency_p50_ms"]
    for mode in modes:
        r = report["results"][mode]
        r["latency_vs_plain_chat"] = round(r["latency_p50_ms"] / base, 3) if base else None
        print(f"{mode:9s} call {r['call_rate']:.0%}  meant tool {r['right_tool_rate']:.0%}  valid "
              f"{r['valid_rate']:.0%}  p50 {r['latency_p50_ms']:.0f} ms ({r['latency_vs_plain_chat']}x plain chat)")
    write_results("tool_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    return report


if __name__ == "__main__":
    main()

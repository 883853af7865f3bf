"""The web console in a real browser against a running server: how fast it shows, and what it adds.

Debian's Chromium (driven by Playwright) opens ``/ui/`` with an empty cache, ``--reps`` times:
first contentful paint, and the time until the chat page can be used (its model list filled from
``/v1/models``). Then the same chat, alternately from the console and from the ``openai`` client,
``--reps`` times each: time to the first streamed token, so the ratio is what the console's own
path (fetch, stream parsing, rendering) costs over the SDK. Screenshots of every page go to
``<out>/ui/`` for the README.

    python benchmarks/console_bench.py                       # the README's server on :8000
    python benchmarks/console_bench.py --smoke --base-url http://127.0.0.1:PORT --model tiny-llama

Writes ``<out>/console_bench.json`` and ``console_bench.png`` (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402

PAGES = ("chat", "documents", "training", "usage", "system")
PROMPT = "In one sentence: what is a vector database?"


def browser_ttft_ms(page, model: str) -> float:
    page.goto("/ui/#chat")
    page.wait_for_selector("select option", state="attached")
    page.select_option("select >> nth=0", model)
    page.fill("#prompt", PROMPT)
    page.keyboard.press("Enter")
    answer = page.locator("article.message.assistant").last
    answer.locator("p.usage").wait_for(timeout=300_000)
    return float(answer.get_attribute("data-ttft-ms"))


def client_ttft_ms(client: openai.OpenAI, model: str) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=256, stream=True, stream_options={"include_usage": True})
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = (time.perf_counter() - start) * 1000
    return first or float("nan")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    load = report["load"]
    left.bar(["first contentful paint", "chat usable"], [load["fcp_ms_p50"], load["usable_ms_p50"]],
             color=["#2563eb", "#16a34a"])
    left.set_ylabel("ms (median, empty cache)")
    left.set_title("Opening /ui/")
    ttft = report["ttft"]
    right.bar(["openai client", "console"], [ttft["client_ms_p50"], ttft["console_ms_p50"]], color=["#6b7280", "#ea580c"])
    right.set_ylabel("ms to the first token (median)")
    right.set_title(f"Chat with {report['settings']['model']}: {ttft['console_vs_client']}x")
    fig.suptitle(f"Web console, {report['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: the README's)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the model chatted with")
    parser.add_argument("--reps", type=int, default=None, help="page loads and chats of each kind (default 5; smoke 1)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--smoke", action="store_true", help="one of each, for the test suite")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.smoke else 5)
    out = Path(args.out)
    shots = out / ("ui_smoke" if args.smoke else "ui")
    shots.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    report: dict = {"benchmark": "console_bench", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
                    "settings": {"base_url": args.base_url, "model": args.model, "reps": reps, "smoke": args.smoke}}
    client = openai.OpenAI(base_url=args.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        fcp, usable = [], []
        for _ in range(reps):  # a new context each time: nothing cached
            context = browser.new_context(base_url=args.base_url, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            start = time.perf_counter()
            page.goto("/ui/")
            page.wait_for_selector("select option", state="attached")
            usable.append((time.perf_counter() - start) * 1000)
            fcp.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"))
            context.close()
        report["load"] = {"fcp_ms_p50": round(statistics.median(fcp), 1), "usable_ms_p50": round(statistics.median(usable), 1),
                          "fcp_ms": [round(x, 1) for x in fcp], "usable_ms": [round(x, 1) for x in usable]}
        print(f"open /ui/: first contentful paint {report['load']['fcp_ms_p50']} ms, chat usable after "
              f"{report['load']['usable_ms_p50']} ms (medians of {reps})", flush=True)

        context = browser.new_context(base_url=args.base_url, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        client_ttft_ms(client, args.model)  # warm-up: the engine's first request is slow
        console, direct = [], []
        for r in range(reps):  # alternating, so drift in the engine hits both alike
            for kind in (("console", "client") if r % 2 == 0 else ("client", "console")):
                if kind == "console":
                    console.append(browser_ttft_ms(page, args.model))
                else:
                    direct.append(client_ttft_ms(client, args.model))
        c, d = statistics.median(console), statistics.median(direct)
        report["ttft"] = {"console_ms_p50": round(c, 1), "client_ms_p50": round(d, 1),
                          "console_vs_client": round(c / d, 3) if d else None, "console_ms": console,
                          "client_ms": [round(x, 1) for x in direct]}
        print(f"first token: console {c:.0f} ms, openai client {d:.0f} ms ({report['ttft']['console_vs_client']}x)",
              flush=True)

        for name in PAGES:  # chat as the last exchange left it; the others loaded afresh
            if name != "chat":
                page.goto(f"/ui/#{name}")
                page.reload()
            page.wait_for_selector(f"#page-{name} h2")
            page.wait_for_timeout(1500)  # tables and charts filled from the API
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        narrow = browser.new_context(base_url=args.base_url, viewport={"width": 390, "height": 844})
        phone = narrow.new_page()
        phone.goto("/ui/#chat")
        phone.wait_for_selector("select option", state="attached")
        phone.screenshot(path=str(shots / "chat-narrow.png"), full_page=True)
        narrow.close()
        context.close()
        browser.close()
    report["screenshots"] = sorted(str(p.relative_to(out)) for p in shots.glob("*.png"))
    write_results("console_bench" + ("_smoke" if args.smoke else ""), report, out, plot)
    return report


if __name__ == "__main__":
    main()

"""The web console in a real browser (Debian's Chromium driven by Playwright) against the session's
server: every page renders without a console error, chat streams from vLLM, answers from documents
cite them, uploads show their outcome (a broken file its refusal), usage agrees with /v1/usage, a
key without the scope sees the API's 403, the tabs work from the keyboard, and a phone-width window
does not scroll sideways."""

from __future__ import annotations

import re
import shutil
import uuid

import httpx
import pytest

from tests.e2e.conftest import Served

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FACT = "The console test fact: the harbour ferry leaves at 7:45 from pier nine."
PAGES = ("chat", "documents", "training", "usage", "system")
COLLECTION = f"console-{uuid.uuid4().hex[:8]}"  # the session's data dir may outlive one run


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # root in a container: Chromium's sandbox needs user namespaces it may not have
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served: Served):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=served.base_url)
    page = context.new_page()
    page.problems = []  # what a user would see in the devtools console
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    yield page
    context.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name.capitalize()).click()
    page.wait_for_selector(f"#page-{name} h2")


def console_problems(page) -> list[str]:
    # a refused request is the API answering (shown on the page); anything else is a bug
    return [p for p in page.problems if not re.search(r"status of (4\d\d)", p)]


def test_every_page_renders_and_chat_streams_from_the_engine(page, served: Served):
    page.goto("/ui/")
    page.wait_for_selector("text=server ok, auth open")
    for name in PAGES:
        open_tab(page, name)
        assert page.locator("main .error").count() == 0, (name, page.locator("main .error").all_inner_texts())
    open_tab(page, "chat")
    page.select_option("select >> nth=0", "tiny-llama")
    page.fill("#prompt", "Say hello.")
    page.keyboard.press("Enter")
    answer = page.locator("article.message.assistant").last
    answer.locator("p.usage").wait_for(timeout=120_000)
    assert answer.locator(".content").inner_text().strip()
    assert int(answer.get_attribute("data-ttft-ms")) > 0
    assert "completion tokens" in answer.locator("p.usage").inner_text()
    assert console_problems(page) == []


def test_documents_upload_list_retrieve_and_answer_with_citations(page, served: Served, tmp_path):
    good, broken = tmp_path / "ferry.md", tmp_path / "empty.txt"
    good.write_text(f"# Ferry timetable\n\n{FACT}\n")
    broken.write_bytes(b"")
    page.goto("/ui/#documents")
    page.fill("text=New collection >> input", COLLECTION)
    page.get_by_role("button", name="Create").click()
    page.locator("label[for=upload-files]", has_text=COLLECTION).wait_for()  # the new one is open
    page.set_input_files("#upload-files", [str(good), str(broken)])
    uploads = page.locator("ul[aria-label=Uploads] li")
    uploads.nth(1).locator(".outcome").wait_for(timeout=120_000)
    assert re.search(r"indexed, \d+ chunks", uploads.nth(0).inner_text())
    assert "refused (empty)" in uploads.nth(1).inner_text()
    row = page.locator("table.docs tbody tr", has_text="Ferry timetable")
    row.wait_for()
    assert "internal" in row.inner_text()
    page.fill("text=Try a retrieval query >> input", "When does the harbour ferry leave?")
    page.get_by_role("button", name="Search").click()
    assert "pier nine" in page.locator("table.hits tbody tr").first.inner_text(timeout=60_000)

    open_tab(page, "chat")
    page.select_option("select >> nth=0", "tiny-llama")
    page.check("text=Answer from documents >> input")
    page.select_option("select >> nth=1", COLLECTION)
    page.fill("#prompt", "When does the harbour ferry leave?")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("article.message.assistant").last
    answer.locator("p.usage").wait_for(timeout=120_000)
    assert "Ferry timetable" in answer.locator("ol.citations").inner_text()
    assert console_problems(page) == []


def test_usage_agrees_with_the_api_and_a_key_without_the_scope_sees_the_403(page, served: Served):
    from ray_app.accounting.keys import KeyStore, Scopes

    page.goto("/ui/#usage")
    shown = page.locator(".total-cost").inner_text(timeout=30_000)
    total = httpx.get(served.v1 + "/usage", params={"group_by": "key,model,day"}, timeout=30).json()["total"]
    cost = total["cost_usd"]
    assert shown == f"${cost:.{6 if cost < 0.01 else 4}f}"
    assert page.locator("figure.chart canvas").count() >= 1

    viewer = KeyStore(served.args["auth"]["ledger_path"]).create("console-viewer", scopes=Scopes(read=(COLLECTION,)))
    page.fill("#api-key", viewer.secret)
    page.get_by_role("button", name="Use key").click()
    open_tab(page, "documents")
    page.get_by_role("button", name="Open").first.wait_for()
    listed = page.locator("table:has(caption:text('Collections')) tbody tr")
    assert listed.count() == 1 and COLLECTION in listed.first.inner_text()  # only what it may read
    page.locator("table.docs button", has_text="Delete").first.click()
    error = page.locator("main p.error")
    assert "403" in error.inner_text(timeout=30_000) and "permission_denied" in error.inner_text()
    assert page.locator("table.docs tbody tr", has_text="Ferry timetable").count() == 1  # nothing was deleted
    open_tab(page, "system")
    assert "403" in page.locator("main p.error").inner_text(timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('ray_app_key')") == viewer.secret
    assert page.evaluate("localStorage.length") == 0  # the key never outlives the tab


def test_the_tabs_follow_the_keyboard_and_a_narrow_window_does_not_scroll_sideways(browser, served: Served):
    context = browser.new_context(viewport={"width": 375, "height": 800}, base_url=served.base_url)
    page = context.new_page()
    page.goto("/ui/")
    page.get_by_role("tab", name="Chat").focus()
    for expected in ("documents", "training", "usage", "system", "chat"):
        page.keyboard.press("ArrowRight")
        selected = page.locator("[role=tab][aria-selected=true]")
        assert selected.get_attribute("id") == f"tab-{expected}"
        assert page.evaluate("document.activeElement.id") == f"tab-{expected}"
        page.wait_for_selector(f"#page-{expected} h2")
        page.wait_for_timeout(300)  # tables filled from the API
        width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], (expected, width)
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "tab-system"
    context.close()

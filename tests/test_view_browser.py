"""`harness view` in a real headless Chromium (Debian's, /usr/bin/chromium, driven by Playwright's
Python package; no browser is downloaded). One server per module, on a database filled by real
runs (tests/view_server.py): clicks runs -> a run -> an episode, and runs -> compare, and asserts
on the rendered text; the hostile tool result shows as text and runs nothing.

Without Chromium or Playwright the tests skip, unless HARNESS_REQUIRE_BROWSER=1 (scripts/test.sh
sets it), then they fail: CI never passes them silently."""

from __future__ import annotations

import os
import shutil

import pytest
from view_server import HOSTILE, HOSTILE_RUN, ORACLE, ViewServer, db_url, fill

CHROMIUM = os.environ.get("HARNESS_CHROMIUM", "/usr/bin/chromium")
# As the machine notes say: without the background-networking flags Chromium keeps trying to reach
# Google's hosts, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _require_or_skip(message: str) -> None:
    if os.environ.get("HARNESS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (HARNESS_REQUIRE_BROWSER=1)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require_or_skip("playwright missing: pip install -e '.[test]'")
    if not shutil.which(CHROMIUM):
        _require_or_skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium (scripts/setup.sh does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tau_mirror):
    db = db_url(tmp_path_factory.mktemp("view-browser") / "h.db")
    fill(db)
    view = ViewServer(db)
    yield view
    view.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    # Nothing the viewer serves may come from anywhere but the viewer itself.
    elsewhere: list[str] = []
    context.on("request", lambda request: None if request.url.startswith(server.url) else elsewhere.append(request.url))
    page = context.new_page()
    yield page
    context.close()
    assert not elsewhere, f"the page fetched from elsewhere: {elsewhere}"


def test_runs_to_run_to_episode(page, server):
    page.goto(server.url + "/")
    assert page.locator("h1").inner_text() == "Runs"
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 2
    oracle_row = rows.filter(has_text=ORACLE)
    assert "1.000" in oracle_row.inner_text() and "tau-airline" in oracle_row.inner_text()

    page.get_by_role("link", name=HOSTILE_RUN, exact=True).click()
    assert page.locator("h1").inner_text() == f"Run {HOSTILE_RUN}"
    summary = page.locator("#summary").inner_text()
    assert "pass^1\t0.500" in summary and "termination/user_stop\t2" in summary
    assert page.locator("#tasks tbody tr").count() == 2
    page.get_by_role("link", name="all trials failed").click()
    tasks = page.locator("#tasks tbody tr")
    assert tasks.count() == 1 and tasks.first.inner_text().startswith("7")

    tasks.first.locator("a.trial").first.click()
    assert page.locator("h1").inner_text() == "Task 7, trial 0"
    assert page.locator("#outcome").inner_text() == "failure"
    assert page.locator("#termination").inner_text() == "user_stop"
    conversation = page.locator("#conversation")
    assert "get_user_details" in conversation.locator(".tool-call .tool-name").first.inner_text()
    tool_error = conversation.locator(".turn.tool.tool-error")
    assert tool_error.count() == 1 and "not found" in tool_error.inner_text()
    assert "db_match" in page.locator("#breakdown").inner_text()


def test_hostile_content_renders_as_text_and_runs_nothing(page, server):
    page.goto(server.url + "/runs?q=" + HOSTILE_RUN)
    page.get_by_role("link", name=HOSTILE_RUN, exact=True).click()
    page.locator("#tasks a.trial").last.click()
    conversation = page.locator("#conversation")
    tool_result = conversation.locator(".turn.tool .content").inner_text()
    assert HOSTILE in tool_result  # shown, character for character, as text
    assert HOSTILE in conversation.locator(".turn.user .content").first.inner_text()
    assert HOSTILE.replace('"', '\\"') in conversation.locator(".tool-call .arguments").inner_text()
    assert conversation.locator("script").count() == 0 and conversation.locator("img").count() == 0
    page.wait_for_timeout(200)  # an <img src=x> would have failed to load and fired onerror by now
    assert page.evaluate("typeof window.pwned") == "undefined"


def test_pick_two_runs_and_compare(page, server):
    page.goto(server.url + "/runs")
    page.get_by_label(f"compare {ORACLE}").check()
    page.get_by_label(f"compare {HOSTILE_RUN}").check()
    page.locator("#compare").click()
    assert page.locator("h1").inner_text().startswith("Compare ")
    rows = page.locator("#compare-tasks tbody tr")
    assert rows.count() == 2
    assert rows.first.inner_text().startswith("7") and "differs" in (rows.first.get_attribute("class") or "")
    assert "1 of 2 differ" in page.locator("h2", has_text="Per task").inner_text()
    paired = page.locator("#paired").inner_text()
    assert "flipped_down" in paired and "mean_delta" in paired


def test_filter_form_and_pages_of_runs(page, server):
    page.goto(server.url + "/runs")
    page.get_by_label("search").fill("hostil")
    page.locator("#apply-filters").click()
    assert [row.inner_text().split("\t")[1] for row in page.locator("#runs tbody tr").all()] == [HOSTILE_RUN]
    page.goto(server.url + "/runs?sort=name&order=asc&limit=1")
    assert page.locator("#runs tbody tr").inner_text().split("\t")[1] == HOSTILE_RUN
    page.get_by_role("link", name="next").click()
    assert page.locator("#runs tbody tr").inner_text().split("\t")[1] == ORACLE
    assert page.locator(".pager").inner_text().startswith("2–2 of 2")


def test_unknown_episode_page_says_so(page, server):
    response = page.goto(server.url + "/episodes/999999")
    assert response.status == 404
    assert page.locator("#error-message").inner_text() == "no episode with id 999999; open one from its run's task list"

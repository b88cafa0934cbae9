"""`harness view` in a real headless Chromium (Debian's, /usr/bin/chromium, driven by Playwright's
Python package; no browser is downloaded). One server per module, on a database filled by real
runs (tests/view_server.py): clicks runs -> a run -> an episode, runs -> compare, a group run ->
its sibling group, and a train run -> its training curves -> an eval point's run, and -> the credit
heatmap of a step -> its sibling group with the SGCD reference; asserts on the rendered text and
against the stored values; the hostile tool result shows as text and runs nothing, on the episode
and on the sibling-group page.

Without Chromium or Playwright the tests skip, unless HARNESS_REQUIRE_BROWSER=1 (scripts/test.sh
sets it), then they fail: CI never passes them silently."""

from __future__ import annotations

import os
import shutil

import pytest
from view_server import GROUPS, HOSTILE, HOSTILE_RUN, ORACLE, TRAIN, ViewServer, db_url, fill, fill_training

from harness.results.metrics import format_for
from harness.store import Store, get_guidance, put_token_credit, token_credit_rows, train_steps

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
    folder = tmp_path_factory.mktemp("view-browser")
    db = db_url(folder / "h.db")
    fill(db)
    fill_training(db, folder / "train")
    view = ViewServer(db)
    view.db, view.store = db, Store(db, read_only=True)  # the stored values the pages must show
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
    assert rows.count() == 6  # three eval runs, the train run and its two held-out evaluations
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
    page.goto(server.url + "/runs?sort=name&order=asc&limit=2")
    assert [row.inner_text().split("\t")[1] for row in page.locator("#runs tbody tr").all()] == [GROUPS, HOSTILE_RUN]
    page.get_by_role("link", name="next").click()
    assert [row.inner_text().split("\t")[1] for row in page.locator("#runs tbody tr").all()] == [ORACLE, TRAIN]
    assert page.locator(".pager").inner_text().startswith("3–4 of 6")


def test_unknown_episode_page_says_so(page, server):
    response = page.goto(server.url + "/episodes/999999")
    assert response.status == 404
    assert page.locator("#error-message").inner_text() == "no episode with id 999999; open one from its run's task list"


def _assert_inert(page, where) -> None:
    assert where.locator("script").count() == 0 and where.locator("img").count() == 0
    page.wait_for_timeout(200)  # an <img src=x> would have failed to load and fired onerror by now
    assert page.evaluate("typeof window.pwned") == "undefined"


def test_an_eval_sibling_group_side_by_side_diverging_and_inert(page, server):
    page.goto(server.url + "/runs?q=" + GROUPS)
    page.get_by_role("link", name=GROUPS, exact=True).click()
    page.locator("#tasks a.group-link").click()
    assert page.locator("h1").inner_text() == "Sibling group 7/g0"
    assert page.locator("#group-label").inner_text() == "all fail"
    columns = page.locator("#siblings .sibling")
    assert columns.count() == 2
    assert "diverge at message 3" in page.locator("#divergence-note").inner_text()
    # the first message that differs is the agent's first reply, outlined in both columns
    first = [columns.nth(i).locator(".turn").first for i in (0, 1)]
    assert all("divergence" in (t.get_attribute("class") or "") for t in first)
    assert page.locator(".turn.divergence").count() == 2
    assert sorted(t.locator(".role").inner_text() for t in first) == ["assistant", "assistant"]
    texts = sorted(t.inner_text() for t in first)
    assert "get_user_details" in texts[1] and texts[0].endswith(f"Goodbye {HOSTILE}")  # shown as text
    assert page.locator("#shared-prefix summary").inner_text() == "2 messages every sibling shares"
    assert HOSTILE in page.locator("#siblings .turn.tool .content").inner_text()
    _assert_inert(page, page.locator("main"))


def test_a_train_runs_page_shows_its_train_summary_not_an_eval_table(page, server):
    page.goto(server.url + "/runs?kind=train")
    page.get_by_role("link", name=TRAIN, exact=True).click()
    assert page.locator("h1").inner_text() == f"Run {TRAIN}"
    rows = dict(row.inner_text().split("\t") for row in page.locator("#summary tr").all())
    final = train_steps(server.store, TRAIN)["eval/success"].dropna().iloc[-1]
    assert rows["method"] == "sgcd" and rows["eval/success/final"] == format_for("eval/success/final").format(final)
    assert "eval/success/final_ci95_low" in rows and "eval/decoding" in rows
    assert not any(name.startswith(("pass^", "termination/")) for name in rows)  # no eval table of zeros
    assert page.locator("#tasks").count() == 0
    points = page.locator("#eval-points tbody tr")
    assert points.count() == 2 and points.last.inner_text().startswith("2\t")
    points.last.get_by_role("link").click()
    assert page.locator("h1").inner_text() == f"Run {TRAIN}/eval-step-000002"
    assert page.locator("#decoding").inner_text() == "greedy, 1 sample per task"  # the held-out decoding
    page.go_back()
    group = page.locator("#recorded-groups tbody tr").first
    assert group.inner_text().startswith("1\t")  # the first step with recorded credit
    group.locator("a.heatmap-link").click()
    assert page.url.startswith(f"{server.url}/runs/{server.store.get_run(TRAIN).id}/credit/1?group=")


def test_a_train_run_curves_link_their_eval_runs(page, server):
    page.goto(server.url + "/runs?kind=train")
    row = page.locator("#runs tbody tr")
    assert row.count() == 1 and "sgcd" in row.inner_text()
    row.get_by_role("link", name=TRAIN, exact=True).click()
    page.locator("#training-link").click()
    assert page.locator("h1").inner_text() == f"Training of {TRAIN}"
    assert page.locator("#method").inner_text() == "sgcd"
    logged = train_steps(server.store, TRAIN)
    for metric in ("reward/mean", "loss/policy", "eval/success", "sgcd/w_mean"):
        points = page.locator(f'g.series[data-metric="{metric}"] circle.point')
        values = logged[metric].dropna()
        assert points.count() == len(values), metric  # one point per step that logged it
        hover = points.last.locator("title").text_content()
        assert hover.startswith(f"{metric} at step {int(logged['step'][values.index[-1]])}: ")
        assert float(points.last.get_attribute("data-value")) == values.iloc[-1]
    links = [page.locator(f'g.series[data-metric="{m}"] a.eval-point') for m in ("eval/success", "eval/reward")]
    hrefs = [[a.get_attribute("href") for a in series.all()] for series in links]
    assert len(hrefs[0]) == 2 and hrefs[0] == hrefs[1]  # both held-out series link the same eval runs
    links[1].last.click()  # drawn last, so on top where the two points meet
    assert page.locator("h1").inner_text() == f"Run {TRAIN}/eval-step-000002"


def test_the_credit_heatmap_shows_the_stored_tokens_and_values(page, server):
    page.goto(server.url + "/runs?kind=train")
    page.get_by_role("link", name=TRAIN, exact=True).click()
    page.locator("#training-link").click()
    page.locator("#credit-steps").get_by_role("link", name="step 2").click()
    assert page.locator("h1").inner_text() == "Token credit at step 2"
    rows = token_credit_rows(server.store, TRAIN, 2)
    siblings = page.locator(".sibling-tokens")
    assert siblings.count() == len(rows) == 3
    for i, row in enumerate(rows):
        tokens = siblings.nth(i).locator(".tok")
        assert tokens.count() == len(row["token_ids"])  # every stored token, none retokenized
        # the decoded text as stored, shown as text (a token like "</tool_response>" is no element)
        assert tokens.evaluate_all("ts => ts.map(t => t.textContent)") == row["tokens"]
        advantages = tokens.evaluate_all("ts => ts.map(t => t.dataset.advantage)")
        assert [float(a) for a in advantages] == row["advantages"]
        title = tokens.first.get_attribute("title")
        assert title.startswith(f"advantage {row['advantages'][0]}\n")
        assert f"\nmultiplier {row['values']['multiplier'][0]}\n" in title
    # the colour follows the advantage's sign: blue classes below 0, red above
    success = siblings.nth(0).locator(".tok").first.get_attribute("class")
    failure = siblings.nth(1).locator(".tok").first.get_attribute("class")
    assert rows[0]["advantages"][0] > 0 > rows[1]["advantages"][0]
    assert " p" in success and " n" in failure
    assert page.locator("#legend span").count() == 2 * 10 + 1 + 3  # 21 colours, two ends, a note
    page.locator("#colour-by").get_by_role("link", name="multiplier").click()
    assert page.locator("#colour-field").inner_text() == "multiplier"
    assert "centre 1.0" in page.locator("#legend").inner_text()


def test_a_training_groups_siblings_and_its_sgcd_reference(page, server):
    rows = token_credit_rows(server.store, TRAIN, 1)
    page.goto(server.url + "/runs?kind=train")
    page.get_by_role("link", name=TRAIN, exact=True).click()
    page.locator("#training-link").click()
    page.locator("#credit-steps").get_by_role("link", name="step 1").click()
    page.get_by_role("link", name="the siblings' conversations").click()
    assert page.locator("h1").inner_text() == f"Sibling group {rows[0]['group_id']}"
    assert page.locator("#group-label").inner_text() == "mixed"
    key = rows[0]["reference"]
    stored = get_guidance(server.store, [(key["digest"], key["model"], key["prompt_version"])])
    (guidance,) = stored.values()
    assert page.locator("#reference-model").inner_text() == "diff"
    assert page.locator("#reference-text").text_content() == guidance["text"]
    assert page.locator("#reference-cost").inner_text() == "$0.0000"
    headers = page.locator("#siblings .sibling h3").all_inner_texts()
    assert [h.split(":")[1].split()[0] for h in headers] == ["success", "failure", "success"]
    assert page.locator(".turn.divergence").count() == 3  # each sibling's first differing message
    page.locator("#credit-link").click()
    assert page.locator("h1").inner_text() == "Token credit at step 1"


def test_a_hostile_token_and_message_on_the_heatmap_and_group_render_as_text(browser, server, tmp_path):
    """The toy tokenizer never writes HTML, so a copy of the database gets one more recorded step
    (99) through the store's API: step 2's first sibling with the hostile HTML as its first token
    and in its messages. Both pages show it as text and run nothing."""
    import sqlite3

    source, copy = sqlite3.connect(server.db.removeprefix("sqlite:///")), sqlite3.connect(tmp_path / "h.db")
    source.backup(copy)
    source.close()
    copy.close()
    store = Store(db_url(tmp_path / "h.db"))
    row = token_credit_rows(store, TRAIN, 2)[0]
    row |= {"tokens": [HOSTILE, *row["tokens"][1:]],
            "messages": [*row["messages"][:-1], {"role": "assistant", "content": HOSTILE}]}
    put_token_credit(store, TRAIN, 99, [row])
    train_id = store.get_run(TRAIN).id
    store.close()
    view = ViewServer(db_url(tmp_path / "h.db"))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{view.url}/runs/{train_id}/credit/99")
        tokens = page.locator(".tok")
        assert tokens.count() == len(row["tokens"]) and tokens.first.text_content() == HOSTILE
        _assert_inert(page, page.locator("main"))
        page.get_by_role("link", name="the siblings' conversations").click()
        assert page.locator("#siblings .turn.assistant .content").last.text_content() == HOSTILE
        _assert_inert(page, page.locator("main"))
    finally:
        context.close()
        view.stop()

"""`harness view`'s JSON API and command line, against the real server (a `harness view`
subprocess) on a database filled by real runs (tests/view_server.py).

What is proved: the API gives the numbers `harness results show` / `compare` print; unknown runs
and episodes are 404s and bad query parameters 400s, each one JSON message and never a traceback;
the store is opened read-only (an old-schema database is not migrated, a missing one not created);
a non-loopback --host needs --allow-remote."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import urllib.error
import urllib.request

import pytest
from view_server import GROUPS, HOSTILE, HOSTILE_RUN, ORACLE, TRAIN, ViewServer, db_url, fill, fill_training, harness

from harness.results.view_data import sibling_group
from harness.store import StorageError, Store, log_train_step, token_credit_rows, train_steps
from harness.types import EpisodeResult, ErrorClass, Score, Termination

EVAL_RUNS = [GROUPS, HOSTILE_RUN, ORACLE]
TRAIN_RUNS = [TRAIN, f"{TRAIN}/eval-step-000000", f"{TRAIN}/eval-step-000002"]  # the train run and its two evals


@pytest.fixture(scope="module")
def db(tmp_path_factory, tau_mirror) -> str:
    folder = tmp_path_factory.mktemp("view")
    url = db_url(folder / "h.db")
    fill(url)
    fill_training(url, folder / "train")
    return url


@pytest.fixture(scope="module")
def server(db):
    view = ViewServer(db)
    yield view
    view.stop()


def get(server: ViewServer, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        assert "Traceback" not in body
        return exc.code, json.loads(body)


def run_ids(server: ViewServer) -> dict[str, int]:
    return {r["name"]: r["id"] for r in get(server, "/api/runs")[1]["runs"]}


def test_runs_list_pages_filters_and_sorts(server):
    status, page = get(server, "/api/runs?sort=name&order=asc")
    assert status == 200 and page["total"] == 6
    assert [r["name"] for r in page["runs"]] == EVAL_RUNS + TRAIN_RUNS
    by_name = {r["name"]: r for r in page["runs"]}
    assert by_name[ORACLE]["pass^1"] == 1.0 and by_name[ORACLE]["episodes"] == 4
    assert by_name[HOSTILE_RUN]["pass^1"] == 0.5 and by_name[HOSTILE_RUN]["episodes"] == 2
    second = get(server, "/api/runs?sort=name&order=asc&limit=1&offset=2")[1]
    assert second["total"] == 6 and [r["name"] for r in second["runs"]] == [ORACLE]
    assert [r["name"] for r in get(server, "/api/runs?q=hostil")[1]["runs"]] == [HOSTILE_RUN]
    assert [r["name"] for r in get(server, "/api/runs?kind=train")[1]["runs"]] == [TRAIN]


def test_a_train_run_is_listed_with_its_method_and_final_held_out_success(server, db):
    runs = {r["name"]: r for r in get(server, "/api/runs")[1]["runs"]}
    train = runs[TRAIN]
    assert train["kind"] == "train" and train["method"] == "sgcd" and train["episodes"] == 0
    last = f"{TRAIN}/eval-step-000002"  # the highest step's evaluation, not step 0's
    steps = train_steps(Store(db, read_only=True), TRAIN)
    assert train["held_out"] == {"step": 2, "run_id": runs[last]["id"], "name": last,
                                 "success": steps["eval/success"].dropna().iloc[-1]}  # what training logged
    assert train["held_out"]["success"] == runs[last]["pass^1"]  # its eval run's pass^1 (no infra errors here)
    assert "held_out" not in runs[ORACLE]


def _held_out_episode(task: str, trial: int, success: bool, infra: bool = False) -> EpisodeResult:
    return EpisodeResult(task_id=task, trial=trial, seed=trial, messages=[{"role": "user", "content": "hi"}],
                         termination=Termination.INFRASTRUCTURE_ERROR if infra else Termination.AGENT_STOP,
                         score=Score(reward=float(success), success=success),
                         error_class=ErrorClass.INFRA if infra else ErrorClass.NONE)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])  # the list reads a key inside the logged JSON
def test_a_train_runs_listed_score_is_the_one_results_list_prints(tmp_path, request, backend):
    """Both give the last evaluation point's held-out success as training logged it, also where an
    infra error makes the tasks' trial counts differ (per-episode and per-task means part ways)."""
    url = db_url(tmp_path / "t.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = Store(url)
    store.create_run(name="t", kind="train", env="toy", data_version=None, split="train", agent="hf",
                     agent_model="tiny-toy", user=None, user_model=None,
                     config={"train": {"method": "grpo", "eval_trials": 2}})
    played = {0: [("a", 0, False, False), ("a", 1, False, False), ("b", 0, False, False), ("b", 1, False, False)],
              2: [("a", 0, True, False), ("a", 1, False, True), ("b", 0, False, False), ("b", 1, False, False)]}
    for step, episodes in played.items():
        name = f"t/eval-step-{step:06d}"
        store.create_run(name=name, kind="eval", env="toy", data_version=None, split="test", agent="hf",
                         agent_model="tiny-toy", user=None, user_model=None,
                         config={"train_run": "t", "step": step, "temperature": 1.0, "trials": 2})
        for episode in episodes:
            store.add_episode(name, _held_out_episode(*episode))
        scored = [e for e in episodes if not e[3]]  # as trainers.evaluate logs it: over scored episodes
        log_train_step(store, "t", step, {"eval/success": sum(e[2] for e in scored) / len(scored)})
    log_train_step(store, "t", 3, {"reward/mean": 0.5})  # a later step without an evaluation
    printed = {r["run"]: r["score"] for r in json.loads(harness("results", "list", "--db", url, "--format", "json")
                                                        .stdout)}
    view = ViewServer(url)
    try:
        listed = {r["name"]: r for r in get(view, "/api/runs")[1]["runs"]}
    finally:
        view.stop()
    held_out = listed["t"]["held_out"]
    assert held_out["success"] == pytest.approx(printed["t"], rel=1e-12) == pytest.approx(1 / 3)
    assert (held_out["step"], held_out["name"], held_out["run_id"]) == (2, "t/eval-step-000002",
                                                                        listed["t/eval-step-000002"]["id"])


def test_run_summary_is_what_results_show_prints(server, db):
    ids = run_ids(server)
    status, page = get(server, f"/api/runs/{ids[ORACLE]}")
    shown = json.loads(harness("results", "show", ORACLE, "--db", db, "--format", "json").stdout)[0]
    assert status == 200
    for key in ("pass^1", "pass^2", "pass^1/ci95_low", "tasks", "trials", "termination/user_stop", "total_cost"):
        assert page["summary"][key] == shown[key], key
    assert [t["task_id"] for t in page["tasks"]] == ["0", "7"]
    assert [len(t["trials"]) for t in page["tasks"]] == [2, 2]
    assert get(server, f"/api/runs/{ids[ORACLE]}?only=failed")[1]["tasks"] == []
    failed = get(server, f"/api/runs/{ids[HOSTILE_RUN]}?only=all_failed")[1]
    assert [t["task_id"] for t in failed["tasks"]] == ["7"] and failed["tasks"][0]["successes"] == 0


def test_an_eval_runs_page_states_its_decoding(server, db):
    ids = run_ids(server)
    for run in (GROUPS, ORACLE):  # sampled at temperature 1; the oracle does not sample (none)
        shown = json.loads(harness("results", "show", run, "--db", db, "--format", "json").stdout)[0]
        assert get(server, f"/api/runs/{ids[run]}")[1]["summary"]["decoding"] == shown["decoding"], run
    assert shown["decoding"] is None and "temperature 1" in get(server, f"/api/runs/{ids[GROUPS]}")[1]["summary"][
        "decoding"]


def test_a_train_runs_page_is_what_results_show_prints_for_it(server, db):
    ids = run_ids(server)
    status, page = get(server, f"/api/runs/{ids[TRAIN]}")
    shown = json.loads(harness("results", "show", TRAIN, "--db", db, "--format", "json").stdout)[0]
    shown.pop("run")
    assert status == 200 and list(page["summary"]) == list(shown)  # every row, in the CLI's order
    for key, value in shown.items():  # the CLI's JSON keeps 15 significant digits
        assert page["summary"][key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert page["method"] == "sgcd" and "pass^1" not in page["summary"] and "tasks" not in page  # no eval table
    points = page["eval_points"]
    assert [(p["step"], p["run_id"]) for p in points] == [(0, ids[f"{TRAIN}/eval-step-000000"]),
                                                          (2, ids[f"{TRAIN}/eval-step-000002"])]
    final = points[-1]
    assert final["success"] == shown["eval/success/final"]
    assert (final["ci95_low"], final["ci95_high"]) == (shown["eval/success/final_ci95_low"],
                                                       shown["eval/success/final_ci95_high"])
    store = Store(db, read_only=True)
    assert page["credit_steps"] == [1, 2]
    recorded = [(step, r["group_id"], r["task_id"]) for step in (1, 2) for r in token_credit_rows(store, TRAIN, step)]
    groups = sorted(set(recorded), key=recorded.index)  # by step, in recording order
    assert [(g["step"], g["group_id"], g["task_id"]) for g in page["groups"]] == groups
    assert sum(g["siblings"] for g in page["groups"]) == len(recorded)


def test_episode_has_the_conversation_tool_call_and_result(server):
    ids = run_ids(server)
    episode_id = get(server, f"/api/runs/{ids[HOSTILE_RUN]}")[1]["tasks"][1]["trials"][0]["episode_id"]
    status, page = get(server, f"/api/episodes/{episode_id}")
    episode = page["episode"]
    assert status == 200 and episode["run_name"] == HOSTILE_RUN and episode["termination"] == "user_stop"
    call = next(t for t in episode["turns"] if t["tool_calls"])["tool_calls"][0]
    assert call == {"id": call["id"], "name": "get_user_details", "arguments": {"user_id": HOSTILE}}
    result = next(t for t in episode["turns"] if t["role"] == "tool")
    assert result["tool_name"] == "get_user_details" and result["is_error"] and HOSTILE in result["content"]
    assert episode["agent_prompt_tokens"] > 0 and "db_match" in episode["score_breakdown"]


def test_compare_is_what_results_compare_prints(server, db):
    ids = run_ids(server)
    status, page = get(server, f"/api/compare?run={ids[ORACLE]}&run={ids[HOSTILE_RUN]}")
    printed = json.loads(harness("results", "compare", ORACLE, HOSTILE_RUN, "--db", db, "--format", "json").stdout)
    paired = {row["metric"].rsplit("/", 1)[1]: row[HOSTILE_RUN] for row in printed["summary"]
              if row["metric"].startswith("paired/")}
    assert status == 200 and {p["metric"]: p["value"] for p in page["paired"]} == paired
    assert [t["task_id"] for t in page["tasks"]] == ["7", "0"] and page["disagreements"] == 1  # disagreement first
    assert page["tasks"][0]["rates"] == [1.0, 0.0] and page["tasks"][0]["delta"] == -1.0
    assert page["tasks"][1]["rates"] == [1.0, 1.0] and [len(t) for t in page["tasks"][1]["trials"]] == [2, 1]


@pytest.mark.parametrize("path, status, says", [
    ("/api/runs/999", 404, "no run with id 999"),
    ("/api/episodes/999", 404, "no episode with id 999"),
    ("/api/runs?limit=abc", 400, "limit='abc' is not an integer"),
    ("/api/runs?limit=0", 400, "limit=0 is out of range"),
    ("/api/runs?sort=cost", 400, "sort='cost' is not one of"),
    ("/api/runs/1?only=some", 400, "only='some' is not one of all, failed, all_failed"),
    ("/api/compare?run=1", 400, "compare takes two different runs"),
    ("/api/compare?run=1&run=x", 400, "run='x' is not a run id"),
    ("/api/compare?run=1&run=999", 404, "no run with id 999"),
    ("/api/nothing", 404, "no page at /api/nothing"),
    ("/api/runs/{groups}/group", 400, "name the group's task: ?task=ID"),
    ("/api/runs/{groups}/group?task=0", 404, "stored no sibling group of task '0'"),
    ("/api/runs/{groups}/group?task=7&step=1", 400, "is an eval run: its groups have no step"),
    ("/api/runs/{train}/group?task=7", 400, "name the step of the group"),
    ("/api/runs/{train}/group?task=zzz&step=1", 404, "recorded no group of task 'zzz' at step 1"),
    ("/api/runs/{train}/group?task=7&step=x", 400, "step='x' is not an integer"),
    ("/api/runs/999/group?task=7", 404, "no run with id 999"),
    ("/api/runs/{groups}/training", 400, "is an eval run; curves exist for train runs"),
    ("/api/runs/999/training", 404, "no run with id 999"),
    ("/api/runs/{train}/credit/9", 404, "recorded no token credit at step 9; steps with recorded credit: 1, 2"),
    ("/api/runs/{train}/credit/1?group=nope", 404, "recorded no group 'nope' at step 1"),
    ("/api/runs/{train}/credit/1?color=reward", 400, "color='reward' is not one of advantage, control_divergence"),
    ("/api/runs/{train}/credit/1?limit=0", 400, "limit=0 is out of range"),
    ("/api/runs/{groups}/credit/1", 400, "is an eval run"),
    ("/api/runs/999/credit/1", 404, "no run with id 999"),
])
def test_bad_requests_get_one_json_message(server, path, status, says):
    ids = run_ids(server)
    got, body = get(server, path.format(groups=ids[GROUPS], train=ids[TRAIN]))
    assert got == status and says in body["error"] and body["status"] == status
    assert "\n" not in body["error"]


def test_sibling_group_api(server, db):
    ids = run_ids(server)
    store = Store(db, read_only=True)
    status, page = get(server, f"/api/runs/{ids[GROUPS]}/group?task=7")
    group = page["group"]
    assert status == 200 and group["group_id"] == "7/g0" and len(group["siblings"]) == 2
    assert group["divergence"] == sibling_group(store, GROUPS, "7")["divergence"] and page["shared"] == 2
    assert group["divergence"]["message_index"] == 2  # the agent's first reply: a tool call vs a goodbye
    task = token_credit_rows(store, TRAIN, 1)[0]["task_id"]
    status, page = get(server, f"/api/runs/{ids[TRAIN]}/group?task={task}&step=1")
    group = page["group"]
    assert status == 200 and group["label"] == "mixed" and [s["success"] for s in group["siblings"]] == [True, False,
                                                                                                         True]
    assert group["reference"]["model"] == "diff" and group["reference"]["stored"] and group["reference"]["text"]
    assert group["reference"]["cost_usd"] == 0.0  # the diff summarizer calls no model


def test_training_api_has_every_step_and_links_the_eval_points(server, db):
    ids = run_ids(server)
    status, page = get(server, f"/api/runs/{ids[TRAIN]}/training")
    curves = page["curves"]
    assert status == 200 and curves["steps"] == [0, 1, 2] and curves["credit_steps"] == [1, 2]
    assert [(p["step"], p["run_id"]) for p in curves["eval_points"]] == [
        (0, ids[f"{TRAIN}/eval-step-000000"]), (2, ids[f"{TRAIN}/eval-step-000002"])]
    charts = {c["panel"]: c for c in page["charts"] + page["method_charts"]}
    assert {"reward", "held_out", "loss", "clip", "sgcd/w_mean"} <= set(charts)
    reward = next(s for s in charts["reward"]["series"] if s["name"] == "reward/mean")
    logged = train_steps(Store(db, read_only=True), TRAIN)["reward/mean"]
    assert [(p["step"], p["value"]) for p in reward["points"]] == [(int(s), v) for s, v in
                                                                 zip([0, 1, 2], logged) if v == v]  # NaN: not logged
    held_out = next(s for s in charts["held_out"]["series"] if s["name"] == "eval/success")
    assert [p["href"] for p in held_out["points"]] == [f"/runs/{ids[f'{TRAIN}/eval-step-000000']}",
                                                       f"/runs/{ids[f'{TRAIN}/eval-step-000002']}"]


def test_credit_api_is_the_stored_credit(server, db):
    ids = run_ids(server)
    rows = token_credit_rows(Store(db, read_only=True), TRAIN, 2)
    status, page = get(server, f"/api/runs/{ids[TRAIN]}/credit/2?color=multiplier")
    assert status == 200 and page["color"] == "multiplier" and page["scale"]["centre"] == 1.0
    (group,) = page["groups"]
    assert [[t["text"] for t in s["tokens"]] for s in group["siblings"]] == [r["tokens"] for r in rows]
    assert [[t["advantage"] for t in s["tokens"]] for s in group["siblings"]] == [r["advantages"] for r in rows]
    assert [[t["multiplier"] for t in s["tokens"]] for s in group["siblings"]] == [r["values"]["multiplier"]
                                                                                   for r in rows]
    low, high = page["ranges"]["multiplier"]
    assert page["scale"]["extent"] == max(high - 1.0, 1.0 - low)
    assert get(server, f"/api/runs/{ids[TRAIN]}/credit/2?limit=1&offset=1")[1]["groups"] == []  # one group recorded


def test_unknown_page_is_a_short_html_page(server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server.url + "/runs/999", timeout=30)
    body = caught.value.read().decode()
    assert caught.value.code == 404 and "no run with id 999" in body and "Traceback" not in body


def test_an_old_schema_database_is_served_read_only_never_migrated(tmp_path, db):
    """A database from before a column was added: a writable Store would add it and stamp the newer
    schema version; the viewer refuses and writes nothing. (An older database that lacks only an
    optional table is read as it is: tests/test_view_data.py.)"""
    path = tmp_path / "old.db"
    _copy(db, path)
    target = sqlite3.connect(path)
    target.execute("UPDATE harness_meta SET schema_version = schema_version - 1")
    target.execute("ALTER TABLE runs DROP COLUMN status_reason")  # added after the first release
    target.commit()
    old = target.execute("SELECT schema_version FROM harness_meta").fetchone()
    target.close()
    proc = harness("view", "--db", db_url(path), "--port", "0", timeout=60)
    assert proc.returncode == 2 and "read-only here" in proc.stderr and "Traceback" not in proc.stderr
    con = sqlite3.connect(path)
    assert con.execute("SELECT schema_version FROM harness_meta").fetchone() == old
    con.close()


def _copy(db: str, path) -> None:
    source = sqlite3.connect(db.removeprefix("sqlite:///"))
    source.backup(target := sqlite3.connect(path))
    source.close()
    target.close()


@pytest.fixture
def read_only_copy(tmp_path, db):
    """The module's database copied into a read-only place: a tmpfs remounted read-only as root
    (root ignores file modes), file modes otherwise."""
    directory = tmp_path / "ro"
    directory.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(directory)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    _copy(db, directory / "h.db")
    if as_root:
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
    else:
        (directory / "h.db").chmod(0o444)
        directory.chmod(0o555)
    yield directory / "h.db"
    if as_root:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)
    else:
        directory.chmod(0o755)


def test_a_read_only_database_is_served(read_only_copy):
    view = ViewServer(db_url(read_only_copy))
    try:
        ids = run_ids(view)
        assert sorted(ids) == EVAL_RUNS + TRAIN_RUNS
        assert get(view, f"/api/runs/{ids[ORACLE]}")[1]["summary"]["pass^1"] == 1.0
        assert get(view, f"/api/compare?run={ids[ORACLE]}&run={ids[HOSTILE_RUN]}")[0] == 200
    finally:
        view.stop()
    assert sorted(p.name for p in read_only_copy.parent.iterdir()) == ["h.db"]


def test_a_postgres_store_opened_read_only_refuses_writes(postgres_url):
    writable = Store(postgres_url)
    writable.create_run("kept", "eval", "toy", None, "test", "oracle", None, None, None, {})
    writable.close()
    store = Store(postgres_url, read_only=True)
    try:
        assert [r.name for r in store.list_runs()] == ["kept"]
        with pytest.raises(StorageError, match="read-only transaction"):
            store.create_run("new", "eval", "toy", None, "test", "oracle", None, None, None, {})
    finally:
        store.close()
    view = ViewServer(postgres_url)
    try:
        assert list(run_ids(view)) == ["kept"]
    finally:
        view.stop()


def test_a_database_broken_while_served_is_one_line(tmp_path, db):
    """Another program drops the episodes table under the viewer: 503 with the store's one line
    (JSON and HTML), one line on the server's terminal, no traceback anywhere."""
    path = tmp_path / "h.db"
    _copy(db, path)
    view = ViewServer(db_url(path))
    try:
        other = sqlite3.connect(path)
        other.execute("ALTER TABLE episodes RENAME TO gone")
        other.commit()
        other.close()
        status, body = get(view, "/api/runs")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(view.url + "/runs", timeout=30)
        page = caught.value.read().decode()
    finally:
        stderr = view.stop()
    assert status == 503 and "no such table: episodes" in body["error"]
    assert caught.value.code == 503 and "no such table: episodes" in page and "Traceback" not in page
    assert "Traceback" not in stderr and "error serving /api/runs: database" in stderr


def test_a_missing_database_is_refused_not_created(tmp_path):
    path = tmp_path / "none" / "h.db"
    proc = harness("view", "--db", db_url(path), "--port", "0", timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not path.parent.exists()


def test_a_port_out_of_range_is_one_line(tmp_path):
    proc = harness("view", "--db", db_url(tmp_path / "h.db"), "--port", "70000", timeout=60)
    assert proc.returncode == 2 and proc.stderr == "error: --port must be 0 to 65535 (0: any free port), got 70000\n"


def test_a_port_in_use_is_one_line(db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = harness("view", "--db", db, "--port", str(taken.getsockname()[1]), timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:" in proc.stderr


def test_a_remote_host_needs_allow_remote(db):
    proc = harness("view", "--db", db, "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    view = ViewServer(db, "--host", "0.0.0.0", "--allow-remote")
    try:
        assert view.url.startswith("http://0.0.0.0:")
    finally:
        stderr = view.stop()
    assert "warning: serving on 0.0.0.0" in stderr

"""Tier B: the real AppWorld engine (``appworld`` 0.1.3.post1 in its side venv) on a synthetic world
built at test time (tests/appworld_world.py, appworld.md §9.2), served through ``ServerPool``'s
default loopback uvicorn command and driven over raw HTTP. Our per-episode ``/evaluate`` results must
match what ``appworld evaluate <experiment> <split>`` reports offline for the same experiments.

Side venv: ``$HARNESS_APPWORLD_VENV`` (default ``<repo>/.venv-appworld``). Missing -> skip, unless
``HARNESS_REQUIRE_APPWORLD=1`` (then fail). Everything generated lives under pytest's tmp dirs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from envs.appworld.server_pool import ServerPool

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import appworld_world as world  # noqa: E402  (no appworld import at module level)

VENV = Path(os.environ.get("HARNESS_APPWORLD_VENV") or REPO / ".venv-appworld")
PY = VENV / "bin" / "python"
CLI = VENV / "bin" / "appworld"

# experiment -> task id -> code
EXPERIMENTS = {
    "tierb_right": dict(world.CORRECT_SOLUTIONS),
    "tierb_wrong": dict(world.WRONG_SOLUTIONS),
    "tierb_mixed": {world.TASK_IDS[0]: world.CORRECT_SOLUTIONS[world.TASK_IDS[0]],
                    world.TASK_IDS[1]: world.WRONG_SOLUTIONS[world.TASK_IDS[1]]},
}


def _require_venv() -> None:
    ok = PY.exists() and CLI.exists()
    if ok:
        probe = subprocess.run([str(PY), "-c", "import appworld.apps.simple_note.apis"],
                               capture_output=True, text=True)
        ok = probe.returncode == 0
    if not ok:
        msg = (f"AppWorld side venv not usable at {VENV} (create it: python3 -m venv {VENV} && "
               f"{VENV}/bin/pip install 'appworld==0.1.3.post1' 'click<8.5' && "
               f"{VENV}/bin/appworld install; or set HARNESS_APPWORLD_VENV)")
        if os.environ.get("HARNESS_REQUIRE_APPWORLD") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def post(url: str, path: str, body: dict, timeout: float = 60) -> object:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["output"]


def run_episode(url: str, task_id: str, experiment: str, code: str) -> dict:
    info = post(url, "/initialize", {"task_id": task_id, "experiment_name": experiment,
                                     "max_interactions": 10})
    assert info["task_id"] == task_id and info["instruction"]
    out = post(url, "/execute", {"task_id": task_id, "code": code})
    assert "Execution failed" not in out, out
    completed = post(url, "/task_completed", {"task_id": task_id})
    tracker = post(url, "/evaluate", {"task_id": task_id, "suppress_errors": True})
    post(url, "/close", {"task_id": task_id})
    return {"completed": completed, "success": tracker["success"],
            "num_tests": tracker["num_tests"], "passes": len(tracker["passes"]),
            "failures": len(tracker["failures"])}


def official_evaluate(root: Path, experiment: str) -> dict:
    env = dict(os.environ, APPWORLD_ROOT=str(root), APPWORLD_CACHE=str(root / ".cache"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(CLI), "evaluate", experiment, world.SPLIT, "--root", str(root)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = root / "experiments" / "outputs" / experiment / "evaluations" / f"{world.SPLIT}.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    _require_venv()
    root = tmp_path_factory.mktemp("appworld-root")
    env = dict(os.environ, APPWORLD_CACHE=str(root / ".cache"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(PY), str(REPO / "tests" / "appworld_world.py"), "--root", str(root)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_real_engine_scores_match_appworld_evaluate(synthetic_root):
    root = synthetic_root
    pool = ServerPool(2, python=str(PY), appworld_root=str(root), startup_timeout=120,
                      env={"APPWORLD_CACHE": str(root / ".cache")})
    episodes: dict[tuple[str, str], dict] = {}

    async def drive():
        async def one(exp: str, task_id: str, code: str):
            url = await pool.acquire()
            ok = False
            try:
                episodes[(exp, task_id)] = await asyncio.to_thread(
                    run_episode, url, task_id, exp, code)
                ok = True
            finally:
                pool.release(url, healthy=ok)

        await asyncio.gather(*(one(exp, t, code) for exp, sols in EXPERIMENTS.items()
                               for t, code in sols.items()))

    with pool:
        pids = pool.pids
        asyncio.run(drive())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    # what our raw-HTTP episodes saw
    first, second = world.TASK_IDS
    assert all(e["completed"] is True and e["num_tests"] == 2 for e in episodes.values())
    assert episodes[("tierb_right", first)]["success"] is True
    assert episodes[("tierb_right", second)]["passes"] == 2
    assert episodes[("tierb_wrong", first)] | {} == {
        "completed": True, "success": False, "num_tests": 2, "passes": 1, "failures": 1}
    assert episodes[("tierb_mixed", first)]["success"] is True
    assert episodes[("tierb_mixed", second)]["success"] is False

    # the official offline evaluator on the saved outputs must agree, task by task and in TGC/SGC
    expected_tgc = {"tierb_right": 100.0, "tierb_wrong": 0.0, "tierb_mixed": 50.0}
    expected_sgc = {"tierb_right": 100.0, "tierb_wrong": 0.0, "tierb_mixed": 0.0}
    for exp in EXPERIMENTS:
        report = official_evaluate(root, exp)
        agg = report["aggregate"]
        assert agg["task_goal_completion"] == pytest.approx(expected_tgc[exp]), agg
        assert agg["scenario_goal_completion"] == pytest.approx(expected_sgc[exp]), agg
        for task_id in world.TASK_IDS:
            official = report["individual"][task_id]
            ours = episodes[(exp, task_id)]
            assert official["success"] == ours["success"], (exp, task_id, official)
            assert official["num_tests"] == ours["num_tests"]
            assert len(official["passes"]) == ours["passes"]
            assert len(official["failures"]) == ours["failures"]


def test_harness_eval_on_the_real_engine(synthetic_root, tmp_path):
    """`harness eval --env appworld` end to end: real litellm client -> fake model server scripted
    with the right / wrong solution code, real AppWorld servers started by the managed pool from
    the side venv, episodes stored and graded by the real `/evaluate`."""
    from fakes.openai_server import FakeOpenAIServer

    root = synthetic_root
    instructions = {t: world.TASKS[t]["instruction"] for t in world.TASK_IDS}

    def solutions_for(mixed: bool):
        def respond(request):
            system = request["messages"][0]["content"]
            task = next(t for t, text in instructions.items() if text in system)
            code = world.CORRECT_SOLUTIONS[task]
            if mixed and task == world.TASK_IDS[1]:
                code = world.WRONG_SOLUTIONS[task]
            return {"content": f"Let me do it.\n```python\n{code}\n```"}
        return respond

    db = f"sqlite:///{tmp_path}/aw.db"
    env = dict(os.environ, HARNESS_APPWORLD_VENV=str(VENV), APPWORLD_CACHE=str(root / ".cache"))
    rows = {}
    for name, mixed in (("right", False), ("mixed", True)):
        with FakeOpenAIServer(solutions_for(mixed)) as llm:
            proc = subprocess.run(
                [sys.executable, "-m", "harness.cli", "eval", "--env", "appworld", "--appworld-root", str(root),
                 "--split", world.SPLIT, "--appworld-servers", "2", "--model", "openai/fake-agent",
                 "--api-base", llm.base_url, "--run", name, "--db", db, "--quiet", "--max-interactions", "5"],
                env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        shown = subprocess.run([sys.executable, "-m", "harness.cli", "results", "show", name, "--db", db,
                                "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        rows[name] = json.loads(shown.stdout)[0]
    assert rows["right"]["tgc"] == pytest.approx(1.0) and rows["right"]["sgc"] == pytest.approx(1.0)
    assert rows["mixed"]["tgc"] == pytest.approx(0.5) and rows["mixed"]["sgc"] == pytest.approx(0.0)
    assert rows["mixed"]["error/infra"] == 0

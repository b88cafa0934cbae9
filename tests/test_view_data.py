"""The viewer's data for sibling groups, training curves and the credit heatmap
(``harness.results.view_data``), and the token-credit recording behind it
(``harness train --log-credit-every``, ``trainers.credit_log``).

The training runs are real (tiny toy policy, SGCD with the diff summarizer, two steps on CPU). An
untrained tiny policy almost never succeeds, so, as in the method tests (tests/toy_groups.py),
the rollouts' rewards are rewritten to alternate 1 / 0 before the method sees them: every group
is mixed and SGCD does its full work (reference, teacher, salience). Everything after the
rollout (method, recording, update, store) is the real code.
Run: .venv/bin/python -m pytest tests/test_view_data.py
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from test_cli import harness  # noqa: E402
from toy_groups import alternate_rewards  # noqa: E402

from harness.errors import ConfigError  # noqa: E402
from harness.results.view_data import first_divergence, sibling_group, token_credit, train_curves  # noqa: E402
from harness.store import Store, token_credit_rows  # noqa: E402
from harness.store.version import SCHEMA_VERSION  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.loop import train  # noqa: E402

SGCD_VARIED = {"control": "off", "kl_floor": 0.0}
"""No calibration against a control: on an untrained policy the calibrated salience is 0 on every
token (W = 1 everywhere), which would hide a per-token value recorded in the wrong place."""


def _cfg(tmp_path: Path, run: str, **kw) -> TrainConfig:
    base = TrainConfig(env="toy", policy="tiny-toy", run=run, db=f"sqlite:///{tmp_path}/h.db",
                       out_dir=str(tmp_path / run), steps=2, tasks_per_step=2, group_size=3, eval_every=2,
                       eval_tasks=2, lr=3e-3, max_new_tokens=12, checkpoint_every=10, seed=5, quiet=True,
                       method="sgcd", summarizer="diff", method_overrides=SGCD_VARIED)
    return replace(base, **kw)


def _train(tmp_path: Path, run: str, **kw) -> dict:
    import trainers.loop as loop

    real = loop.collect_groups
    with pytest.MonkeyPatch.context() as mp:  # the rollouts are real; their rewards alternate (see above)
        mp.setattr(loop, "collect_groups", lambda *a, **k: alternate_rewards(real(*a, **k)))
        return train(_cfg(tmp_path, run, **kw), echo=lambda _: None)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A database with train run ``sgcd`` (credit recorded at steps 1 and 2, one group each) and
    the summary of its training."""
    tmp = tmp_path_factory.mktemp("view")
    summary = _train(tmp, "sgcd", log_credit_every=1, log_credit_groups=1)
    return Store(f"sqlite:///{tmp}/h.db"), summary, tmp


def test_recording_stores_each_siblings_tokens_advantages_and_sgcd_values(recorded):
    store, _, _ = recorded
    from transformers import AutoTokenizer

    for step in (1, 2):
        rows = token_credit_rows(store, "sgcd", step)
        assert len(rows) == 3 and len({r["group_id"] for r in rows}) == 1  # --log-credit-groups 1, G = 3
        assert [r["success"] for r in rows] == [True, False, True]  # the alternating rewards
        assert rows[0]["reference"]["model"] == "diff" and rows[0]["reference"]["digest"]
    tokenizer = AutoTokenizer.from_pretrained(str(Path(recorded[1]["out_dir"]) / "checkpoints" / "step-000000"))
    for r in token_credit_rows(store, "sgcd", 1):
        n = len(r["token_ids"])
        assert n > 0 and r["trained"] and len(r["tokens"]) == len(r["turns"]) == len(r["advantages"]) == n
        assert r["tokens"] == [tokenizer.decode([t]) for t in r["token_ids"]]  # decoded id by id
        assert set(r["values"]) == {"multiplier", "salience", "divergence", "control_divergence"}
        assert all(len(v) == n for v in r["values"].values())
        # the advantage the update used is A * W per token: the sign of the group advantage, W in [1, cap]
        w, s = r["values"]["multiplier"], r["values"]["salience"]
        assert max(w) > min(w) and all(abs(x - min(1.0 + y, 2.0)) < 1e-5 for x, y in zip(w, s))  # W = clip(1 + s)
        assert r["values"]["control_divergence"] == [0.0] * n and min(r["values"]["divergence"]) > 0
        a = [adv / x for adv, x in zip(r["advantages"], w)]
        assert max(a) - min(a) < 1e-5 and (a[0] > 0) == r["success"]


def test_recording_does_not_change_the_trained_weights(tmp_path, recorded):
    _, with_recording, _ = recorded
    without = _train(tmp_path, "plain")  # the same run, --log-credit-every 0
    a = load_file(str(Path(with_recording["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(without["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert token_credit_rows(Store(f"sqlite:///{tmp_path}/h.db"), "plain", 1) == []


@pytest.mark.parametrize("method", ["rlsd", "rlcsd"])
def test_multiplier_methods_record_their_multiplier(tmp_path, method):
    """RLSD and RLCSD (the GRPO family's token-multiplier hook) record each token's multiplier m,
    and the advantage recorded is the one the update used: the group advantage times m. Groups of
    4 (rewards 1 0 1 0): every RLCSD trajectory has another correct and another wrong sibling, so
    each gets a multiplier (with 3, the wrong one keeps GRPO's scalar credit)."""
    _train(tmp_path, method, method=method, method_overrides={}, steps=1, group_size=4, eval_every=0,
           log_credit_every=1, log_credit_groups=1)
    rows = token_credit_rows(Store(f"sqlite:///{tmp_path}/h.db"), method, 1)
    assert len(rows) == 4 and all(r["trained"] for r in rows)
    for r in rows:
        m = r["values"]["multiplier"]
        assert len(m) == len(r["advantages"]) == len(r["tokens"]) > 0 and min(m) >= 0
        group_advantage = [a / x for a, x in zip(r["advantages"], m) if x > 1e-6]
        assert group_advantage and max(group_advantage) - min(group_advantage) < 1e-4
        assert (group_advantage[0] > 0) == r["success"]
    assert any(max(r["values"]["multiplier"]) != min(r["values"]["multiplier"]) for r in rows)  # per token


def test_token_credit_is_ready_to_colour(recorded):
    store, _, _ = recorded
    data = token_credit(store, "sgcd", 2)
    assert data["method"] == "sgcd" and data["step"] == 2
    assert data["fields"] == ["advantage", "control_divergence", "divergence", "multiplier", "salience"]
    (group,) = data["groups"]
    assert group["reference"]["stored"] and group["reference"]["text"] and group["reference"]["cost_usd"] == 0.0
    tokens = [t for s in group["siblings"] for t in s["tokens"]]
    for name in data["fields"]:
        low, high = data["ranges"][name]
        assert low == min(t[name] for t in tokens) and high == max(t[name] for t in tokens)
    assert {"id", "text", "turn"} <= set(tokens[0])
    json.dumps(data, allow_nan=False)  # plain JSON, no NaN
    assert token_credit(store, "sgcd", 2, group_id=group["group_id"])["groups"] == data["groups"]


def test_sibling_group_of_a_training_step(recorded):
    store, _, _ = recorded
    task = token_credit_rows(store, "sgcd", 1)[0]["task_id"]
    group = sibling_group(store, "sgcd", task, step=1)
    assert group["kind"] == "train" and group["label"] == "mixed" and len(group["siblings"]) == 3
    assert group["reference"]["model"] == "diff" and group["reference"]["text"]
    assert all(s["messages"] for s in group["siblings"])
    d = group["divergence"]
    assert d is not None
    conversations = [s["messages"] for s in group["siblings"]]
    at = d["message_index"]
    assert all(c[:at] == conversations[0][:at] for c in conversations)  # the same before it ...
    assert len({json.dumps(c[at] if at < len(c) else None) for c in conversations}) > 1  # ... not at it
    json.dumps(group, allow_nan=False)


def test_sibling_group_of_an_eval_run_with_group_size(tmp_path):
    db = f"sqlite:///{tmp_path}/e.db"
    harness("eval", "--env", "tau-airline", "--agent", "oracle", "--user", "scripted", "--tasks", "0,1",
            "--group-size", "2", "--run", "g", "--db", db, "--quiet", check=True)
    group = sibling_group(Store(db), "g", "1")
    assert group["kind"] == "eval" and group["group_id"] == "1/g0" and [s["trial"] for s in group["siblings"]] == [0, 1]
    assert group["label"] == "all_success" and group["reference"] is None
    assert group["divergence"] is None  # the oracle plays the same conversation twice
    with pytest.raises(ConfigError, match="no sibling group of task '7'"):
        sibling_group(Store(db), "g", "7")


def test_first_divergence():
    a = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert first_divergence([a, a]) is None
    assert first_divergence([a, a[:1]]) == 1
    assert first_divergence([a, [a[0], {"role": "assistant", "content": "z"}]]) == 1
    assert first_divergence([a]) is None


def test_train_curves_link_eval_points_to_their_runs(recorded):
    store, _, _ = recorded
    curves = train_curves(store, "sgcd")
    assert curves["steps"] == [0, 1, 2] and curves["credit_steps"] == [1, 2]
    assert [(p["step"], p["run"], p["stored"]) for p in curves["eval_points"]] == [
        (0, "sgcd/eval-step-000000", True), (2, "sgcd/eval-step-000002", True)]
    assert store.get_run("sgcd/eval-step-000002").kind == "eval"
    assert "sgcd/w_mean" in curves["panels"]["method"] and curves["panels"]["loss"] == ["loss/policy"]
    assert curves["metrics"]["reward/mean"][1] is not None and curves["metrics"]["reward/mean"][0] is None
    json.dumps(curves, allow_nan=False)


@pytest.mark.parametrize("call, message", [
    (lambda s: token_credit(s, "sgcd", 5), "recorded no token credit at step 5; steps with recorded credit: 1, 2"),
    (lambda s: token_credit(s, "nope", 1), "unknown run 'nope'"),
    (lambda s: token_credit(s, "sgcd/eval-step-000000", 1), "is an eval run"),
    (lambda s: token_credit(s, "sgcd", 1, group_id="x"), "recorded no group 'x' at step 1"),
    (lambda s: train_curves(s, "sgcd/eval-step-000000"), "is an eval run; curves exist for train runs"),
    (lambda s: sibling_group(s, "sgcd", "0"), "name the step of the group"),
    (lambda s: sibling_group(s, "sgcd", "zzz", step=1), "recorded no group of task 'zzz' at step 1"),
])
def test_a_bad_request_is_one_clear_config_error(recorded, call, message):
    with pytest.raises(ConfigError) as caught:
        call(recorded[0])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_flag_from_the_command_line(tmp_path):
    bad = harness("train", "--env", "toy", "--policy", "tiny-toy", "--db", f"sqlite:///{tmp_path}/h.db",
                  "--log-credit-every", "-1", "--run", "x")
    assert bad.returncode == 2 and "--log-credit-every" in bad.stderr and "Traceback" not in bad.stderr


# --- the schema migration ---------------------------------------------------------------------
def _version_2(path: Path, recorded) -> None:
    """A copy of the recorded database as harness schema version 2 wrote it (no token_credit)."""
    src, dst = sqlite3.connect(recorded[2] / "h.db"), sqlite3.connect(path)
    try:  # closed explicitly: ``with`` only commits, and an open file keeps a mount busy
        src.backup(dst)
        dst.execute("DROP TABLE token_credit")
        dst.execute("UPDATE harness_meta SET schema_version = 2")
        dst.commit()
    finally:
        src.close()
        dst.close()


def test_a_version_2_database_gets_the_table_and_keeps_its_runs(tmp_path, recorded):
    path = tmp_path / "v2.db"
    _version_2(path, recorded)
    store = Store(f"sqlite:///{path}")
    assert store.get_run("sgcd").kind == "train" and train_curves(store, "sgcd")["credit_steps"] == []
    store.close()
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT schema_version FROM harness_meta").fetchone() == (SCHEMA_VERSION,) == (3,)
        assert con.execute("SELECT COUNT(*) FROM token_credit").fetchone() == (0,)
        assert con.execute("SELECT COUNT(*) FROM train_steps").fetchone() == (3,)


def test_a_read_only_version_2_database_is_read_without_the_table(tmp_path, recorded):
    """Read-only (a read-only mount as root, who ignores file modes; file modes otherwise): the
    missing optional table is no reason to refuse the file, and nothing is written to it."""
    from test_store_failures import read_only_directory

    with read_only_directory(tmp_path / "ro", "32m", lambda d: _version_2(d / "h.db", recorded)) as directory:
        store = Store(f"sqlite:///{directory / 'h.db'}")
        assert store.read_only
        assert train_curves(store, "sgcd")["credit_steps"] == []
        with pytest.raises(ConfigError, match="recorded no token credit at step 1"):
            token_credit(store, "sgcd", 1)
        store.close()
        con = sqlite3.connect(f"file:{directory / 'h.db'}?mode=ro&immutable=1", uri=True)
        assert con.execute("SELECT schema_version FROM harness_meta").fetchone() == (2,)  # left as it was
        con.close()


def test_a_task_drawn_twice_in_a_step_is_recorded_once(tiny_toy_dir):
    """Two groups of one task in a step share a group id (the stream wrapped while resampling):
    the first is recorded, so the step's rows keep their unique key and the step is stored."""
    from toy_groups import toy_rollouts

    from trainers.credit_log import credit_rows
    from trainers.methods import make_method

    toy = toy_rollouts(tiny_toy_dir, 2, group_size=2, max_new_tokens=8)
    prepared = make_method("grpo").prepare(toy.groups, None)
    twice = [toy.groups[0], toy.groups[0], toy.groups[1]]
    rows = credit_rows(twice, prepared, toy.tokenizer, max_groups=2)
    assert [(r["group_id"], r["trial"]) for r in rows] == [(g.group_id, k) for g in toy.groups for k in (0, 1)]

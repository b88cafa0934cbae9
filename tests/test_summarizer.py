"""SGCD summarizer: mixed sibling groups -> redacted, cached credit references.

Groups come from real toy episodes (the episode runner playing scripted turns in the toy env).
LLM summarizers go through the real litellm client to the fake OpenAI-compatible server on
127.0.0.1; the guidance cache is a real SQLite file in tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import replace

import litellm
import pytest
from fakes.openai_server import FakeOpenAIServer

from envs.tau.env import TauAirlineFactory
from envs.toy import ToyFactory
from harness.agents.base import AgentSpec
from harness.episode_runner import play_episode
from harness.errors import ConfigError
from harness.store import Store, guidance_df
from harness.types import AgentTurn, ErrorClass, Group, Termination, ToolCall
from trainers.summarizer import (
    HEADINGS,
    MASK,
    PROMPT_VERSION,
    Redactor,
    RenderSettings,
    format_reference,
    literals_for,
    make_summarizer,
    parse_reference,
    render_group,
    summarize_groups,
    summarizer_metrics,
)

MODEL = "summ"
GOOD = "\n\n".join(f"## {h}\n- point about {h.lower()}" for h in HEADINGS)
FACTORY = ToyFactory()


# -- building groups from real toy episodes ---------------------------------------------------------

class _Scripted:
    def __init__(self, turns: list[AgentTurn]):
        self.turns = list(turns)

    async def act(self, messages, tools) -> AgentTurn:
        return self.turns.pop(0)


def _lookup(item: str, i: int = 1) -> AgentTurn:
    return AgentTurn(tool_calls=[ToolCall(id=f"c{i}", name="lookup", arguments=json.dumps({"name": item}))])


def _answer(*codes: str) -> AgentTurn:
    return AgentTurn(content="The code is " + " and ".join(f'"{c}"' for c in codes) + ".")


def _task(index: int = 0):
    """The index-th one-item task of the toy test split."""
    return [t for t in FACTORY.tasks("test") if len(t.data["items"]) == 1][index]


def _play(task, plans: list[list[AgentTurn]], group_id: str = "g0") -> Group:
    async def main():
        episodes = []
        for trial, plan in enumerate(plans):
            spec = AgentSpec(name="scripted", build=lambda t, s, p=plan: _Scripted(p))
            episodes.append(await play_episode(FACTORY, spec, task, trial=trial, seed=trial, group_id=group_id))
        return episodes

    return Group(task_id=task.id, group_id=group_id, episodes=asyncio.run(main()))


def _wrong_item(task, n: int = 0) -> str:
    code = task.data["codes"][task.data["items"][0]]
    return [i for i, c in task.data["codes"].items() if i not in task.data["items"] and c != code][n]


def _mixed(task, group_id: str = "g0") -> Group:
    """2 successes, a failure that looks up the wrong item, one that answers a wrong code."""
    item, data = task.data["items"][0], task.data
    wrong = _wrong_item(task)
    group = _play(task, [
        [_lookup(item), _answer(data["codes"][item])],
        [_lookup(item), _answer(data["codes"][item])],
        [_lookup(wrong), _answer(data["codes"][wrong])],
        [_lookup(item), _answer("zulu" if data["codes"][item] != "zulu" else "kilo")],
    ], group_id)
    assert group.label == "mixed" and [e.score.success for e in group.episodes] == [True, True, False, False]
    return group


def _llm(server, model: str = MODEL, **kw):
    summ = make_summarizer(f"openai/{model}", api_base=server.base_url, api_key="k", **kw)
    summ.config.backoff_base = 0.001
    return summ


def _store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path}/h.db")


def _literal_in(text: str, literals: list[str]) -> list[str]:
    return [lit for lit in literals if re.search(rf"(?<![A-Za-z0-9]){re.escape(lit)}(?![A-Za-z0-9])", text, re.I)]


# -- the LLM path ---------------------------------------------------------------------------------

def test_request_shows_both_sides_with_outcomes_and_no_literal(fake_llm, tmp_path):
    tasks = [_task(0), _task(1)]
    groups = [_mixed(t, f"g{i}") for i, t in enumerate(tasks)]
    fake_llm.script.extend(MODEL, [{"content": GOOD}, {"content": GOOD}])
    store = _store(tmp_path)
    refs = summarize_groups(_llm(fake_llm), groups, {t.id: t for t in tasks}, FACTORY, store=store, run="r1",
                            concurrency=2)

    assert [(r.group_id, r.task_id, r.status, r.attempts) for r in refs] == [
        ("g0", tasks[0].id, "ok", 1), ("g1", tasks[1].id, "ok", 1)]
    assert all(parse_reference(r.text)[0] is not None and r.leaks == 0 for r in refs)
    assert len(fake_llm.requests) == 2
    for task in tasks:
        body = next(r for r in fake_llm.requests if task.instruction in r["messages"][1]["content"])
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        assert "training-only" in system and "Do not reveal literal answers" in system
        assert all(h in system for h in HEADINGS)
        # Both sides, with their outcomes, successes first.
        assert user.index("outcome: SUCCESS (reward 1.00)") < user.index("outcome: FAILURE (reward 0.00)")
        assert "outcome: FAILURE (reward 0.50)" in user and "2 identical attempts" in user
        for item in (_wrong_item(task), task.data["items"][0]):
            assert f'call lookup(name="{item}")' in user
        assert MASK in user
        # No answer literal anywhere in what was sent.
        literals = FACTORY.redaction_literals(task)
        assert literals and not _literal_in(json.dumps(body), literals)

    rows = guidance_df(store, "r1")
    assert list(rows["status"]) == ["ok", "ok"] and set(rows["model"]) == {f"openai/{MODEL}"}
    assert set(rows["prompt_version"]) == {PROMPT_VERSION} and set(rows["digest"]) == {r.digest for r in refs}
    assert list(rows["text"]) == [r.text for r in refs]


def test_literal_in_the_reply_is_redacted_in_the_stored_text_and_counted(fake_llm, tmp_path):
    task = _task(0)
    code = FACTORY.redaction_literals(task)[0]
    leaky = GOOD.replace("- point about likely divergence points",
                         f"- The right answer is {code.upper()}; F1 answered another code, not {code}.")
    fake_llm.script.extend(MODEL, [{"content": leaky}])
    store = _store(tmp_path)
    (ref,) = summarize_groups(_llm(fake_llm), [_mixed(task)], {task.id: task}, FACTORY, store=store, run="r")
    assert ref.status == "ok" and ref.leaks == 2
    assert not _literal_in(ref.text, [code]) and ref.text.count(MASK) == 2
    assert parse_reference(ref.text)[0] is not None
    row = guidance_df(store, "r").iloc[0]
    assert row["text"] == ref.text and row["leaks"] == 2
    assert summarizer_metrics([ref])["summarizer/leaks"] == 2


def test_cache_hit_makes_no_request_and_other_prompt_or_model_misses(fake_llm, tmp_path):
    task = _task(0)
    group, tasks = _mixed(task), {task.id: task}
    fake_llm.script.extend(MODEL, [{"content": GOOD}])
    first = summarize_groups(_llm(fake_llm), [group], tasks, FACTORY, store=_store(tmp_path), run="r")[0]
    assert first.status == "ok" and len(fake_llm.requests) == 1

    # A fresh Store on the same file (a resumed run) and a reshuffled group: same digest, no call.
    shuffled = replace(group, episodes=list(reversed(group.episodes)))
    again = summarize_groups(_llm(fake_llm), [shuffled], tasks, FACTORY, store=_store(tmp_path), run="r")[0]
    assert len(fake_llm.requests) == 1
    assert (again.status, again.text, again.digest, again.attempts, again.cost_usd) == \
        ("cached", first.text, first.digest, 0, 0.0)
    metrics = summarizer_metrics([again])
    assert metrics["summarizer/cached"] == 1 and metrics["summarizer/calls"] == 0

    other_prompt = _llm(fake_llm)
    other_prompt.prompt_version = "edited-prompt"
    fake_llm.script.extend(MODEL, [{"content": GOOD}])
    assert summarize_groups(other_prompt, [group], tasks, FACTORY, store=_store(tmp_path))[0].status == "ok"
    fake_llm.script.extend("summ2", [{"content": GOOD}])
    assert summarize_groups(_llm(fake_llm, "summ2"), [group], tasks, FACTORY, store=_store(tmp_path))[0].status == "ok"
    assert len(fake_llm.requests) == 3
    assert len(guidance_df(_store(tmp_path))) == 3


def test_malformed_then_good_reply_is_ok_after_one_retry_with_costs_summed(fake_llm, tmp_path):
    task = _task(0)
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    half = GOOD.split("## Failed")[0]  # two headings only
    fake_llm.script.extend("gpt-4o-mini", [{"content": half, "usage": usage}, {"content": GOOD, "usage": usage}])
    (ref,) = summarize_groups(_llm(fake_llm, "gpt-4o-mini"), [_mixed(task)], {task.id: task}, FACTORY,
                              store=_store(tmp_path))
    price = litellm.model_cost["gpt-4o-mini"]
    one_call = 1000 * price["input_cost_per_token"] + 100 * price["output_cost_per_token"]
    assert (ref.status, ref.attempts) == ("ok", 2) and one_call > 0
    assert ref.cost_usd == pytest.approx(2 * one_call) and ref.latency_s > 0
    retry = fake_llm.requests[1]["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert "could not be used (malformed: missing Failed branches" in retry[-1]["content"]
    metrics = summarizer_metrics([ref])
    assert metrics["summarizer/calls"] == 2 and metrics["summarizer/cost_usd"] == pytest.approx(2 * one_call)
    assert metrics["summarizer/fallbacks"] == 0 and metrics["summarizer/latency_s"] == pytest.approx(ref.latency_s)


def test_malformed_twice_falls_back_is_stored_and_never_paid_again(fake_llm, tmp_path):
    task = _task(0)
    group, tasks = _mixed(task), {task.id: task}
    empty_section = GOOD.replace("- point about reusable successful branches", "  -  ")
    fake_llm.script.extend(MODEL, [{"content": "Successes looked it up first."}, {"content": empty_section}])
    (ref,) = summarize_groups(_llm(fake_llm), [group], tasks, FACTORY, store=_store(tmp_path), run="r")
    assert (ref.status, ref.text, ref.attempts) == ("fallback", None, 2)
    assert ref.reason == "malformed: empty section Reusable successful branches"
    metrics = summarizer_metrics([ref])
    assert metrics["summarizer/fallbacks"] == 1 and metrics["summarizer/calls"] == 2

    again = summarize_groups(_llm(fake_llm), [group], tasks, FACTORY, store=_store(tmp_path), run="r")[0]
    assert len(fake_llm.requests) == 2  # no third call
    assert (again.status, again.text, again.reason, again.attempts) == ("cached", None, ref.reason, 0)
    metrics = summarizer_metrics([again])
    assert metrics["summarizer/fallbacks"] == 1 and metrics["summarizer/calls"] == 0
    row = guidance_df(_store(tmp_path), "r").iloc[0]
    assert row["status"] == "fallback" and row["text"] is None and row["attempts"] == 2


def test_provider_down_is_an_infra_fallback_that_is_not_cached(tmp_path):
    task = _task(0)
    group, tasks = _mixed(task), {task.id: task}
    with FakeOpenAIServer(lambda body: {"status": 500, "message": "down"}) as server:
        summ = _llm(server)
        summ.config.max_retries = 1
        (ref,) = summarize_groups(summ, [group], tasks, FACTORY, store=_store(tmp_path), run="r")
        assert ref.status == "fallback" and ref.text is None and ref.reason.startswith("infra: ")
        assert ref.attempts == 0 and len(server.requests) == 2  # the wrapper's own retry
        assert guidance_df(_store(tmp_path)).empty
        summarize_groups(summ, [group], tasks, FACTORY, store=_store(tmp_path), run="r")
        assert len(server.requests) == 4  # tried again: nothing was cached
    assert summarizer_metrics([ref])["summarizer/fallbacks"] == 1


def test_groups_that_are_not_mixed_fall_back_without_a_call(fake_llm, tmp_path):
    task = _task(0)
    item, code = task.data["items"][0], task.data["codes"][task.data["items"][0]]
    wins = _play(task, [[_lookup(item), _answer(code)]] * 2)
    infra = replace(wins.episodes[0], score=replace(wins.episodes[0].score, reward=0.0, success=False),
                    error_class=ErrorClass.INFRA, termination=Termination.INFRASTRUCTURE_ERROR)
    wins_and_infra = replace(wins, episodes=[*wins.episodes, infra])  # an infra failure is not a failure
    refs = summarize_groups(_llm(fake_llm), [wins, wins_and_infra], {task.id: task}, FACTORY, store=_store(tmp_path))
    assert [(r.status, r.reason) for r in refs] == [("fallback", "not mixed: no failures")] * 2
    assert fake_llm.requests == [] and guidance_df(_store(tmp_path)).empty


def test_same_group_twice_in_one_batch_costs_one_call(fake_llm):
    task = _task(0)
    group = _mixed(task)
    fake_llm.script.extend(MODEL, [{"content": GOOD, "delay": 0.05}])
    refs = summarize_groups(_llm(fake_llm), [group, replace(group, group_id="copy")], {task.id: task}, FACTORY)
    assert [(r.group_id, r.status) for r in refs] == [("g0", "ok"), ("copy", "cached")]
    assert refs[0].text == refs[1].text and len(fake_llm.requests) == 1


def test_make_summarizer_checks_the_key_up_front(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        make_summarizer("openai/gpt-4.1-mini")
    diff = make_summarizer("diff")
    assert diff.name == "diff" and diff.prompt_version.startswith("diff-")


# -- the diff summarizer ------------------------------------------------------------------------

def test_diff_summarizer_names_the_divergence_passes_the_parser_and_leaks_nothing(fake_llm, tmp_path):
    task = _task(0)
    group, tasks = _mixed(task), {task.id: task}
    item, wrong = task.data["items"][0], _wrong_item(task)
    store = _store(tmp_path)
    (ref,) = summarize_groups(make_summarizer("diff"), [group], tasks, FACTORY, store=store, run="r")
    assert (ref.status, ref.attempts, ref.cost_usd, ref.leaks) == ("ok", 0, 0.0, 0)
    sections, reason = parse_reference(ref.text)
    assert sections is not None, reason
    assert f'lookup(name="{item}")' in sections[HEADINGS[0]] and "2/2 successful" in sections[HEADINGS[0]]
    failed, divergence = sections[HEADINGS[2]], sections[HEADINGS[3]]
    assert f'at call 1 does `lookup(name="{wrong}")` instead of `lookup(name="{item}")`' in failed
    assert "final reply differs" in failed
    assert f'At call 1: successful attempts do `lookup(name="{item}")`; 1/2 failed attempts do ' \
           f'`lookup(name="{wrong}")` instead.' in divergence
    assert "At the final reply" in divergence
    assert not _literal_in(ref.text, Redactor(literals_for(FACTORY, task)).literals)  # the id "0" is too short to mask
    assert fake_llm.requests == []
    assert guidance_df(store, "r")["model"].tolist() == ["diff"]
    again = summarize_groups(make_summarizer("diff"), [group], tasks, FACTORY, store=store)[0]
    assert (again.status, again.text) == ("cached", ref.text)
    assert summarizer_metrics([ref])["summarizer/latency_s"] > 0


# -- rendering, redaction, parsing --------------------------------------------------------------

def test_render_caps_siblings_and_characters_excludes_infra_and_is_deterministic():
    task = _task(0)
    item, code = task.data["items"][0], task.data["codes"][task.data["items"][0]]
    wrongs = [_wrong_item(task, n) for n in range(6)]
    group = _play(task, [[_lookup(item), _answer(code)]] + [[_lookup(w), _answer("kilo")] for w in wrongs])
    infra = replace(group.episodes[1], trial=99, error_class=ErrorClass.INFRA,
                    messages=group.episodes[1].messages + [{"role": "user", "content": "INFRA-MARKER"}])
    group = replace(group, episodes=group.episodes + [infra])
    redactor = Redactor(literals_for(FACTORY, task))

    text = render_group(group, task, redactor).text
    assert "1 successful and 6 failed attempts" in text and "(showing 1 and 4 distinct ones)" in text
    assert text.count("outcome: FAILURE") == 4 and "INFRA-MARKER" not in text
    assert all(f'lookup(name="{w}")' in text for w in wrongs[:4]) and wrongs[4] not in text
    shuffled = replace(group, episodes=random.Random(0).sample(group.episodes, len(group.episodes)))
    assert render_group(shuffled, task, redactor).text == text

    small = render_group(group, task, redactor, RenderSettings(max_per_side=2, max_chars=700)).text
    assert len(small) <= 700 and small.count("=== Attempt") == 3

    long_obs = replace(group.episodes[0], messages=[
        *group.episodes[0].messages[:-1], {"role": "user", "content": "x" * 5000}, group.episodes[0].messages[-1]])
    clipped = render_group(replace(group, episodes=[long_obs, *group.episodes[1:]]), task, redactor).text
    assert "x" * 297 + "..." in clipped and "x" * 301 not in clipped


def test_redactor_is_case_insensitive_longest_first_and_word_bounded():
    r = Redactor(["echo", "XEHM4B", "emma", "emma_kim_9957", "7", "$1,628"])
    assert r.literals == ["emma_kim_9957", "$1,628", "XEHM4B", "echo", "emma"]  # "7" is too short
    text, n = r.redact_count("ECHO echoes Emma (user emma_kim_9957) paid $1,628 for xehm4b; 7 bags")
    assert n == 5 and text == "[REDACTED] echoes [REDACTED] (user [REDACTED]) paid [REDACTED] for [REDACTED]; 7 bags"
    assert Redactor(["echo"]).redact("Echo, echoes, echo_foo") == "[REDACTED], echoes, [REDACTED]_foo"
    secrets = Redactor([]).redact('{"account_name": "spotify", "password": "hunter2"} access_token="abc.def"')
    assert "hunter2" not in secrets and "abc.def" not in secrets and secrets.count(MASK) == 2


def test_parser_accepts_heading_styles_and_rejects_missing_or_empty_sections():
    styled = "Intro text.\n" + "\n".join(f"**{i}. {h}:**\n* item {i}" for i, h in enumerate(HEADINGS, start=1))
    sections, reason = parse_reference(styled)
    assert reason == "" and sections[HEADINGS[2]] == "* item 3"
    assert format_reference(sections).startswith(f"## {HEADINGS[0]}\n* item 1\n\n## {HEADINGS[1]}")
    assert parse_reference(format_reference(sections))[0] == sections
    assert parse_reference("")[1] == "empty" and parse_reference("  \n")[1] == "empty"
    assert parse_reference(GOOD.replace(f"## {HEADINGS[3]}", "## Other"))[1] == f"malformed: missing {HEADINGS[3]}"
    assert parse_reference(GOOD + "\n## " + HEADINGS[0])[0] is not None  # a repeated heading adds to its section
    assert re.fullmatch(r"[0-9a-f]{12}", PROMPT_VERSION)


# -- per-env literals ---------------------------------------------------------------------------

def test_toy_literals_are_the_answer_codes():
    task = [t for t in FACTORY.tasks("test") if len(t.data["items"]) == 2][0]
    assert FACTORY.redaction_literals(task) == task.data["evaluation_criteria"]["communicate_info"]
    assert literals_for(FACTORY, task)[-1] == task.id


def test_tau_airline_literals_are_the_gold_argument_values(tau_mirror):
    factory = TauAirlineFactory()
    seven, one = factory.tasks("base", ["7", "1"])
    lits = factory.redaction_literals(seven)
    for value in ("XEHM4B", "59XX6W", "HAT005", "HAT178", "2024-05-20", "credit_card_2408938", "1628", "1,628", "7_2",
                  "daiki_muller_1116"):  # the last one: from the user scenario
        assert value in lits, value
    assert "business" not in lits  # an enum value of the tool schema: generic
    assert set(factory.redaction_literals(one)) >= {"raj_sanchez_7340", "Q69X3R"}

    booking = next(t for t in factory.tasks("base")
                   if any(a["name"] == "book_reservation" for a in t.data["evaluation_criteria"]["actions"]))
    actions = booking.data["evaluation_criteria"]["actions"]
    args = next(a for a in actions if a["name"] == "book_reservation")["arguments"]
    lits = factory.redaction_literals(booking)
    assert {args["user_id"], args["passengers"][0]["first_name"], args["passengers"][0]["dob"],
            args["payment_methods"][0]["payment_id"], str(args["payment_methods"][0]["amount"])} <= set(lits)
    assert not {args["cabin"], args["flight_type"], args["insurance"], str(args["total_baggages"])} & set(lits)
    redacted = Redactor(lits).redact(f"Booked for {args['user_id']} paying {args['payment_methods'][0]['amount']}.")
    assert args["user_id"] not in redacted and MASK in redacted

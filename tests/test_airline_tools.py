"""Unit tests of our airline engine (db, tools, grading); no official package needed.

The byte-for-byte comparison with the official engine lives in test_airline_differential.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.tau.airline import grading, tools
from envs.tau.airline.db import RESERVATIONS, USERS, AirlineState, load_base

AIRLINE = Path("data/tau2/domains/airline")
OFFICIAL_BASE_HASH = "124e39a664b56402bcd09cb8a6a9cece6acb8462337c969799d5658e3250f263"  # get_db_hash()


@pytest.fixture(scope="module")
def base(tau_mirror):
    return load_base(tau_mirror / "tau3" / AIRLINE / "db.json")


def load_tasks(tau_mirror: Path, version: str) -> list[dict]:
    return json.loads((tau_mirror / version / AIRLINE / "tasks.json").read_text())


def make_trajectory(calls: list[tuple[str, dict]], state: AirlineState, final: str | None) -> list[dict]:
    """A chat transcript whose assistant plays ``calls`` (one per message) on ``state``, then says
    ``final``: the shape our env records."""
    messages = [{"role": "assistant", "content": "Hi! How can I help you today?"},
                {"role": "user", "content": "I need help with my booking."}]
    for i, (name, arguments) in enumerate(calls):
        call_id = f"call_{i}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]})
        outcome = tools.execute(state, name, arguments)
        messages.append({"role": "tool", "tool_call_id": call_id, "content": outcome.content})
    if final is not None:
        messages.append({"role": "assistant", "content": final})
    return messages


def gold_calls(task: dict) -> list[tuple[str, dict]]:
    return [(a["name"], a["arguments"]) for a in task["evaluation_criteria"]["actions"]]


def call(state, name, **arguments):
    return tools.execute(state, name, arguments)


# --- db ------------------------------------------------------------------------------------------

def test_base_is_cached_and_hashes_like_official(base, tau_mirror):
    assert load_base(tau_mirror / "tau3" / AIRLINE / "db.json") is base
    state = AirlineState(base)
    assert state.full_hash() == OFFICIAL_BASE_HASH
    assert base.tables[RESERVATIONS]["4WQ150"]["status"] is None  # optional fields are present
    method = base.tables[USERS]["mia_li_3668"]["payment_methods"]["certificate_7504069"]
    assert method == {"source": "certificate", "id": "certificate_7504069", "amount": 250.0}


def test_copy_on_write_isolation(base):
    one, two = AirlineState(base), AirlineState(base)
    before = json.dumps(base.tables[RESERVATIONS]["4WQ150"])
    assert not call(one, "cancel_reservation", reservation_id="4WQ150").error
    assert not call(one, "send_certificate", user_id="mia_li_3668", amount=50).error
    assert one.get(RESERVATIONS, "4WQ150")["status"] == "cancelled"
    assert two.get(RESERVATIONS, "4WQ150")["status"] is None
    assert json.dumps(base.tables[RESERVATIONS]["4WQ150"]) == before
    assert "certificate_3221322" not in base.tables[USERS]["mia_li_3668"]["payment_methods"]
    assert AirlineState(base).full_hash() == OFFICIAL_BASE_HASH
    assert one.digest() != two.digest() and one.full_hash() != two.full_hash()


def test_digest_ignores_writes_that_change_nothing(base):
    state = AirlineState(base)
    # Same bag counts, nothing to pay: the record is cloned but equal to the base.
    record = base.tables[RESERVATIONS]["4WQ150"]
    outcome = call(state, "update_reservation_baggages", reservation_id="4WQ150",
                   total_baggages=record["total_baggages"], nonfree_baggages=record["nonfree_baggages"],
                   payment_id="gift_card_3576581")
    assert not outcome.error and state.touched()
    assert state.digest() == AirlineState(base).digest()
    assert state.full_hash() == OFFICIAL_BASE_HASH


# --- tools ---------------------------------------------------------------------------------------

def test_known_results(base):
    state = AirlineState(base)
    user = json.loads(call(state, "get_user_details", user_id="mia_li_3668").content)
    assert list(user) == ["user_id", "name", "address", "email", "dob", "payment_methods",
                          "saved_passengers", "membership", "reservations"]
    assert call(state, "get_flight_status", flight_number="HAT001", date="2024-05-16").content == "available"
    assert call(state, "calculate", expression="10/3").content == "3.33"
    assert len(json.loads(call(state, "list_all_airports").content)) == 20
    direct = json.loads(call(state, "search_direct_flight", origin="JFK", destination="MIA", date="2024-05-16").content)
    assert direct and all(f["date"] is None and f["status"] == "available" for f in direct)
    pairs = json.loads(call(state, "search_onestop_flight", origin="JFK", destination="LAX", date="2024-05-16").content)
    assert pairs and all(a["destination"] == b["origin"] and a["date"] == "2024-05-16" for a, b in pairs)
    assert call(state, "transfer_to_human_agents", summary="x").content == "Transfer successful"


@pytest.mark.parametrize("name, arguments, expected", [
    ("nope", {}, "Error: Tool 'nope' not found."),
    ("get_user_details", {}, "Error: AirlineTools.get_user_details() missing 1 required positional argument: "
                             "'user_id'"),
    ("get_flight_status", {}, "Error: AirlineTools.get_flight_status() missing 2 required positional arguments: "
                              "'flight_number' and 'date'"),
    ("get_user_details", {"user_id": "x", "foo": 1}, "Error: AirlineTools.get_user_details() got an unexpected "
                                                     "keyword argument 'foo'"),
    ("get_user_details", {"self": 1}, "Error: Environment.make_tool_call() got multiple values for argument 'self'"),
    ("get_user_details", {"user_id": "nobody"}, "Error: User nobody not found"),
    ("get_user_details", {"user_id": ["x"]}, "Error: unhashable type: 'list'"),
    ("get_reservation_details", {"reservation_id": "ZZZZZZ"}, "Error: Reservation ZZZZZZ not found"),
    ("get_flight_status", {"flight_number": "HAT001", "date": "2024-06-01"},
     "Error: Flight HAT001 not found on date 2024-06-01"),
    ("calculate", {"expression": "1e5"}, "Error: Invalid characters in expression"),
    ("calculate", {"expression": "2/0"}, "Error: division by zero"),
    ("calculate", {"expression": "9**9**9"}, "Error: int too large to convert to float"),  # bounded, no hang
    ("update_reservation_baggages", {"reservation_id": "4WQ150", "total_baggages": 5, "nonfree_baggages": 1,
                                     "payment_id": "credit_card_0"}, "Error: Payment method not found"),
])
def test_errors(base, name, arguments, expected):
    outcome = tools.execute(AirlineState(base), name, arguments)
    assert outcome == tools.ToolOutcome(expected, True)


def _booking(cabin="economy", payment=None):
    return dict(user_id="mia_li_3668", origin="JFK", destination="MIA", flight_type="one_way", cabin=cabin,
                flights=[{"flight_number": "HAT014", "date": "2024-05-16"}],
                passengers=[{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
                payment_methods=[payment or {"payment_id": "credit_card_4421486", "amount": 124}],
                total_baggages=0, nonfree_baggages=0, insurance="no")


def test_new_ids_are_deterministic(base):
    state = AirlineState(base)
    for expected in ("HATHAT", "HATHAU", "HATHAV"):
        booked = json.loads(call(state, "book_reservation", **_booking()).content)
        assert booked["reservation_id"] == expected and booked["created_at"] == "2024-05-15T15:00:00"
    assert call(state, "book_reservation", **_booking()).content == "Error: Too many reservations"
    seats = state.get("flights", "HAT014")["dates"]["2024-05-16"]["available_seats"]["economy"]
    assert seats == base.tables["flights"]["HAT014"]["dates"]["2024-05-16"]["available_seats"]["economy"] - 3
    for n in (2, 3, 4):
        assert call(state, "send_certificate", user_id="mia_li_3668", amount=10).content == (
            f"Certificate certificate_322132{n} added to user mia_li_3668 with amount 10.")
    assert call(state, "send_certificate", user_id="mia_li_3668", amount=10).content == "Error: Too many certificates"


def test_booking_checks(base):
    state = AirlineState(base)
    wrong_total = call(state, "book_reservation",
                       **_booking(payment={"payment_id": "credit_card_4421486", "amount": 1}))
    assert wrong_total.content == "Error: Payment amount does not add up, total price is 124, but paid 1"
    cert = call(state, "book_reservation", **_booking(payment={"payment_id": "certificate_4856383", "amount": 124}))
    assert cert.content == "Error: Not enough balance in payment method certificate_4856383"
    bad_cabin = call(state, "book_reservation", **_booking(cabin="first"))
    assert bad_cabin.error and bad_cabin.content.startswith("Error: 1 validation error for Reservation\ncabin\n")
    assert state.touched() == []  # failed checks write nothing
    used = call(state, "book_reservation", **_booking(payment={"payment_id": "certificate_7504069", "amount": 124}))
    assert not used.error  # a certificate is consumed whole
    assert "certificate_7504069" not in state.get(USERS, "mia_li_3668")["payment_methods"]


def test_tool_schemas():
    schemas = tools.tool_schemas()
    assert [s["function"]["name"] for s in schemas] == list(tools.TOOL_NAMES) and len(schemas) == 14
    assert tools.WRITE_TOOLS < set(tools.TOOL_NAMES)
    book = next(s for s in schemas if s["function"]["name"] == "book_reservation")["function"]["parameters"]
    assert book["required"] == list(book["properties"]) and book["properties"]["cabin"]["enum"]


# --- grading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["tau3", "tau2"])
def test_gold_trajectories_score_one_and_missing_write_scores_zero(base, tau_mirror, version):
    tasks = load_tasks(tau_mirror, version)
    assert len(tasks) == 50
    for task in tasks:
        criteria = task["evaluation_criteria"]
        calls = gold_calls(task)
        final = "Summary: " + " and ".join(criteria.get("communicate_info") or ["done"])
        messages = make_trajectory(calls, AirlineState(base), final)
        score = grading.grade(task, messages, "user_stop", base)
        assert score.reward == 1.0 and score.success, (task["id"], score.breakdown)
        assert score.breakdown["db_match"] and score.breakdown["note"] is None

        if grading.replay_gold(task, base).digest() != AirlineState(base).digest():
            reads_only = [c for c in calls if c[0] not in tools.WRITE_TOOLS]
            score = grading.grade(task, make_trajectory(reads_only, AirlineState(base), final), "user_stop", base)
            assert score.reward == 0.0 and not score.breakdown["db_match"], task["id"]
        if criteria.get("communicate_info"):
            score = grading.grade(task, make_trajectory(calls, AirlineState(base), "Done."), "user_stop", base)
            assert score.reward == 0.0 and not all(score.breakdown["communicate"].values()), task["id"]


def test_grading_rules(base, tau_mirror):
    task = next(t for t in load_tasks(tau_mirror, "tau3")
                if t["evaluation_criteria"].get("communicate_info") == ["1628"])
    messages = make_trajectory(gold_calls(task), AirlineState(base), "The total is $1,628.")
    assert grading.grade(task, messages, "user_stop", base).reward == 1.0  # commas are stripped
    stopped = grading.grade(task, messages, "max_steps", base)
    assert stopped.reward == 0.0 and stopped.breakdown["db_match"]
    assert stopped.breakdown["note"] == "Simulation terminated prematurely. Termination reason: max_steps"
    # Undecodable arguments never reached the env, so replay skips them.
    broken = messages[:2] + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "b", "type": "function", "function": {"name": "cancel_reservation", "arguments": "{oops"}}]}] \
        + messages[2:]
    assert grading.grade(task, broken, "agent_stop", base).reward == 1.0
    nl = {**task, "evaluation_criteria": {**task["evaluation_criteria"], "reward_basis": ["DB", "NL_ASSERTION"]}}
    with pytest.raises(NotImplementedError):
        grading.grade(nl, messages, "user_stop", base)


def test_hallucinated_tool_replays_as_no_op_whatever_its_recorded_reply(base, tau_mirror):
    """tau2-bench 1.0.1 ``set_state``: a tool name that does not exist is skipped on replay without
    comparing its recorded reply (26.3, the reference package, still compares it and raises on a
    difference, so this half of the rule is checked here; the differential half is
    ``test_hallucinated_tool_calls_replay_as_no_ops``). The reply below is another framework's
    text, not the one our engine would give."""
    task = next(t for t in load_tasks(tau_mirror, "tau3") if any(n in tools.WRITE_TOOLS for n, _ in gold_calls(t)))
    calls = gold_calls(task)
    final = "Done: " + ", ".join(task["evaluation_criteria"].get("communicate_info") or ["all set"])
    messages = make_trajectory(calls, AirlineState(base), final)
    hallucinated = [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "h", "type": "function", "function": {
            "name": "cancel_all_reservations", "arguments": json.dumps({"user_id": "mia_li_3668"})}}]},
        {"role": "tool", "tool_call_id": "h", "content": "Error: unknown tool cancel_all_reservations"}]
    score = grading.grade(task, messages[:2] + hallucinated + messages[2:], "user_stop", base)
    assert (score.reward, score.breakdown["db_match"], score.breakdown["note"]) == (1.0, True, None)
    assert all(score.breakdown["actions"].values()) and len(score.breakdown["actions"]) == len(calls)

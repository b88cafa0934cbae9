"""Adding an env is one folder and one registration line: a throwaway env written in a temporary
folder, outside this repository, is found through ``HARNESS_PLUGINS``, shows its own option in
``--help``, and runs ``harness eval`` and ``harness train`` through the CLI. A second plugin module
adds a training method and a run metric the same way (one line each).
Run: .venv/bin/python -m pytest tests/test_plugin_env.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from harness.store import Store

PLUGIN = textwrap.dedent('''
    """A throwaway env: say the target number."""
    from dataclasses import dataclass

    from envs.registry import register_env
    from harness.env_spec import EnvFactory
    from harness.options import option
    from harness.types import Observation, Score, Task, Termination, Usage


    @dataclass
    class CountOptions:
        target: int = option(3, flags=("--count-target",), minimum=1)
        """The number the agent must say (a counting-env setting)."""


    class CountEnv:
        def __init__(self, task):
            self.task, self.messages, self.termination = task, [], None
            self.user_usage, self.env_seconds = Usage(), 0.0

        async def reset(self):
            user = {"role": "user", "content": self.task.instruction}
            self.messages = [user]
            return Observation(messages=[user], tools=[], system_prompt="Answer with a number.")

        async def step(self, turn):
            self.messages.append(turn.to_message())
            self.termination = Termination.AGENT_STOP
            return Observation(messages=[], done=True)

        def finish(self, termination):
            self.termination = self.termination or termination

        def score(self):
            said = any(str(self.task.data["target"]) in (m.get("content") or "") for m in self.messages[1:])
            return Score(reward=float(said), success=said)


    @register_env("counting")
    class CountingFactory(EnvFactory):
        Options = CountOptions
        data_version = "count-v1"

        def __init__(self, target: int = 3):
            self.target = target

        def tasks(self, split, task_ids=None):
            data = {"target": self.target,
                    "evaluation_criteria": {"actions": [], "communicate_info": [str(self.target)]}}
            tasks = [Task(env=self.name, id=str(i), split=split, instruction=f"Say {self.target}.", data=data,
                          version=self.data_version) for i in range(4)]
            return [t for t in tasks if not task_ids or t.id in task_ids]

        def create(self, task, seed):
            return CountEnv(task)

        def describe(self):
            return {"target": self.target}
''')


EXTRAS = textwrap.dedent('''
    """A method and a run metric registered from outside the repository."""
    from dataclasses import dataclass

    from harness.results import run_metric
    from trainers.methods import register_method, settings_builder
    from trainers.methods.grpo import GRPOMethod
    from trainers.method_settings import GRPOSettings


    @dataclass(frozen=True)
    class HalfClipSettings(GRPOSettings):
        note: str = "plugin"
        """A setting only this method has."""


    class HalfClip(GRPOMethod):
        description = "GRPO from a plugin module"


    register_method("grpo_plugin")(settings_builder("grpo_plugin", HalfClip, HalfClipSettings(clip_high=0.1)))


    @run_metric("said_seven", formats={"said_seven/share": "{:.0%}"})
    def said_seven(df):
        return {"said_seven/share": float((df["reward"] > 0).mean())}
''')


def _harness(tmp_path, *args):
    env = {**os.environ, "HARNESS_PLUGINS": "counting_env,counting_extras", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def test_a_throwaway_env_registers_with_one_line_and_runs_eval_and_train(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "counting_env.py").write_text(PLUGIN)
    (tmp_path / "plugins" / "counting_extras.py").write_text(EXTRAS)
    db = f"sqlite:///{tmp_path}/p.db"

    help_text = _harness(tmp_path, "eval", "--help").stdout
    assert "--count-target" in help_text and "The number the agent must say" in help_text
    assert "--count-target" in _harness(tmp_path, "train", "--help").stdout

    proc = _harness(tmp_path, "eval", "--env", "counting", "--agent", "oracle", "--count-target", "7", "--run", "c",
                    "--db", db, "--quiet", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    store = Store(db)
    df = store.episodes_df("c")
    assert len(df) == 4 and df["reward"].tolist() == [1.0] * 4  # the oracle says 7, the env wanted 7
    assert store.get_run("c").config["target"] == 7
    shown = _harness(tmp_path, "results", "show", "c", "--db", db)
    assert shown.returncode == 0 and re.search(r"said_seven/share\W+100%", shown.stdout), shown.stdout
    listed = _harness(tmp_path, "methods", "list").stdout
    assert "grpo_plugin" in listed and "GRPO from a plugin module" in listed and "note=plugin" in listed
    # a plugin method that records no official code or sources says so (every built-in one records both)
    plugin_entry = listed[listed.index("grpo_plugin"):]
    assert "official code: not recorded yet" in plugin_entry and "not recorded yet; see the method's" in plugin_entry
    wrong = _harness(tmp_path, "eval", "--env", "counting", "--agent", "oracle", "--user-model", "x", "--db", db)
    assert wrong.returncode == 2 and "env counting takes no setting user_model" in wrong.stderr

    proc = _harness(tmp_path, "train", "--env", "counting", "--policy", "tiny-toy", "--env-arg", "target=2",
                    "--method", "grpo_plugin", "--method-arg", "note=mine",
                    "--steps", "1", "--tasks-per-step", "2", "--group-size", "2", "--eval-every", "0",
                    "--max-new-tokens", "8", "--run", "t", "--db", db, "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = store.get_run("t")
    assert run.status == "finished" and run.env == "counting"
    assert run.config["train"]["env_options"] == {"target": 2}
    assert run.config["train"]["method"] == "grpo_plugin"


def test_plugin_methods_and_metrics_register_without_the_cli(tmp_path):
    """The method and metric registries load HARNESS_PLUGINS themselves (a script that never touches
    envs or the CLI sees them too)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "counting_extras.py").write_text(EXTRAS)
    code = ("import pandas as pd\n"
            "from harness.results import summarize\n"
            "print(summarize(pd.DataFrame({'task_id': ['1'], 'trial': [0], 'reward': [1.0], 'error_class': [None]}))"
            ".get('said_seven/share'))\n"
            "from trainers.methods import make_method\n"
            "print(make_method('grpo_plugin', note='x').settings['note'])\n")
    env = {**os.environ, "HARNESS_PLUGINS": "counting_extras",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1.0", "x"]
    env["HARNESS_PLUGINS"] = "no_such_plugin_module"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "cannot import plugin module 'no_such_plugin_module'" in proc.stderr

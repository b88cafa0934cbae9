"""The ``vllm`` rollout engine in the training process (``harness/policy/vllm_inprocess.py``),
against ``tests/vllm_inprocess/vllm``: a CPU double of the subset of vLLM 0.34's Python API the
engine calls, over the harness's sampler, whose every argument, method and output field is checked
here against the vLLM wheel's source.

- what the engine and the double use of vLLM's ``LLM``, ``EngineArgs``, ``SamplingParams``,
  ``LoRARequest``, outputs and worker exists in vLLM 0.34 with those names;
- multi-turn episodes are token-exact (the trainer's forward recomputes every log-prob to 1e-4);
- after an update, a sleep and a sync (and after a sync while awake) vLLM scores with the new
  weights, full or LoRA; the sleep, wake and reload come in the order that frees the memory;
- ``harness train`` sleeps vLLM before every update, syncs after it, and resumes;
- SGCD's top-K rows equal the hf sampler's; ``harness eval --policy`` plays as hf does;
- without the vllm package, or with a bad ``--rollout-gpu-memory``, one line and exit 2.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_vllm_engine import (  # noqa: E402
    _episodes,
    _harness,
    _max_gap,
    _score,
    _step_metrics,
    _trainer_logprobs,
    check_token_exact_episodes,
    model_under_test,
    raise_likelihood,
)
from test_vllm_protocol import class_fields, source, wheel  # noqa: E402,F401  (wheel: a fixture)
from toy_groups import load_tiny_toy  # noqa: E402

from harness.policy.engine import SampleRequest, SamplingSettings  # noqa: E402
from harness.policy.local_policy import LocalPolicy, PolicyConfig, stop_token_ids  # noqa: E402
from harness.policy.sampler import sample_batch  # noqa: E402
from harness.policy.vllm_engine import request_seed  # noqa: E402
from harness.policy.vllm_inprocess import llm_arguments, sampling_params  # noqa: E402

DOUBLE = Path(__file__).resolve().parent / "vllm_inprocess"


def _forget_vllm() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def double(monkeypatch):
    """``import vllm`` finds the double, in this process, for this test only."""
    monkeypatch.syspath_prepend(str(DOUBLE))
    _forget_vllm()
    import vllm

    assert vllm.__version__.endswith("harness.double"), vllm.__file__
    yield vllm
    _forget_vllm()


def _double_env(log: Path | None = None) -> dict[str, str]:
    """A subprocess environment where ``import vllm`` finds the double (and logs its calls to ``log``)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(DOUBLE), os.environ.get("PYTHONPATH")])))
    if log is not None:
        env["HARNESS_VLLM_DOUBLE_LOG"] = str(log)
    return env


def _policy(path, model, tokenizer, **cfg) -> LocalPolicy:
    settings = dict(path=str(path), temperature=0.7, max_new_tokens=40, batch_wait_s=None, max_batch=1 << 20,
                    rollout_engine="vllm")
    return LocalPolicy(PolicyConfig(**(settings | cfg)), model=model, tokenizer=tokenizer)


# -- what is used of vLLM exists in vLLM 0.34 ---------------------------------------------------------
def _parameters(func: ast.FunctionDef) -> set[str]:
    args = func.args
    return {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} - {"self"}


def _method(archive, members: list[str], cls: str, name: str) -> ast.FunctionDef:
    for member in members:
        for node in ast.walk(source(archive, member)):
            if isinstance(node, ast.ClassDef) and node.name == cls:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == name:
                        return item
    raise AssertionError(f"{cls}.{name} not found in {members}")


LLM_SOURCES = (["vllm/entrypoints/llm.py"], "LLM")
RL_SOURCES = (["vllm/entrypoints/rl/offline.py"], "RLOfflineMixin")  # LLM's weight-version methods


def test_what_the_engine_and_the_double_use_of_vllms_python_api_is_vllms(wheel, double):  # noqa: F811
    """Every ``LLM(...)`` keyword is an ``LLM.__init__`` parameter or an ``EngineArgs`` field, every
    ``SamplingParams``/``LoRARequest`` field is one of vLLM's, every double method is ``LLM``'s
    with parameter names vLLM's has, and every output field the double fills (which is all the
    engine can read) is one vLLM's outputs have."""
    from vllm.lora import request as lora_request

    init = _parameters(_method(wheel, *LLM_SOURCES, "__init__"))
    engine_args = class_fields(source(wheel, "vllm/engine/arg_utils.py"), "EngineArgs")
    used = set(llm_arguments("m", topk=5, lora_rank=8, sleep=True, gpu_memory=0.5))
    assert used <= double.LLM_ARGUMENTS, "the double accepts what the engine passes"
    assert double.LLM_ARGUMENTS <= init | engine_args, double.LLM_ARGUMENTS - init - engine_args
    assert {"enable_sleep_mode", "logprobs_mode", "max_logprobs", "generation_config"} <= engine_args

    settings = SamplingSettings(temperature=0.7, max_new_tokens=8, stop_ids=frozenset({2}), topk=3)
    sampling = class_fields(source(wheel, "vllm/sampling_params.py"), "SamplingParams")
    assert set(sampling_params(settings, 1)) <= double.SAMPLING_FIELDS <= sampling, double.SAMPLING_FIELDS - sampling

    lora = class_fields(source(wheel, "vllm/lora/request.py"), "LoRARequest")
    assert set(lora_request.LoRARequest.__dataclass_fields__) <= lora
    assert "prompt_token_ids" in class_fields(source(wheel, "vllm/inputs/llm.py"), "TokensPrompt")

    for name in ("generate", "sleep", "wake_up", "collective_rpc", "reset_prefix_cache"):
        ours = _parameters(ast.parse(_source_of(getattr(double.LLM, name))).body[0])
        assert ours <= _parameters(_method(wheel, *LLM_SOURCES, name)), name
    for name in ("update_weight_version", "get_weight_version"):
        ours = _parameters(ast.parse(_source_of(getattr(double.LLM, name))).body[0])
        assert ours <= _parameters(_method(wheel, *RL_SOURCES, name)), name
    llm_class = next(n for n in ast.walk(source(wheel, "vllm/entrypoints/llm.py"))
                     if isinstance(n, ast.ClassDef) and n.name == "LLM")
    assert "RLOfflineMixin" in {getattr(b, "id", None) for b in llm_class.bases}
    reload = _method(wheel, ["vllm/v1/worker/gpu_worker.py"], "Worker", "reload_weights")
    assert "weights_path" in _parameters(reload), "collective_rpc('reload_weights', weights_path=...)"
    sleep_doc = ast.get_docstring(_method(wheel, *LLM_SOURCES, "wake_up"))
    assert '"weights", "kv_cache"' in sleep_doc, "the wake_up tags the engine passes"

    outputs = source(wheel, "vllm/outputs.py")
    for cls in ("CompletionOutput", "WeightVersionSpan"):
        assert set(getattr(double, cls).__dataclass_fields__) <= class_fields(outputs, cls), cls
    request_output = _parameters(_method(wheel, ["vllm/outputs.py"], "RequestOutput", "__init__"))
    assert set(double.RequestOutput.__dataclass_fields__) <= request_output
    assert set(double.Logprob.__dataclass_fields__) <= class_fields(source(wheel, "vllm/logprobs.py"), "Logprob")
    exported = ast.literal_eval(next(
        n.value for n in source(wheel, "vllm/__init__.py").body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "MODULE_ATTRS"
        or isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "MODULE_ATTRS" for t in n.targets)))
    assert {"LLM", "SamplingParams", "TokensPrompt"} <= set(exported), "imported as `from vllm import ...`"


def _source_of(func) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(func))


# -- token-exact rollouts --------------------------------------------------------------------------
def test_multi_turn_episodes_in_process_are_token_exact_and_replay_by_seed(tiny_toy_dir, double):
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _policy(tiny_toy_dir, model, tokenizer)

    check_token_exact_episodes(policy, model)
    llm = policy.engine.llm
    assert llm.calls[0][1]["logprobs_mode"] == "processed_logprobs"
    assert llm.calls[0][1]["enable_sleep_mode"] is False, "nothing to sleep for when nothing is trained"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_an_update_a_sleep_and_a_sync_vllm_scores_with_the_new_weights(tiny_toy_dir, double, tmp_path, lora):
    """Step 1 is synced awake (as at a run's start or resume: reload, then the prefix cache is
    reset), step 2 after ``before_update`` (full weights: sleep 2, wake the weights, reload, wake
    the KV cache; LoRA: sleep 1, wake, a new adapter id). The double's weights are NaN after a
    level-2 sleep, so a sync that skipped the reload would sample garbage."""
    model, tokenizer = model_under_test(tiny_toy_dir, lora)
    policy = _policy(tiny_toy_dir, model, tokenizer, trained=True)
    engine, sync_dir = policy.engine, tmp_path / "weight-sync"
    llm = engine.llm
    prompt = tokenizer.encode('What is the code for "apple"?')
    with pytest.raises(RuntimeError, match="sync_weights comes before"):
        _score(engine, prompt, seed=5)
    engine.sync_weights(model, 0, sync_dir)
    trace, _ = _score(engine, prompt, seed=5)
    assert _max_gap([trace], _trainer_logprobs(model, [trace], 1.0)) <= 1e-4
    for step, asleep in ((1, False), (2, True)):
        old = copy.deepcopy(model)
        raise_likelihood(model, trace, len(prompt))
        if asleep:
            engine.before_update()
            assert engine.asleep == (1 if lora else 2)
        del llm.calls[:]
        engine.sync_weights(model, step, sync_dir)
        names = [call for call, _ in llm.calls]
        if lora:
            assert names == (["wake_up", "update_weight_version"] if asleep else ["update_weight_version"]), names
        elif asleep:
            assert names == ["wake_up", "collective_rpc", "wake_up", "update_weight_version"], names
            assert [details["tags"] for call, details in llm.calls if call == "wake_up"] == [["weights"], ["kv_cache"]]
        else:
            assert names == ["collective_rpc", "reset_prefix_cache", "update_weight_version"], names
        assert sorted(p.name for p in sync_dir.iterdir()) == [f"step-{step:06d}"], "only the latest sync is kept"
        trace, _ = _score(engine, prompt, seed=5)
        assert _max_gap([trace], _trainer_logprobs(model, [trace], 1.0)) <= 1e-4, f"step {step}: the new weights"
        assert _max_gap([trace], _trainer_logprobs(old, [trace], 1.0)) > 1e-3, f"step {step}: not the old ones"
    engine.close()


def test_train_in_process_sleeps_before_every_update_and_resumes(tiny_toy_dir, tmp_path):
    """`harness train --rollout-engine vllm` with no servers: vLLM in the training process. Every
    step's rollouts come from the synced weights (|log pi_old - log mu| <= 1e-4 at both steps, the
    first after a warm start that moved them, the second in a resumed process whose vLLM started
    from the policy's files), and vLLM sleeps between each step's rollouts and its update."""
    db, log = tmp_path / "runs.db", tmp_path / "double.jsonl"

    def train(*more: str):
        return _harness("train", "--env", "toy", "--policy", str(tiny_toy_dir), "--rollout-engine", "vllm",
                        "--rollout-gpu-memory", "0.3", "--steps", "2", "--tasks-per-step", "2", "--group-size", "2",
                        "--max-new-tokens", "16", "--lr", "5e-3", "--eval-every", "0", "--warm-start", "3",
                        "--warm-start-lr", "1e-2", "--run", "ip", "--db", f"sqlite:///{db}",
                        "--out-dir", str(tmp_path / "ip"), *more, env=_double_env(log))

    first = train("--stop-after", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _step_metrics(db, "ip")
    for step in (1, 2):
        assert metrics[step]["episodes/infra_errors"] == 0
        assert metrics[step]["tis/abs_diff_max"] <= 1e-4, f"step {step}: {metrics[step]['tis/abs_diff_max']}"
        assert metrics[step]["time/weight_sync"] > 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    starts = [c for c in calls if c["call"] == "LLM"]
    assert len(starts) == 2 and all(c["enable_sleep_mode"] and c["gpu_memory_utilization"] == 0.3 for c in starts)
    # each process: sync (awake) -> [rollouts -> sleep(2) -> wake weights, reload, wake KV cache, version]
    sequence = [c["call"] + (f":{c['level']}" if c["call"] == "sleep" else "") for c in calls
                if c["call"] in ("LLM", "generate", "sleep", "collective_rpc")]
    for process in "".join(f"|{s}" if s == "LLM" else f",{s}" for s in sequence).split("|")[1:]:
        steps = process.split(",")[1:]
        assert steps[0] == "collective_rpc", "the run's weights before any rollout"
        rest = ",".join(steps[1:])
        assert rest.startswith("generate") and rest.endswith("sleep:2,collective_rpc"), rest
        assert rest.count("sleep:2,collective_rpc") == 1 and "generate,collective_rpc" not in rest
    with __import__("sqlite3").connect(db) as conn:
        (rollout,) = conn.execute("select json_extract(config, '$.rollout') from runs where name = 'ip'").fetchone()
    assert json.loads(rollout) == {"engine": "vllm", "tis_cap": 2.0}



def test_train_suite_arms_each_get_their_own_in_process_vllm(tiny_toy_dir, tmp_path):
    """`harness train-suite --rollout-engine vllm` with no servers: each arm, one after another in
    one process, makes its own LLM with the suite's memory share, and trains from synced weights."""
    db, log = tmp_path / "suite.db", tmp_path / "double.jsonl"
    proc = _harness("train-suite", "--methods", "grpo,rloo", "--policy", str(tiny_toy_dir), "--rollout-engine", "vllm",
                    "--rollout-gpu-memory", "0.4", "--steps", "1", "--tasks-per-step", "2", "--group-size", "2",
                    "--eval-every", "0", "--warm-start", "2", "--max-new-tokens", "8", "--lr", "5e-3", "--prefix", "is",
                    "--db", f"sqlite:///{db}", "--out-dir", str(tmp_path / "suite"), env=_double_env(log))
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = [c for c in map(json.loads, log.read_text().splitlines()) if c["call"] == "LLM"]
    assert [c["gpu_memory_utilization"] for c in starts] == [0.4, 0.4]
    for run in ("is-grpo", "is-rloo"):
        step = _step_metrics(db, run)[1]
        assert step["tis/abs_diff_max"] <= 1e-4 and step["time/weight_sync"] > 0, (run, step)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sample_asked_for_while_vllm_sleeps_wakes_it_with_the_synced_weights(tiny_toy_dir, double, tmp_path,
                                                                               lora):
    """Between ``before_update`` and the next sync the engine still samples, from the weights last
    synced (the double refuses to generate while asleep, and has NaN weights after a level-2 sleep)."""
    model, tokenizer = model_under_test(tiny_toy_dir, lora)
    engine = _policy(tiny_toy_dir, model, tokenizer, trained=True).engine
    engine.sync_weights(model, 0, tmp_path / "weight-sync")
    prompt = tokenizer.encode('What is the code for "apple"?')
    engine.before_update()
    assert engine.asleep
    trace, _ = _score(engine, prompt, seed=5)
    assert not engine.asleep
    assert _max_gap([trace], _trainer_logprobs(model, [trace], 1.0)) <= 1e-4


def test_a_sample_of_other_weights_is_an_error_not_a_sample(tiny_toy_dir, double, tmp_path):
    """vLLM relabelled behind the engine's back: its samples name other weights than the synced
    step's, and each comes back as an infra error in place of its ``Sample``."""
    from harness.errors import InfraError

    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    engine = _policy(tiny_toy_dir, model, tokenizer, trained=True).engine
    engine.sync_weights(model, 0, tmp_path / "weight-sync")
    prompt = tokenizer.encode("Hello")
    _score(engine, prompt, seed=1)  # step 0's weights: a Sample
    engine.llm.update_weight_version("other")
    settings = SamplingSettings(temperature=1.0, max_new_tokens=4, stop_ids=frozenset(), topk=0)
    (result,) = engine.sample([SampleRequest(prompt, engine.episode_rng(2))], settings)
    assert isinstance(result, InfraError) and "['other']" in str(result), result


TOPK = 5


def test_sgcd_topk_rows_in_process_equal_the_hf_samplers(tiny_toy_dir, double):
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _policy(tiny_toy_dir, model, tokenizer, record_topk=TOPK)
    engine, stops = policy.engine, frozenset(stop_token_ids(tokenizer, model))
    settings = SamplingSettings(temperature=0.7, max_new_tokens=12, stop_ids=stops, topk=TOPK)
    prompts = [tokenizer.encode('What is the code for "apple"?'), tokenizer.encode("Hello")]
    samples = engine.sample([SampleRequest(p, engine.episode_rng(seed)) for seed, p in enumerate(prompts)], settings)
    for seed, (prompt, sample) in enumerate(zip(prompts, samples)):
        want = sample_batch(model, [prompt], [torch.Generator().manual_seed(request_seed(seed, 0))],
                            max_new_tokens=12, temperature=0.7, stop_ids=set(stops), pad_id=tokenizer.pad_token_id,
                            topk=TOPK)[0]
        assert sample.ids == want.ids and sample.ended == want.ended
        assert torch.equal(sample.topk_ids, want.topk_ids)
        assert torch.allclose(sample.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)


def test_eval_policy_in_process_plays_as_hf_does(tiny_toy_dir, tmp_path):
    db = tmp_path / "runs.db"
    common = ("eval", "--env", "toy", "--tasks", "0,1,2", "--max-new-tokens", "24", "--db", f"sqlite:///{db}",
              "--policy", str(tiny_toy_dir))
    hf = _harness(*common, "--run", "hf")
    assert hf.returncode == 0, hf.stderr[-2000:]
    vllm = _harness(*common, "--rollout-engine", "vllm", "--run", "vllm", env=_double_env())
    assert vllm.returncode == 0, vllm.stderr[-2000:]
    played = _episodes(db, "vllm")
    assert len(played) == 3 and all(row[2] == "none" for row in played), played
    assert [row[:2] for row in played] == [row[:2] for row in _episodes(db, "hf")]


@pytest.mark.parametrize("args, says", [
    (("--rollout-engine", "vllm"), "the vllm package is not installed: pip install -e .[vllm]"),
    (("--rollout-engine", "vllm", "--rollout-gpu-memory", "1.5"), "in (0, 1]"),
    (("--rollout-engine", "vllm", "--rollout-url", "http://127.0.0.1:9", "--rollout-gpu-memory", "0.5"),
     "a --rollout-url server was started with its own"),
    (("--rollout-gpu-memory", "0.5"), "are for --rollout-engine vllm"),
])
def test_in_process_flags_are_checked_in_one_line(tmp_path, args, says):
    db = tmp_path / "runs.db"
    env = dict(os.environ)  # no double on the path: `import vllm` fails, as on a machine without it
    for command in (("train", "--env", "toy", "--policy", "tiny-toy", "--steps", "1"),
                    ("eval", "--env", "toy", "--policy", "tiny-toy")):
        proc = _harness(*command, *args, "--run", "r", "--db", f"sqlite:///{db}", env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr
        assert not db.exists(), "refused before the database (and a run row) was made"


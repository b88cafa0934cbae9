"""The ``vllm`` rollout engine against ``harness serve-policy``, the CPU double of vLLM's server,
over real HTTP on 127.0.0.1 (``vllm_double``): the client, the replica pool, the weight sync and
the CLI flags, as issue 19's acceptance lists them.

- token-exact multi-turn traces: the trainer's own forward pass recomputes every sampled log-prob
  to 1e-4 (ratio 1 before any update), and an episode's seeds make it replay identically;
- after an update and a sync the server scores with the new weights;
- a killed managed replica is restarted (with the current weights) and its episodes are played
  again with the same seeds;
- ``harness train --resume`` syncs the checkpoint's weights before its first rollout;
- SGCD's top-K rows come through as the hf sampler computes them;
- flags that do not go together are refused in one line.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

import vllm_double  # noqa: E402
from test_rollout_engine import _conversation  # noqa: E402
from test_vllm_protocol import check_completion_request, wheel  # noqa: E402,F401  (wheel: a fixture)
from toy_groups import load_tiny_toy  # noqa: E402

from envs.registry import make_env_factory  # noqa: E402
from harness.errors import RunFailed  # noqa: E402
from harness.policy.engine import SampleRequest, SamplingSettings  # noqa: E402
from harness.policy.local_policy import LocalPolicy, PolicyConfig, stop_token_ids  # noqa: E402
from harness.policy.sampler import sample_batch  # noqa: E402
from harness.policy.serve_policy import COMPLETION_REQUEST_FIELDS  # noqa: E402
from harness.policy.trace import TokenTrace  # noqa: E402
from harness.policy.vllm_engine import StaleWeights, completion_request, request_seed  # noqa: E402
from harness.policy.vllm_replicas import SERVER_COMMAND_ENV, RolloutServersGone  # noqa: E402
from harness.types import ErrorClass  # noqa: E402
from trainers.packing import pack  # noqa: E402
from trainers.rollout import collect_groups  # noqa: E402
from trainers.update import reference_logprobs  # noqa: E402

start_double = vllm_double.fixture(scope="module")

# The double in the place of `vllm serve` for managed replicas (what the variable is for).
DOUBLE_COMMAND = (f"{sys.executable} -m harness.cli serve-policy --policy {{model}} --port {{port}} "
                  "--max-logprobs {max_logprobs}")


def test_the_engine_sends_exactly_the_fields_vllm_and_the_double_know(wheel):  # noqa: F811
    """The request builder's fields are the double's (which refuses any other) and vLLM 0.34's own
    (read from the wheel by test_vllm_protocol; skipped there without it)."""
    settings = SamplingSettings(temperature=1.0, max_new_tokens=8, stop_ids=frozenset({2}), topk=3)
    fields = completion_request("m", [1, 2, 3], request_seed(0, 0), settings).keys()
    assert set(fields) == set(COMPLETION_REQUEST_FIELDS)
    check_completion_request(wheel, fields)


def _vllm_policy(path, model, tokenizer, **cfg) -> LocalPolicy:
    settings = dict(path=str(path), temperature=0.7, max_new_tokens=40, batch_wait_s=None, max_batch=1 << 20,
                    rollout_engine="vllm")
    return LocalPolicy(PolicyConfig(**(settings | cfg)), model=model, tokenizer=tokenizer)


def _trainer_logprobs(model, traces, temperature: float) -> list[list[float]]:
    """The log-probs the trainer computes for each trace's sampled tokens: its own forward pass
    on packed rows (``reference_logprobs``, what the update's pi_old is)."""
    packed = pack(traces, None, 4096, ids=list(range(len(traces))))
    out: list[list[float]] = [[] for _ in traces]
    for mb, logp in zip(packed.micro_batches, reference_logprobs(model, packed, temperature)):
        keep = mb.loss_mask[0] > 0
        for seq, value in zip(mb.seq_index[0][keep].tolist(), logp[0][keep].tolist()):
            out[seq].append(value)
    return out


def _max_gap(traces, recomputed) -> float:
    sampled = [t.logprobs[p] for t in traces for p in t.sampled_positions]
    flat = [x for row in recomputed for x in row]
    assert len(flat) == len(sampled)
    return max(abs(a - b) for a, b in zip(sampled, flat))


def test_multi_turn_episodes_through_vllm_are_token_exact_and_replay_by_seed(tiny_toy_dir, start_double):
    double = start_double(tiny_toy_dir)
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _vllm_policy(tiny_toy_dir, model, tokenizer, rollout_urls=[double.url])
    try:
        check_token_exact_episodes(policy, model)
    finally:
        policy.engine.close()


def check_token_exact_episodes(policy: LocalPolicy, model) -> None:
    """Four 3-turn episodes sampled at temperature 0.7 through ``policy``'s engine: the trainer's
    forward pass recomputes every log-prob to 1e-4, and the seeds replay them."""
    def episodes(seeds):
        async def main():
            return await asyncio.gather(*(_conversation(policy, seed, turns=3) for seed in seeds))

        return asyncio.run(main())

    traces = episodes([0, 1, 2, 3])
    assert all(len(t.turns) == 3 for t in traces)
    ended = [t.input_ids[end - 1] in policy.stop_ids for t in traces for _, end in t.turns]
    assert any(ended) and not all(ended), "replies that end on a stop id and replies cut by the limit"
    # pi_old, as the trainer computes it, equals what the engine sampled with: ratio 1
    gap = _max_gap(traces, _trainer_logprobs(model, traces, 0.7))
    assert gap <= 1e-4, f"trace log-probs differ from the trainer's by {gap}"
    again = episodes([0, 1, 2, 3])
    assert [t.input_ids for t in again] == [t.input_ids for t in traces], "an episode's seed replays it"
    # (log-probs only to the last bits: a batch's padding changes the logits' rounding, on vLLM too)
    assert max(abs(a - b) for t, u in zip(again, traces) for a, b in zip(t.logprobs, u.logprobs)) <= 1e-5
    other = episodes([10, 11, 12, 13])
    assert [t.input_ids for t in other] != [t.input_ids for t in traces], "other seeds, other episodes"


def model_under_test(tiny_toy_dir, lora: bool):
    """The tiny policy to train, its LoRA adapters (rank 4, all linear layers) or its full weights."""
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model, tokenizer


def raise_likelihood(model, trace: TokenTrace, prompt_len: int) -> None:
    """One optimizer step that raises the sampled reply's likelihood: the weights move."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = model(torch.tensor([trace.input_ids])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(trace.input_ids[1:])
    (-logits[torch.arange(len(targets)), targets][prompt_len - 1:].sum()).backward()
    optimizer.step()


def _score(engine, prompt: list[int], seed: int) -> tuple[TokenTrace, list[float]]:
    """Sample a reply to ``prompt`` (a fixed seed) and return it as a trace, with the server's log-probs."""
    settings = SamplingSettings(temperature=1.0, max_new_tokens=8, stop_ids=frozenset(), topk=0)
    sample = engine.sample([SampleRequest(prompt, engine.episode_rng(seed))], settings)[0]
    assert not isinstance(sample, BaseException), f"the request failed: {sample}"
    trace = TokenTrace()
    trace.add_prompt(prompt)
    trace.add_response(sample.ids, sample.logprobs)
    return trace, sample.logprobs


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_an_update_and_a_sync_the_server_scores_with_the_new_weights(tiny_toy_dir, start_double, tmp_path,
                                                                          lora):
    """Full weights go by ``reload_weights`` from the sync directory; a LoRA adapter by
    ``load_lora_adapter``, and requests then name it."""
    double = start_double(tiny_toy_dir)
    model, tokenizer = model_under_test(tiny_toy_dir, lora)
    policy = _vllm_policy(tiny_toy_dir, model, tokenizer, rollout_urls=[double.url], trained=True)
    engine, sync_dir = policy.engine, tmp_path / "weight-sync"
    prompt = tokenizer.encode('What is the code for "apple"?')
    try:
        engine.sync_weights(model, 0, sync_dir)
        before, served = _score(engine, prompt, seed=5)
        assert _max_gap([before], _trainer_logprobs(model, [before], 1.0)) <= 1e-4
        old = copy.deepcopy(model)
        raise_likelihood(model, before, len(prompt))
        engine.sync_weights(model, 1, sync_dir)
        assert httpx.get(f"{double.url}/weight_info").json() == {"weight_version": "1"}
        assert sorted(p.name for p in sync_dir.iterdir()) == ["step-000001"], "only the latest sync is kept"
        assert (sync_dir / "step-000001" / ("adapter_config.json" if lora else "config.json")).exists()
        after, _ = _score(engine, prompt, seed=5)
        assert _max_gap([after], _trainer_logprobs(model, [after], 1.0)) <= 1e-4, "the server has the new weights"
        assert _max_gap([after], _trainer_logprobs(old, [after], 1.0)) > 1e-3, "and they are not the old ones"
    finally:
        engine.close()


def test_a_sample_of_weights_another_process_synced_stops_the_run(tiny_toy_dir, start_double, tmp_path):
    """A server relabelled behind the trainer's back (another run syncing it) samples with weights
    other than step 0's: the sample is an error in place of its ``Sample``, never trained on, and
    the engine's ``failure`` stops the run after the episodes in flight."""
    double = start_double(tiny_toy_dir)
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _vllm_policy(tiny_toy_dir, model, tokenizer, rollout_urls=[double.url], trained=True)
    engine = policy.engine
    prompt = tokenizer.encode("Hello")
    settings = SamplingSettings(temperature=1.0, max_new_tokens=4, stop_ids=frozenset(), topk=0)
    try:
        engine.sync_weights(model, 0, tmp_path / "weight-sync")
        _score(engine, prompt, seed=1)  # step 0's weights: a Sample
        assert engine.failure is None
        assert httpx.post(f"{double.url}/update_weight_version", json={"new_version": "other"}).status_code == 200
        (result,) = engine.sample([SampleRequest(prompt, engine.episode_rng(2))], settings)
        assert isinstance(result, StaleWeights) and "['other']" in str(result), result
        assert isinstance(engine.failure, RunFailed)
    finally:
        engine.close()


def test_evaluating_a_lora_checkpoint_loads_its_adapter_on_the_base_models_server(tiny_toy_dir, start_double,
                                                                                  tmp_path):
    """`harness eval --policy <a --lora-rank checkpoint> --rollout-engine vllm`: the server serves
    the adapter's base model by name, the engine loads the adapter before any request, and the
    harness process loads no weights."""
    peft = pytest.importorskip("peft")
    double = start_double(tiny_toy_dir)
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    checkpoint = tmp_path / "step-000001"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    policy = LocalPolicy(PolicyConfig(path=str(checkpoint), temperature=1.0, max_new_tokens=8, batch_wait_s=None,
                                      rollout_engine="vllm", rollout_urls=[double.url]))
    try:
        assert policy.describe()["device"] == "vllm servers", "no weights in the harness process"
        trace, _ = _score(policy.engine, tokenizer.encode('What is the code for "apple"?'), seed=3)
    finally:
        policy.engine.close()
    model.eval()
    assert _max_gap([trace], _trainer_logprobs(model, [trace], 1.0)) <= 1e-4, "sampled with the adapter"
    with model.disable_adapter():
        assert _max_gap([trace], _trainer_logprobs(model, [trace], 1.0)) > 1e-3, "not with the base model alone"


def test_a_killed_managed_replica_is_restarted_and_its_episodes_played_again(tiny_toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(SERVER_COMMAND_ENV, DOUBLE_COMMAND)
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _vllm_policy(tiny_toy_dir, model, tokenizer, temperature=1.0, max_new_tokens=16, rollout_replicas=2,
                          trained=True, rollout_log_dir=str(tmp_path / "logs"))
    engine = policy.engine
    factory = make_env_factory("toy")
    tasks = factory.tasks("train", None)[:2]
    try:
        engine.sync_weights(model, 1, tmp_path / "weight-sync")
        replicas = engine.pool.replicas
        assert len(replicas) == 2 and all(r.process.poll() is None for r in replicas)
        reference = collect_groups(policy, factory, tasks, 2, step=1, seed=0)
        victim = replicas[0].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        groups = collect_groups(policy, factory, tasks, 2, step=1, seed=0)
        episodes = [e for g in groups for e in g.episodes]
        assert len(episodes) == 4 and all(e.error_class is ErrorClass.NONE for e in episodes), \
            [e.error for e in episodes]
        # played again with the same seeds on the same weights: the same episodes
        assert [e.trace.input_ids for e in episodes] == [e.trace.input_ids for g in reference for e in g.episodes]
        restarted = replicas[0]
        assert restarted.alive and restarted.process is not victim and restarted.process.poll() is None
        assert httpx.get(f"{restarted.url}/weight_info").json() == {"weight_version": "1"}, "synced before use"
    finally:
        engine.close()
    assert all(r.process is None for r in engine.pool.replicas)
    assert victim.poll() is not None


def test_a_given_server_that_dies_is_dropped_and_the_last_one_failing_stops_the_run(tiny_toy_dir, start_double,
                                                                                     tmp_path, capfd):
    doubles = [start_double(tiny_toy_dir), start_double(tiny_toy_dir)]
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _vllm_policy(tiny_toy_dir, model, tokenizer, temperature=1.0, max_new_tokens=16, trained=True,
                          rollout_urls=[d.url for d in doubles])
    factory = make_env_factory("toy")
    tasks = factory.tasks("train", None)[:2]
    try:
        policy.engine.sync_weights(model, 1, tmp_path / "weight-sync")
        doubles[0].kill()
        groups = collect_groups(policy, factory, tasks, 2, step=1, seed=0)
        assert all(e.error_class is ErrorClass.NONE for g in groups for e in g.episodes), "played on the other"
        assert [r.url for r in policy.engine.pool.live()] == [doubles[1].url]
        assert f"warning: rollout server {doubles[0].url} stopped answering" in capfd.readouterr().err
        doubles[1].kill()
        with pytest.raises(RolloutServersGone, match="no rollout server is left"):
            collect_groups(policy, factory, tasks, 2, step=2, seed=0)
    finally:
        policy.engine.close()


def _harness(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=900)


def _step_metrics(db, run: str) -> dict[int, dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select t.step, t.metrics from train_steps t join runs r on r.id = t.run_id "
                            "where r.name = ?", (run,)).fetchall()
    return {step: json.loads(metrics) for step, metrics in rows}


def test_train_through_vllm_resumes_with_the_checkpoint_weights_synced_first(tiny_toy_dir, start_double, tmp_path):
    """`harness train --rollout-engine vllm --rollout-url`, stopped after step 1 and resumed. The
    warm start moves the weights away from what the server loaded, so the first rollouts are
    token-exact (ratio 1) only if the run synced its weights first; the server is restarted
    between the two invocations (it then serves the original model, version "default"), so the
    resumed run must sync its checkpoint's weights before its rollouts."""
    double = start_double(tiny_toy_dir)
    db = tmp_path / "runs.db"

    def train(*more: str) -> subprocess.CompletedProcess:
        return _harness("train", "--env", "toy", "--policy", str(tiny_toy_dir), "--rollout-engine", "vllm",
                        "--rollout-url", double.url, "--steps", "2", "--tasks-per-step", "2", "--group-size", "2",
                        "--max-new-tokens", "16", "--lr", "5e-3", "--eval-every", "0", "--warm-start", "3",
                        "--warm-start-lr", "1e-2", "--run", "v", "--db", f"sqlite:///{db}",
                        "--out-dir", str(tmp_path / "v"), *more)

    first = train("--stop-after", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert httpx.get(f"{double.url}/weight_info").json() == {"weight_version": "1"}
    double.stop()
    double.start()  # a fresh server (on another port): the original weights
    resumed = train("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert httpx.get(f"{double.url}/weight_info").json() == {"weight_version": "2"}
    metrics = _step_metrics(db, "v")
    for step in (1, 2):
        assert metrics[step]["episodes/infra_errors"] == 0
        # With vllm the off-policy correction is on by default: the trainer recomputes pi_old, so the
        # ratio is 1 whatever the server sampled with, and a stale server shows as |log pi_old - log mu|.
        assert metrics[step]["tis/abs_diff_max"] <= 1e-4, f"step {step}: {metrics[step]['tis/abs_diff_max']}"
        assert metrics[step]["tis/capped_frac"] == 0
        assert abs(metrics[step]["ratio/max"] - 1) <= 1e-4, f"step {step}: ratio {metrics[step]['ratio/max']}"
        assert metrics[step]["time/weight_sync"] > 0
    assert [p.name for p in (tmp_path / "v" / "weight-sync").iterdir()] == ["step-000002"]


def test_train_suite_trains_every_method_through_vllm(tiny_toy_dir, start_double, tmp_path):
    """`harness train-suite` passes the engine settings to each arm: both arms' rollouts come from
    the server (every arm syncs its own start weights first, so the second arm's are token-exact
    after the first arm trained the server's copy), with the off-policy correction on, as `train`."""
    double = start_double(tiny_toy_dir)
    db = tmp_path / "suite.db"
    proc = _harness("train-suite", "--methods", "grpo,rloo", "--policy", str(tiny_toy_dir), "--rollout-engine", "vllm",
                    "--rollout-url", double.url, "--steps", "1", "--tasks-per-step", "2", "--group-size", "2",
                    "--eval-every", "0", "--warm-start", "2", "--max-new-tokens", "8", "--lr", "5e-3", "--prefix", "vs",
                    "--db", f"sqlite:///{db}", "--out-dir", str(tmp_path / "suite"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(db) as conn:
        engines = dict(conn.execute("select name, json_extract(config, '$.rollout.engine') from runs "
                                    "where kind = 'train'").fetchall())
    assert engines == {"vs-grpo": "vllm", "vs-rloo": "vllm"}
    for run in engines:
        step = _step_metrics(db, run)[1]
        assert step["tis/abs_diff_max"] <= 1e-4 and step["time/weight_sync"] > 0, (run, step)


TOPK = 5


def test_sgcd_topk_rows_through_vllm_equal_the_hf_samplers(tiny_toy_dir, start_double):
    """The [n, K] top-K ids and log-probs SGCD reads, for the same served model and the request's
    seed, equal what the hf sampler computes (ids exactly, log-probs to 1e-5), in its order."""
    double = start_double(tiny_toy_dir)
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    policy = _vllm_policy(tiny_toy_dir, model, tokenizer, rollout_urls=[double.url], record_topk=TOPK)
    engine, stops = policy.engine, frozenset(stop_token_ids(tokenizer, model))
    settings = SamplingSettings(temperature=0.7, max_new_tokens=12, stop_ids=stops, topk=TOPK)
    prompts = [tokenizer.encode('What is the code for "apple"?'), tokenizer.encode("Hello")]
    try:
        samples = engine.sample([SampleRequest(p, engine.episode_rng(seed)) for seed, p in enumerate(prompts)],
                                settings)
    finally:
        engine.close()
    for seed, (prompt, sample) in enumerate(zip(prompts, samples)):
        want = sample_batch(model, [prompt], [torch.Generator().manual_seed(request_seed(seed, 0))],
                            max_new_tokens=12, temperature=0.7, stop_ids=set(stops), pad_id=tokenizer.pad_token_id,
                            topk=TOPK)[0]
        assert sample.ids == want.ids and sample.ended == want.ended
        assert sample.topk_ids.shape == (len(want.ids), TOPK) and sample.topk_ids.dtype == want.topk_ids.dtype
        assert torch.equal(sample.topk_ids, want.topk_ids)
        assert torch.allclose(sample.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
        assert max(abs(a - b) for a, b in zip(sample.logprobs, want.logprobs)) <= 1e-5


@pytest.mark.parametrize("args, says", [
    (("--rollout-engine", "vllm", "--rollout-url", "http://127.0.0.1:9", "--rollout-replicas", "2"), "not both"),
    (("--rollout-url", "http://127.0.0.1:9"), "are for --rollout-engine vllm"),
    (("--rollout-engine", "vllm", "--rollout-gpus", "0,1,2", "--rollout-replicas", "2"), "cannot be shared by 2"),
    (("--rollout-engine", "vllm", "--rollout-gpus", "0"), "pip install -e .[vllm]"),
])
def test_rollout_server_flags_that_do_not_go_together_are_refused_in_one_line(tmp_path, args, says):
    env = {k: v for k, v in os.environ.items() if k != SERVER_COMMAND_ENV}
    db = tmp_path / "runs.db"
    commands = [("train", "--env", "toy", "--policy", "tiny-toy", "--steps", "1")]
    if args[-1] == "0":  # harness eval --policy checks the same way (one case suffices)
        commands.append(("eval", "--env", "toy", "--policy", "tiny-toy"))
    for command in commands:
        proc = _harness(*command, *args, "--run", "r", "--db", f"sqlite:///{db}", env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr
        assert not db.exists(), "refused before the database (and a run row) was made"


def test_a_server_that_returns_untempered_logprobs_is_refused(tiny_toy_dir, start_double, tmp_path):
    double = start_double(tiny_toy_dir, "--logprobs-mode", "raw_logprobs")
    proc = _harness("eval", "--env", "toy", "--policy", str(tiny_toy_dir), "--rollout-engine", "vllm",
                    "--rollout-url", double.url, "--db", f"sqlite:///{tmp_path / 'runs.db'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "--logprobs-mode processed_logprobs" in lines[-1], proc.stderr


def _serve_policy_processes(marker: str) -> list[int]:
    """Pids of running `harness serve-policy` processes whose command line holds ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        if "serve-policy" in argv and marker in argv:
            pids.append(int(entry))
    return pids


def _episodes(db, run: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select e.task_id, e.messages, e.error_class from episodes e join runs r on "
                            "r.id = e.run_id where r.name = ? order by e.task_id", (run,)).fetchall()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the started servers through /proc")
def test_eval_policy_through_managed_replicas_plays_as_hf_does_and_stops_them(tiny_toy_dir, tmp_path):
    """`harness eval --policy --rollout-engine vllm --rollout-replicas 2`: the harness starts two
    servers (the double, through HARNESS_ROLLOUT_SERVER_COMMAND), plays greedy episodes that are
    the hf engine's, and stops the servers when it exits."""
    marker = str(tmp_path / "policy")  # a link to the policy: tells this test's servers from other doubles
    os.symlink(tiny_toy_dir, marker)
    env = dict(os.environ, **{SERVER_COMMAND_ENV: DOUBLE_COMMAND})
    db = tmp_path / "runs.db"
    common = ("eval", "--env", "toy", "--tasks", "0,1,2", "--max-new-tokens", "24", "--db", f"sqlite:///{db}")
    hf = _harness(*common, "--policy", str(tiny_toy_dir), "--run", "hf")
    assert hf.returncode == 0, hf.stderr[-2000:]
    vllm = _harness(*common, "--policy", marker, "--rollout-engine", "vllm", "--rollout-replicas", "2",
                    "--run", "vllm", env=env)
    assert vllm.returncode == 0, vllm.stderr[-2000:]
    played = _episodes(db, "vllm")
    assert len(played) == 3 and all(row[2] == "none" for row in played), played
    assert [row[:2] for row in played] == [row[:2] for row in _episodes(db, "hf")]
    assert _serve_policy_processes(marker) == [], "the started servers are stopped"


def _logged(db, run: str, step: int) -> bool:
    try:
        return db.exists() and step in _step_metrics(db, run)
    except sqlite3.OperationalError:  # the tables are being created
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the started servers through /proc")
def test_sigterm_stops_a_training_run_and_the_servers_it_started(tiny_toy_dir, tmp_path):
    marker = str(tmp_path / "policy")  # a link to the policy: tells this test's servers from other doubles
    os.symlink(tiny_toy_dir, marker)
    db = tmp_path / "runs.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", "--env", "toy", "--policy", marker, "--rollout-engine", "vllm",
         "--rollout-replicas", "1", "--steps", "50", "--tasks-per-step", "2", "--group-size", "2",
         "--max-new-tokens", "16", "--eval-every", "0", "--run", "t", "--db", f"sqlite:///{db}",
         "--out-dir", str(tmp_path / "t")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **{SERVER_COMMAND_ENV:
                                                                                          DOUBLE_COMMAND}))
    try:
        deadline = time.monotonic() + 300
        while not _logged(db, "t", 1):  # step 1 done: the run is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.5)
        assert _serve_policy_processes(marker), "a server was started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted: run t stopped by SIGTERM" in err
    assert _serve_policy_processes(marker) == [], "the started servers are stopped"

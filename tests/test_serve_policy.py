"""`harness serve-policy`, the vLLM test double, over real HTTP: a subprocess started as a user
starts it (tests/vllm_double.py) and the real httpx client.

What must hold for the vllm engine's CPU tests to mean anything: a completion is exactly what
``sampler.sample_batch`` gives for the same prompt, seed, temperature and stop ids on the same
weights (ids equal, log-probs of the tempered distribution to 1e-6, top-K as vLLM lays it out);
a weight reload, a LoRA adapter and a pause act as vLLM's do; and what vLLM refuses it refuses, in
vLLM's error shape.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

import vllm_double  # noqa: E402
from toy_groups import load_tiny_toy  # noqa: E402

from harness.policy.local_policy import stop_token_ids  # noqa: E402
from harness.policy.sampler import sample_batch  # noqa: E402

NAME, MAX_LOGPROBS, K = "tiny", 8, 5
start_double = vllm_double.fixture(scope="module")


@pytest.fixture(scope="module")
def local(tiny_toy_dir):
    """The same weights as the double serves, loaded in this process."""
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    return model, tokenizer, stop_token_ids(tokenizer, model)


@pytest.fixture(scope="module")
def double(start_double, tiny_toy_dir):
    return start_double(tiny_toy_dir, "--served-model-name", NAME, "--max-logprobs", str(MAX_LOGPROBS))


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def complete(url: str, prompt: list[int], **fields) -> dict:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0.7, "add_special_tokens": False,
            "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": False,
            "return_weight_versions": True, "top_p": 1, "top_k": 0, "min_p": 0, "repetition_penalty": 1} | fields
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def expected(model, prompt, seed, *, stops, temperature=0.7, max_tokens=12, k=0):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return sample_batch(model, [prompt], [generator], max_new_tokens=max_tokens, temperature=temperature,
                        stop_ids=set(stops), pad_id=0, topk=k)[0]  # one row: nothing is ever padded


def assert_same(choice: dict, sample, *, k: int | None = None, tol: float = 1e-6) -> None:
    assert choice["token_ids"] == sample.ids
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(sample.ids)
    assert max(abs(a - b) for a, b in zip(got, sample.logprobs)) <= tol
    assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in sample.ids]
    assert choice["finish_reason"] == ("stop" if sample.ended else "length")
    if k:
        for pos, row in enumerate(choice["logprobs"]["top_logprobs"]):
            # vLLM's layout: the sampled token first, then the top K in rank order (a dict, so K
            # entries when the sampled token is among them, else K + 1)
            want = {f"token_id:{sample.ids[pos]}": sample.logprobs[pos]}
            for top_id, top_lp in zip(sample.topk_ids[pos].tolist(), sample.topk_logprobs[pos].tolist()):
                want.setdefault(f"token_id:{top_id}", top_lp)
            assert list(row) == list(want), f"position {pos}: other top-K entries or order"
            assert len(row) == (k if sample.ids[pos] in sample.topk_ids[pos].tolist() else k + 1)
            assert all(abs(row[key] - want[key]) <= tol for key in want)


# ---- sampling ---------------------------------------------------------------------------------------
def test_a_seeded_completion_is_what_the_sampler_gives_for_that_seed(double, local):
    model, tokenizer, stops = local
    prompt = _prompt(tokenizer, 'What is the code for "apple"?')
    seen = set()
    for seed in (0, 7, -123456789, 2**63 - 1):  # the engine sends any int64
        body = complete(double.url, prompt, seed=seed, logprobs=K, stop_token_ids=sorted(stops))
        choice = body["choices"][0]
        assert_same(choice, expected(model, prompt, seed, stops=stops, k=K), k=K)
        assert choice["prompt_token_ids"] == prompt
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(choice["token_ids"]),
                                 "total_tokens": len(prompt) + len(choice["token_ids"])}
        seen.add(tuple(choice["token_ids"]))
    assert len(seen) > 1, "different seeds gave the same reply: the seed is not used"
    again = complete(double.url, prompt, seed=7, logprobs=K, stop_token_ids=sorted(stops))["choices"][0]
    assert again["token_ids"] == expected(model, prompt, 7, stops=stops).ids


def test_greedy_takes_the_argmax_with_untempered_log_probs(double, local):
    model, tokenizer, stops = local
    prompt = _prompt(tokenizer, "Say something.")
    choice = complete(double.url, prompt, temperature=0, seed=3, logprobs=1)["choices"][0]
    assert_same(choice, expected(model, prompt, None, stops=stops, temperature=0, k=1), k=1)
    with torch.no_grad():
        first = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert choice["token_ids"][0] == int(first.argmax())
    assert abs(choice["logprobs"]["token_logprobs"][0] - float(first.max())) <= 1e-5


def test_log_probs_are_those_of_the_tempered_distribution(double, local):
    """processed_logprobs: a token drawn at temperature T carries log softmax(logits / T)."""
    model, tokenizer, stops = local
    prompt = _prompt(tokenizer, "Temper me.")
    choice = complete(double.url, prompt, temperature=0.5, seed=11, max_tokens=1)["choices"][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    token = choice["token_ids"][0]
    # no logprobs asked: none returned; ask again with logprobs for the value
    assert choice["logprobs"] is None
    choice = complete(double.url, prompt, temperature=0.5, seed=11, max_tokens=1, logprobs=0)["choices"][0]
    assert choice["token_ids"] == [token]
    assert list(choice["logprobs"]["top_logprobs"][0]) == [f"token_id:{token}"]  # logprobs 0: the sampled one
    want = float(torch.log_softmax(logits / 0.5, -1)[token])
    assert abs(choice["logprobs"]["token_logprobs"][0] - want) <= 1e-5
    assert abs(choice["logprobs"]["token_logprobs"][0] - float(torch.log_softmax(logits, -1)[token])) > 1e-3


def test_a_stop_id_ends_the_reply_as_its_last_token(double, local):
    model, tokenizer, stops = local
    prompt = _prompt(tokenizer, "Stop me.")
    free = expected(model, prompt, None, stops=set(), temperature=0, max_tokens=8)  # greedy, no stop ids
    cut = next((n for n in range(1, 8) if free.ids[n] not in free.ids[:n]), 0)  # the first new token
    stop_id = free.ids[cut]
    choice = complete(double.url, prompt, temperature=0, max_tokens=8, ignore_eos=True, logprobs=1,
                      stop_token_ids=[stop_id])["choices"][0]
    assert choice["token_ids"] == free.ids[:cut + 1]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id
    assert choice["text"] == tokenizer.decode(free.ids[:cut], skip_special_tokens=False)  # vLLM: stop token not in text
    assert choice["weight_versions"] == [{"version": "default", "start": 0, "end": cut + 1}]
    longer = complete(double.url, prompt, temperature=0, max_tokens=3, ignore_eos=True)["choices"][0]
    assert longer["finish_reason"] == "length" and longer["stop_reason"] is None and len(longer["token_ids"]) == 3


def test_concurrent_requests_each_get_their_own_seeds_reply(double, local):
    """Requests waiting together with the same settings are sampled as one batch, the others in
    batches of their own; each still gets the reply its seed gives alone."""
    model, tokenizer, stops = local
    prompts = [_prompt(tokenizer, text) for text in ("a", "a longer question here", "b c", "the code for apple", "d")]
    temperatures = [1.0, 1.0, 1.0, 0.5, 1.0]

    async def fire():
        async with httpx.AsyncClient(timeout=120) as client:
            bodies = [{"model": NAME, "prompt": p, "max_tokens": 10, "temperature": temperatures[n], "seed": 100 + n,
                       "logprobs": K, "return_tokens_as_token_ids": True, "return_token_ids": True,
                       "stop_token_ids": sorted(stops)} for n, p in enumerate(prompts)]
            return await asyncio.gather(*(client.post(f"{double.url}/v1/completions", json=b) for b in bodies))

    for n, response in enumerate(asyncio.run(fire())):
        assert response.status_code == 200, response.text
        sample = expected(model, prompts[n], 100 + n, stops=stops, temperature=temperatures[n], max_tokens=10, k=K)
        assert_same(response.json()["choices"][0], sample, k=K, tol=1e-5)  # batch shape may move the last bits


def test_raw_logprobs_mode_reports_the_untempered_distribution(start_double, tiny_toy_dir, local):
    model, tokenizer, stops = local
    raw = start_double(tiny_toy_dir, "--served-model-name", NAME, "--logprobs-mode", "raw_logprobs")
    info = httpx.get(f"{raw.url}/server_info", params={"config_format": "json"}).json()
    assert info["vllm_config"]["model_config"]["logprobs_mode"] == "raw_logprobs"
    prompt = _prompt(tokenizer, "raw")
    choice = complete(raw.url, prompt, temperature=0.5, seed=5, max_tokens=4, ignore_eos=True,
                      logprobs=1)["choices"][0]
    assert choice["token_ids"] == expected(model, prompt, 5, stops={tokenizer.eos_token_id}, temperature=0.5,
                                           max_tokens=4).ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + choice["token_ids"][:-1]])).logits[0, len(prompt) - 1:]
    want = torch.log_softmax(logits.float(), -1)[torch.arange(4), torch.tensor(choice["token_ids"])].tolist()
    assert max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], want)) <= 1e-5


# ---- the other routes ---------------------------------------------------------------------------------
def test_models_server_info_and_weight_version(double, tiny_toy_dir):
    models = httpx.get(f"{double.url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]][0] == NAME
    config = httpx.get(f"{double.url}/server_info", params={"config_format": "json"}).json()["vllm_config"]
    assert config["model_config"]["logprobs_mode"] == "processed_logprobs"
    assert config["model_config"]["max_logprobs"] == MAX_LOGPROBS
    assert httpx.get(f"{double.url}/weight_info").json() == {"weight_version": "default"}


def _perturbed(model, path, scale: float, seed: int):
    """A copy of ``model`` with noise added to every weight, saved to ``path``."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    other.save_pretrained(path)
    return other


def test_reload_weights_serves_the_new_weights_and_the_new_version(start_double, tiny_toy_dir, local, tmp_path):
    model, tokenizer, stops = local
    served = start_double(tiny_toy_dir, "--served-model-name", NAME)
    new = _perturbed(model, tmp_path / "step-1", 0.05, seed=1)
    prompt = _prompt(tokenizer, "after the update")
    before = complete(served.url, prompt, seed=9, logprobs=K, stop_token_ids=sorted(stops))["choices"][0]
    assert_same(before, expected(model, prompt, 9, stops=stops, k=K), k=K)

    assert httpx.post(f"{served.url}/pause", params={"mode": "wait"}).json() == {"status": "paused"}
    reply = httpx.post(f"{served.url}/collective_rpc", timeout=120,
                       json={"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "step-1")}})
    assert reply.status_code == 200 and reply.json() == {"results": [None]}
    assert httpx.post(f"{served.url}/update_weight_version", json={"new_version": "1"}).json() == {
        "success": True, "new_version": "1"}
    assert httpx.post(f"{served.url}/resume").json() == {"status": "resumed"}
    assert httpx.get(f"{served.url}/weight_info").json() == {"weight_version": "1"}

    after = complete(served.url, prompt, seed=9, logprobs=K, stop_token_ids=sorted(stops))["choices"][0]
    assert_same(after, expected(new, prompt, 9, stops=stops, k=K), k=K)
    assert after["weight_versions"] == [{"version": "1", "start": 0, "end": len(after["token_ids"])}]
    old = expected(model, prompt, 9, stops=stops)
    assert after["logprobs"]["token_logprobs"][:1] != old.logprobs[:1], "the old weights still answer"

    wrong = httpx.post(f"{served.url}/collective_rpc", json={"method": "reload_weights",
                                                             "kwargs": {"weights_path": str(tmp_path / "none")}})
    assert wrong.status_code == 400 and "weights_path" in wrong.text


def test_pause_wait_drains_in_flight_requests_then_refuses_until_resume(start_double, tiny_toy_dir, local):
    model, tokenizer, stops = local
    served = start_double(tiny_toy_dir, "--served-model-name", NAME)
    prompt = _prompt(tokenizer, "a long one")
    long_reply = 1024 - len(prompt)  # the whole context: long enough to still run when the pause comes

    async def scenario():
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            finished = {}

            async def long_request():
                response = await client.post("/v1/completions", json={
                    "model": NAME, "prompt": prompt, "max_tokens": long_reply, "temperature": 1.0, "seed": 1,
                    "ignore_eos": True, "return_token_ids": True})
                finished["long"] = time.monotonic()
                return response

            task = asyncio.create_task(long_request())
            await asyncio.sleep(0.5)  # admitted and sampling
            assert not task.done(), "the long request ended before the pause: make it longer"
            paused = await client.post("/pause", params={"mode": "wait"})
            finished["pause"] = time.monotonic()
            long_response = await task
            refused = await client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 2})
            state = (await client.get("/is_paused")).json()
            await client.post("/resume")
            accepted = await client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 2})
            after = (await client.get("/is_paused")).json()
            return finished, paused, long_response, refused, state, accepted, after

    finished, paused, long_response, refused, state, accepted, after = asyncio.run(scenario())
    assert paused.json() == {"status": "paused"}
    assert long_response.status_code == 200 and len(long_response.json()["choices"][0]["token_ids"]) == long_reply
    assert finished["long"] <= finished["pause"], "/pause?mode=wait answered before the in-flight request ended"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
    assert state == {"is_paused": True} and after == {"is_paused": False}
    assert accepted.status_code == 200


def test_pause_keep_queues_requests_and_abort_refuses_them(double, local):
    model, tokenizer, stops = local
    prompt = _prompt(tokenizer, "queued")

    async def scenario():
        async with httpx.AsyncClient(base_url=double.url, timeout=120) as client:
            try:
                assert (await client.post("/pause", params={"mode": "keep"})).json() == {"status": "paused"}
                task = asyncio.create_task(client.post("/v1/completions", json={
                    "model": NAME, "prompt": prompt, "max_tokens": 2, "seed": 2, "return_token_ids": True}))
                await asyncio.sleep(1.0)
                held = not task.done()
                await client.post("/resume")
                kept = await task
                await client.post("/pause", params={"mode": "abort"})
                refused = await client.post("/v1/completions", json={"model": NAME, "prompt": prompt})
                return held, kept, refused
            finally:
                await client.post("/resume")

    held, kept, refused = asyncio.run(scenario())
    assert held, "a request sent during /pause?mode=keep was sampled before /resume"
    assert kept.status_code == 200
    assert kept.json()["choices"][0]["token_ids"] == expected(model, prompt, 2, stops={tokenizer.eos_token_id},
                                                              max_tokens=2, temperature=1.0).ids
    assert refused.status_code == 503 and "paused" in refused.json()["error"]["message"]


def test_a_lora_adapter_serves_requests_that_name_it(start_double, tiny_toy_dir, local, tmp_path):
    peft = pytest.importorskip("peft")
    model, tokenizer, stops = local
    served = start_double(tiny_toy_dir, "--served-model-name", NAME)
    adapters = []
    for n in range(2):
        torch.manual_seed(n)
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))  # random B: it changes outputs
        wrapped.save_pretrained(tmp_path / f"adapter-{n}")
        adapters.append(wrapped.eval())
    prompt = _prompt(tokenizer, "adapted")

    for n, adapter in enumerate(adapters):
        reply = httpx.post(f"{served.url}/v1/load_lora_adapter", timeout=120, json={
            "lora_name": "student", "lora_path": str(tmp_path / f"adapter-{n}"), "load_inplace": True})
        assert reply.status_code == 200, reply.text
        assert reply.text == "Success: LoRA adapter 'student' added successfully."
        body = complete(served.url, prompt, model="student", seed=4, logprobs=K, stop_token_ids=sorted(stops))
        assert body["model"] == "student"
        assert_same(body["choices"][0], expected(adapter, prompt, 4, stops=stops, k=K), k=K)
    base = complete(served.url, prompt, seed=4, logprobs=K, stop_token_ids=sorted(stops))["choices"][0]
    assert_same(base, expected(model, prompt, 4, stops=stops, k=K), k=K)  # the base model is untouched
    assert [m["id"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]] == [NAME, "student"]
    again = httpx.post(f"{served.url}/v1/load_lora_adapter", json={
        "lora_name": "student", "lora_path": str(tmp_path / "adapter-0")})
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, status, param, says", [
    ({"model": "other"}, 404, "model", "does not exist"),
    ({"prompt": "text, not ids"}, 400, "prompt", "list of token ids"),
    ({"prompt": [[1, 2], [3]]}, 400, "prompt", "list of token ids"),
    ({"prompt": [1, 10**6]}, 400, "prompt", "out of vocabulary"),
    ({"prompt": [1, -1]}, 400, "prompt", "out of vocabulary"),
    ({"logprobs": MAX_LOGPROBS + 1}, 400, "logprobs", "greater than max allowed"),
    ({"return_token_id": True}, 400, "return_token_id", "outside the subset"),
    ({"top_p": 0.9}, 400, "top_p", "warp"),
    ({"top_k": 5}, 400, "top_k", "warp"),
    ({"seed": 2**63}, 400, "seed", "64-bit"),
    ({"max_tokens": 2000}, 400, "max_tokens", "maximum context length"),
    ({"temperature": "hot"}, 400, "temperature", "must be"),
])
def test_bad_completion_requests_are_refused_in_vllms_error_shape(double, fields, status, param, says):
    body = {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2} | fields
    response = httpx.post(f"{double.url}/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param and says in error["message"] and "\n" not in error["message"]
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]


def test_other_bad_requests(double):
    rpc = httpx.post(f"{double.url}/collective_rpc", json={"method": "sleep"})
    assert rpc.status_code == 400 and "reload_weights" in rpc.json()["error"]["message"]
    assert httpx.post(f"{double.url}/collective_rpc", json={"kwargs": {}}).status_code == 400
    assert httpx.post(f"{double.url}/pause", params={"mode": "later"}).status_code == 400
    assert httpx.post(f"{double.url}/v1/completions", content=b"{not json").status_code == 400
    assert httpx.post(f"{double.url}/update_weight_version", json={"new_version": 3}).status_code == 400
    lora = httpx.post(f"{double.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"})
    assert lora.status_code == 404 and lora.json()["error"]["param"] == "lora_path"
    assert httpx.get(f"{double.url}/v1/chat/completions").status_code == 404  # not in the subset
    assert httpx.get(f"{double.url}/health").status_code == 200


# ---- the command -------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "serve-policy", *args], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ))


@pytest.mark.parametrize("args, says", [
    (("--logprobs-mode", "raw"), "--logprobs-mode"),
    (("--host", "0.0.0.0"), "not loopback"),
    (("--port", "70000"), "--port"),
    (("--max-logprobs", "-1"), "--max-logprobs"),
])
def test_bad_flags_are_one_line_and_exit_2(tiny_toy_dir, args, says):
    proc = _cli("--policy", str(tiny_toy_dir), *args)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_directory_without_a_model_is_one_line(tmp_path):
    proc = _cli("--policy", str(tmp_path))
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_stops_cleanly_on_a_signal(tiny_toy_dir, sig):
    with vllm_double.serve_policy(tiny_toy_dir) as served:
        lines = [line for line in served.log().splitlines() if line.startswith("harness serve-policy:")]
        assert len(lines) == 1 and served.url in lines[0]
        served.proc.send_signal(sig)
        assert served.proc.wait(30) == 0
        assert "Traceback" not in served.log()

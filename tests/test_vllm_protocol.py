"""The vLLM HTTP subset, checked against vLLM's own source: the routes the test double serves, the
request fields the vllm engine sends and the response fields the double returns must be vLLM
0.34.0's, the version pinned in pyproject's optional extra ``vllm``.

vLLM is never installed on CPU machines: its wheel is read as a zip archive and the source parsed
with ``ast`` (pydantic classes' annotated fields, ``@router.get/post`` decorators, ``Literal``
values, the dict literals the RL routes answer with). Where the wheel is: ``$HARNESS_VLLM_WHEEL``,
else ``<cache root>/vllm-wheel/`` (``$HARNESS_CACHE_DIR`` or ``~/.cache/harness``), which
``scripts/setup.sh`` fills with ``pip download vllm==0.34.0 --no-deps`` (``SKIP_VLLM_WHEEL=1``
skips it). No wheel: skip with the reason, unless ``HARNESS_REQUIRE_VLLM_WHEEL=1``
(``scripts/test.sh`` sets it when the setup fetched it), then fail.

The double's responses are real ones, from ``harness serve-policy`` over HTTP.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import tomllib
import zipfile
from pathlib import Path

import pytest

from harness.policy import serve_policy

REPO = Path(__file__).resolve().parents[1]


def pinned_version() -> str:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert len(extra) == 1 and extra[0].startswith("vllm=="), f"the vllm extra must pin one version, got {extra}"
    return extra[0].removeprefix("vllm==")


def wheel_dir() -> Path:
    import platformdirs

    root = os.environ.get("HARNESS_CACHE_DIR") or platformdirs.user_cache_dir("harness")
    return Path(root).expanduser() / "vllm-wheel"


def find_wheel() -> Path | None:
    given = os.environ.get("HARNESS_VLLM_WHEEL")
    if given:
        return Path(given)
    found = sorted(wheel_dir().glob(f"vllm-{pinned_version()}-*.whl"))
    return found[0] if found else None


@functools.cache
def _archive(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    path = find_wheel()
    if path is None or not path.is_file():
        message = (f"no vLLM {pinned_version()} wheel at {path or wheel_dir()} (bash scripts/setup.sh fetches it; "
                   "or set HARNESS_VLLM_WHEEL to a downloaded wheel)")
        if os.environ.get("HARNESS_REQUIRE_VLLM_WHEEL") == "1":
            pytest.fail(f"{message} (HARNESS_REQUIRE_VLLM_WHEEL=1)")
        pytest.skip(message)
    archive = _archive(str(path))
    version = re.search(r"^Version: (\S+)$", _metadata(archive), re.M).group(1)
    assert version == pinned_version(), f"{path} is vLLM {version}, the extra pins {pinned_version()}"
    return archive


def _metadata(archive: zipfile.ZipFile) -> str:
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    return archive.read(name).decode()


def source(wheel: zipfile.ZipFile, member: str) -> ast.Module:
    return ast.parse(wheel.read(member).decode(), filename=member)


def class_fields(tree: ast.Module, name: str) -> set[str]:
    """The annotated attribute names of class ``name`` (pydantic fields, dataclass fields)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {item.target.id for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    raise AssertionError(f"class {name} not found")


def literal_values(tree: ast.Module, name: str) -> set[str]:
    """The strings of ``name = Literal[...]`` at module level."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values = node.value.slice
            elements = values.elts if isinstance(values, ast.Tuple) else [values]
            return {e.value for e in elements}
    raise AssertionError(f"{name} = Literal[...] not found")


def function(tree: ast.Module, name: str) -> ast.AsyncFunctionDef | ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise AssertionError(f"function {name} not found")


def route_function(tree: ast.Module, method: str, path: str):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                if _route_of(deco) == (method, path):
                    return node
    raise AssertionError(f"{method} {path} not found")


def _route_of(deco: ast.expr) -> tuple[str, str] | None:
    if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
            and deco.func.attr in ("get", "post", "put", "delete") and deco.args
            and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
        return deco.func.attr.upper(), deco.args[0].value
    return None


def all_routes(wheel: zipfile.ZipFile) -> dict[tuple[str, str], str]:
    """(method, path) -> the file declaring it, for every route decorator under vllm/entrypoints."""
    routes = {}
    for member in wheel.namelist():
        if member.startswith("vllm/entrypoints/") and member.endswith(".py"):
            for node in ast.walk(source(wheel, member)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for deco in node.decorator_list:
                        if (route := _route_of(deco)) is not None:
                            routes[route] = member
    return routes


def answered_keys(func) -> set[str]:
    """The keys of the dict literals a route answers with (``JSONResponse(content={...})``)."""
    keys = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "JSONResponse":
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "content")]:
                if isinstance(arg, ast.Dict):
                    keys |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
    return keys


def embedded_body_params(func) -> set[str]:
    """The parameters a FastAPI route reads from its JSON body (``Annotated[..., Body(embed=True)]``)."""
    return {arg.arg for arg in func.args.args if arg.annotation is not None and "Body(" in ast.unparse(arg.annotation)}


def body_gets(func) -> set[str]:
    """The keys a route reads with ``body.get("...")``."""
    return {node.args[0].value for node in ast.walk(func)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and getattr(node.func.value, "id", None) == "body" and node.args and isinstance(node.args[0], ast.Constant)}


COMPLETION = "vllm/entrypoints/openai/completion/protocol.py"
ENGINE_PROTOCOL = "vllm/entrypoints/serve/engine/protocol.py"
RL_ROUTER = "vllm/entrypoints/rl/online/api_router.py"


# ---- requests ---------------------------------------------------------------------------------------
def check_completion_request(wheel: zipfile.ZipFile, fields) -> None:
    """Every field of a /v1/completions request is one of vLLM's ``CompletionRequest`` (vLLM would
    ignore a misspelled one silently). The vllm engine's request builder is checked with this."""
    known = class_fields(source(wheel, COMPLETION), "CompletionRequest")
    unknown = sorted(set(fields) - known)
    assert not unknown, f"not fields of vLLM's CompletionRequest: {unknown}"


def test_the_completion_request_fields_are_vllms(wheel):
    check_completion_request(wheel, serve_policy.COMPLETION_REQUEST_FIELDS)
    # the ones whose vLLM defaults are not what the engine needs, so it must send them
    tree = source(wheel, COMPLETION)
    fields = class_fields(tree, "CompletionRequest")
    assert {"return_token_ids", "return_tokens_as_token_ids", "return_weight_versions", "add_special_tokens",
            "seed", "stop_token_ids", "logprobs"} <= fields


def test_the_sampling_settings_the_double_refuses_default_to_off_in_vllm(wheel):
    """vLLM's completion defaults (``_DEFAULT_SAMPLING_PARAMS``) are the neutral values the double
    accepts: an engine that leaves them unset gets the same distribution from both."""
    tree = source(wheel, COMPLETION)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
                and getattr(n.target, "id", None) == "_DEFAULT_SAMPLING_PARAMS")
    defaults = ast.literal_eval(node.value)
    assert (defaults["top_p"], defaults["top_k"], defaults["min_p"], defaults["repetition_penalty"]) == (1.0, 0, 0.0,
                                                                                                       1.0)


def test_the_lora_request_fields_are_vllms(wheel):
    fields = class_fields(source(wheel, "vllm/entrypoints/serve/lora/protocol.py"), "LoadLoRAAdapterRequest")
    assert set(serve_policy.LOAD_LORA_FIELDS) <= fields


def test_the_weight_sync_bodies_are_vllms(wheel):
    rl = source(wheel, RL_ROUTER)
    assert embedded_body_params(route_function(rl, "POST", "/update_weight_version")) == {"new_version"}
    rpc = route_function(source(wheel, "vllm/entrypoints/serve/dev/rpc/api_router.py"), "POST", "/collective_rpc")
    assert {"method", "kwargs"} <= body_gets(rpc)
    worker = source(wheel, "vllm/v1/worker/gpu_worker.py")
    reload = next(n for n in ast.walk(worker) if isinstance(n, ast.ClassDef) and n.name == "Worker")
    method = next(n for n in reload.body if isinstance(n, ast.FunctionDef) and n.name in serve_policy.RPC_METHODS)
    assert "weights_path" in [a.arg for a in method.args.args]
    assert set(serve_policy.PAUSE_MODES) == literal_values(source(wheel, "vllm/v1/engine/__init__.py"), "PauseMode")
    assert set(serve_policy.LOGPROBS_MODES) <= literal_values(source(wheel, "vllm/config/model.py"), "LogprobsMode")


# ---- routes -------------------------------------------------------------------------------------------
def test_every_route_of_the_double_is_a_vllm_route(wheel):
    vllm_routes = all_routes(wheel)
    missing = [f"{m} {p}" for m, p in serve_policy.ROUTES if (m, p) not in vllm_routes]
    assert not missing, f"not routes of vLLM {pinned_version()}: {missing}"


def test_the_app_serves_exactly_the_declared_routes():
    app = serve_policy.create_app(object())  # routes only: the server is used when a request comes
    served = {(method, route.path) for route in app.routes for method in route.methods - {"HEAD"}}
    assert served == set(serve_policy.ROUTES)


# ---- responses, from the running double --------------------------------------------------------------
@pytest.fixture(scope="module")
def responses(tiny_toy_dir, wheel):
    httpx = pytest.importorskip("httpx")
    from vllm_double import serve_policy as running

    with running(tiny_toy_dir, "--served-model-name", "tiny") as double:
        url = double.url
        out = {"completion": httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 1.0, "seed": 1, "logprobs": 2,
            "return_tokens_as_token_ids": True, "return_token_ids": True, "return_weight_versions": True}).json(),
               "error": httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": [1]}).json(),
               "models": httpx.get(f"{url}/v1/models").json(),
               "server_info": httpx.get(f"{url}/server_info", params={"config_format": "json"}).json(),
               "weight_info": httpx.get(f"{url}/weight_info").json(),
               "is_paused": httpx.get(f"{url}/is_paused").json(),
               "update_weight_version": httpx.post(f"{url}/update_weight_version", json={"new_version": "1"}).json(),
               "pause": httpx.post(f"{url}/pause", params={"mode": "wait"}).json(),
               "resume": httpx.post(f"{url}/resume").json()}
        out["rpc"] = httpx.post(f"{url}/collective_rpc", timeout=120, json={
            "method": "reload_weights", "kwargs": {"weights_path": str(tiny_toy_dir)}}).json()
    return out


def test_the_completion_response_fields_are_vllms(wheel, responses):
    tree = source(wheel, COMPLETION)
    body = responses["completion"]
    assert set(body) == set(serve_policy.COMPLETION_RESPONSE_FIELDS) <= class_fields(tree, "CompletionResponse")
    choice = body["choices"][0]
    assert set(choice) == set(serve_policy.COMPLETION_CHOICE_FIELDS) <= class_fields(tree, "CompletionResponseChoice")
    logprobs = choice["logprobs"]
    assert set(logprobs) == set(serve_policy.COMPLETION_LOGPROBS_FIELDS) <= class_fields(tree, "CompletionLogProbs")
    assert set(choice["weight_versions"][0]) == class_fields(source(wheel, "vllm/outputs.py"), "WeightVersionSpan")
    engine = source(wheel, ENGINE_PROTOCOL)
    assert set(body["usage"]) <= class_fields(engine, "UsageInfo")
    assert body["object"] == "text_completion"
    finish = next(n for n in source(wheel, "vllm/v1/engine/__init__.py").body if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", None) == "FINISH_REASON_STRINGS")
    assert choice["finish_reason"] in ast.literal_eval(finish.value)
    # ids as vLLM writes them with return_tokens_as_token_ids (format_token_id_placeholder)
    placeholder = function(source(wheel, "vllm/entrypoints/generate/base/serving.py"), "format_token_id_placeholder")
    template = ast.unparse(placeholder.body[-1].value)
    assert template == "f'token_id:{token_id}'" and all(t.startswith("token_id:") for t in logprobs["tokens"])


def test_the_error_and_model_list_shapes_are_vllms(wheel, responses):
    engine = source(wheel, ENGINE_PROTOCOL)
    assert set(responses["error"]) == class_fields(engine, "ErrorResponse")
    assert set(responses["error"]["error"]) == class_fields(engine, "ErrorInfo")
    assert set(responses["models"]) == class_fields(engine, "ModelList")
    assert set(responses["models"]["data"][0]) <= class_fields(engine, "ModelCard")


def test_the_rl_routes_answer_as_vllms(wheel, responses):
    rl = source(wheel, RL_ROUTER)
    for name, method, path in (("weight_info", "GET", "/weight_info"), ("is_paused", "GET", "/is_paused"),
                               ("update_weight_version", "POST", "/update_weight_version"),
                               ("pause", "POST", "/pause"), ("resume", "POST", "/resume")):
        assert set(responses[name]) == answered_keys(route_function(rl, method, path)) - {"error"}, name
    rpc = route_function(source(wheel, "vllm/entrypoints/serve/dev/rpc/api_router.py"), "POST", "/collective_rpc")
    assert set(responses["rpc"]) == answered_keys(rpc)


def test_the_server_info_fields_are_vllms(wheel, responses):
    model_config = class_fields(source(wheel, "vllm/config/model.py"), "ModelConfig")
    assert set(responses["server_info"]["vllm_config"]["model_config"]) <= model_config
    info = function(source(wheel, "vllm/entrypoints/serve/dev/server_info/api_router.py"), "show_server_info")
    keys = {k.value for n in ast.walk(info) if isinstance(n, ast.Dict) for k in n.keys if isinstance(k, ast.Constant)}
    assert set(responses["server_info"]) == keys


def test_the_vllm_serve_flags_of_managed_replicas_are_vllms(wheel, monkeypatch):
    """Every ``--flag`` the harness starts a replica with is an ``EngineArgs`` field or a frontend
    argument of vLLM 0.34 (``vllm serve`` builds its parser from both)."""
    from harness.policy.vllm_replicas import SERVER_COMMAND_ENV, ServerSpec, managed_command

    monkeypatch.delenv(SERVER_COMMAND_ENV, raising=False)
    argv = managed_command(ServerSpec(model="m", max_logprobs=5, lora_rank=8, gpu_memory=0.4), 8000, 2)
    assert argv[:3] == ["vllm", "serve", "m"] and argv[argv.index("--gpu-memory-utilization") + 1] == "0.4"
    flags = {arg[2:].replace("-", "_") for arg in argv if arg.startswith("--")}
    engine_args = class_fields(source(wheel, "vllm/engine/arg_utils.py"), "EngineArgs")
    frontend = class_fields(source(wheel, "vllm/entrypoints/common/cli_args.py"), "FrontendArgs")
    assert flags <= engine_args | frontend, flags - engine_args - frontend
    assert "--gpu-memory-utilization" not in managed_command(ServerSpec(model="m", max_logprobs=1), 8000, 1)

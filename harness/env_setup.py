"""Build an env factory from plain settings: shared by ``harness eval`` and ``harness train``.

The settings are JSON-friendly values (model names, URLs, numbers), so a training run can store
them in its config and ``--resume`` can compare them; the live objects they turn into (the τ user
simulator spec, a managed AppWorld server pool) are made here, at start-up, and never stored.
"""

from __future__ import annotations

from typing import Any

from envs.registry import make_env_factory
from harness.errors import ConfigError

__all__ = ["ENV_OPTION_DEFAULTS", "env_factory", "managed_pool"]

ENV_OPTION_DEFAULTS: dict[str, Any] = {
    # tau-airline
    "data_version": "tau3", "user": "litellm", "user_model": None, "user_guidelines": "ours",
    "user_api_base": None, "user_temperature": 0.0, "max_steps": 200, "max_errors": 10,
    # provider calls of the user simulator
    "timeout": 120.0, "max_retries": 4, "retry_backoff": 1.0, "llm_client": "litellm",
    # appworld
    "appworld_root": None, "appworld_urls": None, "appworld_servers": 1, "max_interactions": 50,
}


def _appworld_pool(root: str, servers: int):
    from envs.appworld.server_pool import ServerPool
    from envs.appworld.setup import default_venv_dir

    python = default_venv_dir() / "bin" / "python"
    if not python.exists():
        raise ConfigError(f"no AppWorld side venv at {python.parent.parent}: run `harness appworld setup` "
                          "(or pass --appworld-url for servers you started yourself)")
    return ServerPool(max(1, servers), python=str(python), appworld_root=root)


def env_factory(env: str, **settings: Any):
    """The factory of ``env`` with ``settings`` (keys of ``ENV_OPTION_DEFAULTS``; unknown keys are
    an error, irrelevant ones ignored). Raises ``ConfigError`` / ``DataMissingError`` on bad input."""
    unknown = sorted(set(settings) - set(ENV_OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown env setting(s): {', '.join(unknown)}")
    o = {**ENV_OPTION_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    options: dict[str, Any] = {}
    if env == "tau-airline":
        from envs.tau import data as tau_data
        from envs.tau.user_sim import make_user_spec

        if o["data_version"] not in ("tau3", "tau2"):
            raise ConfigError(f"--data-version must be tau3 or tau2, got '{o['data_version']}'")
        paths = tau_data.airline_paths(o["data_version"])
        user = make_user_spec(
            o["user"], model=o["user_model"], guidelines=o["user_guidelines"],
            official_guidelines_path=paths.user_guidelines, api_base=o["user_api_base"],
            temperature=o["user_temperature"], timeout=o["timeout"], max_retries=o["max_retries"],
            backoff_base=o["retry_backoff"], client=o["llm_client"],
        )
        options = dict(data_version=o["data_version"], user=user, max_steps=o["max_steps"], max_errors=o["max_errors"])
    elif env == "appworld":
        # Pre-started servers (--appworld-url), or a managed pool of --appworld-servers processes
        # from the side venv (started by ``managed_pool(factory).start()``, closed after).
        root, pool = o["appworld_root"], None
        if not o["appworld_urls"]:
            from envs.appworld.setup import default_root

            root = root or str(default_root())
            pool = _appworld_pool(root, o["appworld_servers"])
        options = dict(appworld_root=root, server_urls=o["appworld_urls"], pool=pool,
                       max_interactions=o["max_interactions"])
    return make_env_factory(env, **options)


def managed_pool(factory: Any):
    """The factory's managed server pool (AppWorld) if it has one that must be started, else None."""
    servers = getattr(factory, "servers", None)
    return servers if getattr(servers, "start", None) else None

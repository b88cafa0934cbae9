"""``hf``: a local Hugging Face causal LM as the agent (``harness eval --policy PATH``).

The model loads once, when the agent is configured (so a bad path fails before any run row is
written); episodes share it through ``LocalPolicy``'s batcher.
"""

from __future__ import annotations

from typing import Any

from harness.agents.base import AgentSpec, register_agent
from harness.errors import ConfigError


@register_agent("hf")
def hf_agent_spec(policy: str | None = None, **options: Any) -> AgentSpec:
    """Options: everything ``PolicyConfig`` takes (temperature, max_new_tokens, device ...)."""
    from harness.policy.local_policy import LocalPolicy, PolicyConfig  # torch import only when used

    if not policy:
        raise ConfigError("the hf agent needs --policy (a local model directory or a Hugging Face id)")
    local = LocalPolicy(PolicyConfig(path=policy, **options))
    return AgentSpec(name="hf", model=policy, settings=local.describe(),
                     build=lambda task, seed: local.agent(seed))

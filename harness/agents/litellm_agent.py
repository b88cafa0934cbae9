"""A tool-calling agent backed by any litellm model (the τ² "LLMAgent" scaffold).

Each turn is one chat completion over the whole conversation, with the env's tools attached. The
seed of the episode is sent with every call, so trials differ and reruns can reproduce (where the
provider honours seeds).
"""

from __future__ import annotations

from typing import Any

from harness.agents.base import AgentSpec, register_agent
from harness.errors import ConfigError
from harness.llm import LLMConfig, check_api_key, complete
from harness.types import AgentTurn


class LiteLLMAgent:
    def __init__(self, cfg: LLMConfig, seed: int | None):
        self.cfg = cfg
        self.seed = seed

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> AgentTurn:
        reply = await complete(self.cfg, messages, tools=tools or None, seed=self.seed)
        return AgentTurn(
            content=reply.content,
            tool_calls=reply.tool_calls,
            usage=reply.usage,
            raw={"finish_reason": reply.finish_reason},
        )


@register_agent("litellm")
def litellm_agent_spec(model: str | None = None, **llm_options: Any) -> AgentSpec:
    """Options: everything ``LLMConfig`` takes (api_base, temperature, max_tokens, timeout ...)."""
    if not model:
        raise ConfigError("the litellm agent needs --model (a litellm model string, e.g. openai/gpt-4.1)")
    cfg = LLMConfig(model=model, **llm_options)
    check_api_key(cfg, "agent")
    return AgentSpec(
        name="litellm",
        model=model,
        settings=cfg.describe(),
        build=lambda task, seed: LiteLLMAgent(cfg, seed),
    )

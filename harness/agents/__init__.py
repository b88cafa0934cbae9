"""Agents: litellm models, local Hugging Face policies (hf), the gold-replaying oracle."""

from harness.agents import hf_agent, litellm_agent, oracle  # noqa: F401  (registers the agents)
from harness.agents.base import Agent, AgentSpec, agent_names, make_agent_spec, register_agent

__all__ = ["Agent", "AgentSpec", "agent_names", "make_agent_spec", "register_agent"]

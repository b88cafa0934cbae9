"""Agents: litellm models, the gold-replaying oracle (local HF policies arrive with the trainer)."""

from harness.agents import litellm_agent, oracle  # noqa: F401  (registers the agents)
from harness.agents.base import Agent, AgentSpec, agent_names, make_agent_spec, register_agent

__all__ = ["Agent", "AgentSpec", "agent_names", "make_agent_spec", "register_agent"]

"""Incremental prompt tokens for multi-turn episodes, without re-tokenizing what was sampled.

The first turn's prompt is the chat template rendered over the opening messages. After that, the
trace already holds every earlier token, including the exact tokens the policy sampled; only the
*new* messages (tool results, user replies) and the template glue around them are tokenized:

    delta text = render(history + new, generation prompt) minus render(history)

The subtraction needs the template to be prefix-preserving. Some templates are not (Qwen3 drops
the reasoning of earlier assistant turns once a new user message arrives), so when the prefix
property fails the delta is computed against a fixed stand-in history instead, which is what the
new messages look like after *any* assistant turn. Which path ran is counted, so a user can see it.

The sampled reply ends at the end-of-turn token, but templates put glue after it (Qwen: ``"\\n"``);
that glue is not sampled, so it is prepended to the delta as prompt tokens (mask 0). A reply cut
by the per-turn token limit gets the end-of-turn token added the same way, also mask 0.
"""

from __future__ import annotations

from typing import Any

from harness.errors import ConfigError

__all__ = ["ChatTokenizer"]

_PROBE = "\x00probe\x00"


class ChatTokenizer:
    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template; a local policy needs one "
                              "(set tokenizer.chat_template, or pick an instruct/chat model)")
        self.tok = tokenizer
        self.tools = tools or None
        self.eos_text = tokenizer.eos_token
        self.after_eos = self._glue_after_eos()
        self.fallback_deltas = 0

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _glue_after_eos(self) -> str:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self.render(probe, generation_prompt=False)
        at = text.rfind(_PROBE + self.eos_text)
        if at < 0:
            raise ConfigError(
                f"the chat template does not end assistant turns with the eos token {self.eos_text!r}; "
                "token-exact traces need it to (set the tokenizer's eos_token to the end-of-turn token)"
            )
        return text[at + len(_PROBE) + len(self.eos_text):]

    def first_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.render(messages, generation_prompt=True))

    def delta(self, history: list[dict[str, Any]], new: list[dict[str, Any]], ended_with_eos: bool) -> list[int]:
        """Prompt tokens that follow a sampled reply (the last message of ``history``) when the
        ``new`` messages arrive, up to and including the next generation prompt."""
        before = self.render(history, generation_prompt=False)
        after = self.render(history + new, generation_prompt=True)
        if after.startswith(before):
            text = after[len(before):]
        else:
            self.fallback_deltas += 1
            stand_in = [history[0], {"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
            base = self.render(stand_in, generation_prompt=False)
            text = self.render(stand_in + new, generation_prompt=True)[len(base):]
        glue = self.after_eos if ended_with_eos else self.eos_text + self.after_eos
        return self.encode(glue + text)

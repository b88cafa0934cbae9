"""Tiny local policies built from scratch: a byte-level BPE tokenizer, a Qwen2.5-style chat
template and a random-init ``Qwen2ForCausalLM`` of ~0.1-1M parameters.

Why: no model hub is reachable from tests or CI, yet the local-policy backend, the token traces
and the trainer must run on a real transformers model with a real chat template and ``<tool_call>``
tool calls. ``build_tiny_policy`` writes such a model to a directory that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline.
The toy env's policy (``envs.toy.policy.build_toy_policy``) trains its tokenizer on the toy
demonstrations, so toy words are single tokens.

    python -c "from envs.toy.policy import build_toy_policy; print(build_toy_policy('/tmp/toy-policy'))"

Tokenizer: byte-level BPE with Qwen2.5's pre-tokenizer and NFC normalizer (``AutoTokenizer``
forces both on any ``qwen2`` directory, so we build exactly what users will load). Every string is
encodable, and ``decode(encode(s)) == s`` exactly for every NFC-normalized string (all ordinary
text; a decomposed "e\u0301" comes back composed, as with real Qwen2.5). Specials as in Qwen2.5:
``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos, ends every turn); ``<tool_call>``,
``</tool_call>``, ``<tool_response>``, ``</tool_response>`` are added, non-special tokens.


Chat template (Qwen2.5 layout, tools shown compactly to keep prompts short):

    <|im_start|>system\\n{system}\\nTools: lookup(name)<|im_end|>\\n
    <|im_start|>user\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n{text}\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response>\\n<tool_response>...</tool_response><|im_end|>\\n

Consecutive tool messages share one user turn, as in Qwen2.5. The template is prefix-preserving:
the rendering of ``messages[:k]`` is a prefix of the rendering of ``messages`` for every k, except
a k that falls between two consecutive tool messages (the shared user turn cannot be closed before
its last result is known). Episodes never cut there: an env returns all results of a turn at once.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TOOL_TOKENS", "render_chat", "build_tokenizer", "build_tiny_policy"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Written as one line per construct and joined without newlines, so the output does not depend
# on Jinja's whitespace settings (transformers renders with trim_blocks/lstrip_blocks on).
_TEMPLATE_LINES = [
    "{%- if messages -%}",
    # System turn: the system message (if first) plus a one-line tool list (if tools).
    "{%- set sys = messages[0].content if messages[0].role == 'system' else none -%}",
    "{%- if sys is not none or tools -%}",
    "{{- '<|im_start|>system\\n' -}}",
    "{%- if sys -%}{{- sys -}}{%- endif -%}",
    "{%- if tools -%}",
    "{%- if sys -%}{{- '\\n' -}}{%- endif -%}",
    "{{- 'Tools:' -}}",
    "{%- for tool in tools -%}",
    "{%- set fn = tool.function if tool.function is defined else tool -%}",
    "{{- ' ' + fn.name + '(' -}}",
    "{%- if fn.parameters is defined and fn.parameters.properties is defined -%}",
    "{%- for p in fn.parameters.properties -%}{{- p -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}",
    "{%- endif -%}",
    "{{- ')' -}}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- for message in messages -%}",
    "{%- if message.role == 'system' and loop.first -%}",
    # Tool results: consecutive ones share one user turn (Qwen2.5).
    "{%- elif message.role == 'tool' -%}",
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}",
    "{%- set result = message.content if message.content is string else (message.content | tojson) -%}",
    "{{- '\\n<tool_response>\\n' + result + '\\n</tool_response>' -}}",
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}",
    # Assistant: text, then one <tool_call> block per call (arguments: JSON text or a mapping).
    "{%- elif message.role == 'assistant' -%}",
    "{{- '<|im_start|>assistant\\n' -}}",
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}",
    "{%- if message.tool_calls -%}",
    "{%- for tc in message.tool_calls -%}",
    "{%- set call = tc.function if tc.function is defined else tc -%}",
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}",
    "{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' -}}",
    "{%- if call.arguments is string -%}{{- call.arguments -}}{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}",
    "{{- '}\\n</tool_call>' -}}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|im_end|>\\n' -}}",
    "{%- else -%}",
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
]
CHAT_TEMPLATE = "".join(_TEMPLATE_LINES)

# Pre-tokenization and normalization exactly as Qwen2.5's: ``AutoTokenizer`` loads any directory
# whose config says ``qwen2`` as ``Qwen2Tokenizer``, which rebuilds this pipeline from the saved
# vocab and merges whatever tokenizer.json says. Matching it means the tokenizer we build is the
# tokenizer users load (``build_tiny_policy`` checks that).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MARKERS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + TOOL_TOKENS))


def render_chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = False) -> str:
    """Render ``CHAT_TEMPLATE`` without a tokenizer (same Jinja settings and ``tojson`` as
    transformers), e.g. to produce tokenizer training text before the tokenizer exists."""
    return _compiled_template().render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=1)
def _compiled_template():
    # Compiled once: building a toy tokenizer renders hundreds of demonstrations, and compiling
    # the template each time was most of the cost.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(CHAT_TEMPLATE)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE trained on ``texts``) with the special tokens
    and chat template above. ``vocab_size`` counts the trained vocabulary (256 bytes, specials,
    merges); the four tool tokens come on top."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Train on the text between markers: BPE training does not split out added tokens, and the
    # markers must not spawn merges of their own.
    pieces = [p for text in texts for p in _MARKERS.split(text) if p]
    tok.train_from_iterator(pieces, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,  # keeps decode(encode(s)) == s
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_policy(out_dir: str | Path, texts: Iterable[str], *, vocab_size: int = 512, hidden_size: int = 64,
                      num_layers: int = 2, num_heads: int = 4, seed: int = 0, max_positions: int = 1024) -> Path:
    """Train the tokenizer on ``texts``, build a random-init tiny ``Qwen2ForCausalLM`` (tied
    embeddings, fp32, ``max_positions`` positions; weights from ``seed``) and save both to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts)
    texts_sample = texts[:8] + ["héllo wörld 日本語 🎉 <|im_start|>x<tool_call>\n{}</tool_call>"]
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # the initial weights are a pure function of the seed and sizes
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_reload(out, tokenizer, texts_sample)
    return out


def _check_reload(out: Path, built: Any, texts: list[str]) -> None:
    """Fail loudly if ``AutoTokenizer`` would load a different tokenizer than the one we built
    (a transformers upgrade that changes how ``qwen2`` tokenizers are rebuilt would break every
    token-exactness guarantee silently otherwise)."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(out)
    for text in texts:
        want = built(text, add_special_tokens=False)["input_ids"]
        got = loaded(text, add_special_tokens=False)["input_ids"]
        if want != got or loaded.chat_template != CHAT_TEMPLATE or loaded.eos_token != "<|im_end|>":
            raise RuntimeError(f"AutoTokenizer.from_pretrained({out}) does not reproduce the built tokenizer "
                               f"({type(loaded).__name__}); on {text[:60]!r}: {want[:12]} vs {got[:12]}")

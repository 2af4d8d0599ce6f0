"""Chat messages -> one prompt string.

A model imported from Hugging Face (`--init-from-hf HF_DIR`) uses the `chat_template` of its
tokenizer (HF_DIR/tokenizer_config.json or HF_DIR/chat_template.jinja), rendered with Jinja2
in a sandbox as `transformers`' `apply_chat_template` does. Any other model uses meshlm's
default template, plain text that a base model trained on ordinary text can continue:

    System: You are terse.
    User: What is 2 + 2?
    Assistant: 4
    User: And 3 + 3?
    Assistant:

(one "Role: content" line per message, then "Assistant:" to start the answer; with no
trailing space, so the model's first token may carry its own leading space).
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplate:
    """Renders a list of {"role", "content"} messages with one Jinja2 template."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, bos_token: str = "", eos_token: str = "", origin: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self.origin = origin or "meshlm default"

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Raises ValueError (with the template's own message) for messages it refuses."""
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ValueError(f"the chat template ({self.origin}) refused the messages: {e}") from None


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        return str(value.get("content", ""))
    return value or ""


def hf_chat_template(hf_dir: Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face model directory, or None if it has none."""
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    jinja_file = hf_dir / "chat_template.jinja"
    if not source and jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    if not source:
        return None
    return ChatTemplate(
        source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")), origin=str(hf_dir)
    )

"""Chat templates: render a list of messages into the prompt text a model was trained on.

Templates are Jinja, rendered in an environment configured like transformers'
``apply_chat_template`` (so a checkpoint's own template renders byte for byte the same), with
a few named built-in fallbacks for checkpoints that ship without one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import InvalidRequestError, KilnError

_CHAT_ROLES = frozenset({"system", "user", "assistant"})
# Tool-calling roles are passed through to templates that know them (and rejected by the
# template itself otherwise).
_TOOL_ROLES = frozenset({"tool", "function", "ipython"})

_BUILTIN_PACKAGE = "kiln.text"
_BUILTIN_DIR = "templates"


class _TemplateRaised(Exception):
    """What `raise_exception` throws: kept apart from Jinja's own errors, so that a message the
    template author wrote for users reaches them unchanged."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # NOTE: Jinja's own `tojson` escapes <, >, & and ' for HTML and takes no options; templates
    # written for transformers (tool schemas) expect plain json.dumps with these arguments.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    """One shared environment: sandboxed (templates come from downloaded checkpoints) and with
    transformers' whitespace rules, extensions, filters and globals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _message_content(index: int, content: Any) -> str | None:
    """A message's content as a string: OpenAI-style lists of text parts are joined with
    newlines (as vLLM does for text-only templates)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequestError(
                    f"messages[{index}].content: only text parts are supported, got {kind!r}"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(f"messages[{index}].content: a text part needs 'text'")
            texts.append(text)
        return "\n".join(texts)
    raise InvalidRequestError(
        f"messages[{index}].content must be a string or a list of text parts, "
        f"got {type(content).__name__}"
    )


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return normalised copies (content as a string).

    Raises InvalidRequestError on anything a template could not sensibly render.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise InvalidRequestError("messages must be a list of {role, content} objects")
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    checked: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in _CHAT_ROLES and role not in _TOOL_ROLES:
            allowed = ", ".join(sorted(_CHAT_ROLES | _TOOL_ROLES))
            raise InvalidRequestError(f"messages[{i}].role must be one of {allowed}, got {role!r}")
        if "content" not in message and not message.get("tool_calls"):
            raise InvalidRequestError(f"messages[{i}] has no content")
        content = _message_content(i, message.get("content"))
        # An assistant turn that only calls tools legitimately has no text.
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
        checked.append({**message, "content": content})
    return checked


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja source, as in ``tokenizer_config.json``'s ``chat_template``.
        name: where it came from (a built-in name, a path, "checkpoint"), for messages.
    """

    def __init__(self, source: str, name: str = "custom") -> None:
        self.source = source
        self.name = name
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise KilnError(
                f"chat template {name!r} is not valid Jinja (line {e.lineno}): {e.message}"
            ) from e

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r})"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        **extra: Any,
    ) -> str:
        """Render `messages` (validated first) to prompt text.

        ``extra`` reaches the template as variables, like transformers' template kwargs
        (``tools``, ``documents``, ``unk_token``, ``date_string``...). ``tools`` and
        ``documents`` default to None as there, since templates test them with ``is not none``.
        """
        checked = validate_messages(messages)
        context: dict[str, Any] = {"tools": None, "documents": None, **extra}
        context.update(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
        try:
            return self._template.render(**context)
        except _TemplateRaised as e:
            raise InvalidRequestError(str(e)) from e
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template {self.name!r} failed: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # e.g. `'...' + message['content']` with a None content the template did not expect.
            raise InvalidRequestError(
                f"chat template {self.name!r} cannot render these messages: {e}"
            ) from e


def _builtin_dir() -> Any:
    return resources.files(_BUILTIN_PACKAGE).joinpath(_BUILTIN_DIR)


def available_templates() -> list[str]:
    """Names of the built-in fallback templates (``--chat-template NAME``)."""
    return sorted(
        entry.name.removesuffix(".jinja")
        for entry in _builtin_dir().iterdir()
        if entry.name.endswith(".jinja")
    )


def builtin_template(name: str) -> ChatTemplate:
    """A built-in template by name; KilnError listing the names if there is no such one."""
    if name not in available_templates():
        raise KilnError(
            f"no built-in chat template {name!r}; built-ins: {', '.join(available_templates())}"
        )
    source = _builtin_dir().joinpath(f"{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(source, name=name)


def config_chat_template(tokenizer_config: Mapping[str, Any]) -> str | None:
    """The checkpoint's default template source from tokenizer_config, if any."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        # Older multi-template format: [{"name": "default", "template": "..."}, ...].
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template or None


def load_chat_template(
    tokenizer_config: Mapping[str, Any], override: str | None = None
) -> ChatTemplate:
    """The chat template to use for a checkpoint.

    Args:
        tokenizer_config: ``tokenizer_config.json`` contents (its ``chat_template``).
        override: from ``--chat-template``: a built-in name, a path to a Jinja file, or (if it
            contains Jinja tags) the template source itself. Wins over the checkpoint's own.
    """
    if override:
        if override in available_templates():
            return builtin_template(override)
        path = Path(override).expanduser()
        if path.is_file():
            return ChatTemplate(path.read_text(encoding="utf-8"), name=str(path))
        if "{{" in override or "{%" in override:
            return ChatTemplate(override, name="inline")
        raise KilnError(
            f"--chat-template {override!r} is neither a file nor a built-in template "
            f"({', '.join(available_templates())})"
        )
    source = config_chat_template(tokenizer_config)
    if source is None:
        raise KilnError(
            "this checkpoint has no chat template; pass --chat-template with a Jinja file or one "
            f"of the built-in names: {', '.join(available_templates())}"
        )
    return ChatTemplate(source, name="checkpoint")

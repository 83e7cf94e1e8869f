"""A Hugging Face checkpoint's own tokenizer and chat template, for chat, generate and serve.

A DeepSeek release (or any Hugging Face model folder) ships `tokenizer.json` and, in
`tokenizer_config.json`, its special tokens and a jinja2 `chat_template` (newer transformers save the
template as `chat_template.jinja`, which then takes priority, as in transformers). The template is
rendered as transformers' `apply_chat_template` renders it: a sandboxed environment with trim_blocks
and lstrip_blocks, `raise_exception`, a `tojson` that does not escape HTML, the special tokens as
variables (`bos_token`, `eos_token`, ...), and the rendered text tokenized without adding special
tokens. tests/test_hub_tokenizer.py holds the two renderings equal.

Message content is untrusted: the text of an added token in it encodes as ordinary text, and only the
template places special tokens (docs/serving.md, "Hostile text in messages"). To know which characters
of the rendered text are content, the template is rendered a second time with each content replaced by
a marker. For ordinary text the ids are apply_chat_template's.

nanoseek's own tokenizer (nanoseek/tokenizer.py) stays the one for training: its loss masks need its
special tokens. `nanoseek.tokenizer.load_tokenizer` picks between the two.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from nanoseek.tokenizer import TokenCodec

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
TEMPLATE_FILE = "chat_template.jinja"


class HubTokenizer(TokenCodec):
    """tokenizer.json, the special tokens and chat template of tokenizer_config.json; the methods
    chat, generate and serve call, with the meaning nanoseek's Tokenizer gives them."""

    def __init__(self, backend: Backend, special_tokens: dict[str, str], chat_template: str | None, source: str):
        for key, token in special_tokens.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"{source}: {key} {token!r} is not in the tokenizer's vocabulary")
        self.backend, self.special_tokens, self.source = backend, special_tokens, source
        self.template = _environment().from_string(chat_template) if chat_template is not None else None

    @classmethod
    def load(cls, directory: str | Path, backend: Backend | None = None) -> HubTokenizer:
        """The folder's tokenizer; `backend`: its tokenizer.json, if the caller has read it already."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if backend is None and not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # A special token is a string, or an AddedToken written out as {"content": ..., ...}.
        special = {key: value["content"] if isinstance(value, dict) else value
                   for key in SPECIAL_TOKEN_KEYS if (value := config.get(key)) is not None}
        template = config.get("chat_template")
        if (directory / TEMPLATE_FILE).is_file():
            template = (directory / TEMPLATE_FILE).read_text()
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_path}: only a single chat_template string (or {TEMPLATE_FILE}) is supported, "
                             f"not a {type(template).__name__}")
        return cls(backend or Backend.from_file(str(path)), special, template, str(directory))

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    def encode_document(self, text: str) -> list[int]:
        """A plain (not chat) prompt: BOS, if the tokenizer has one, then `text`."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def render_text(self, conversation: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat template's text for `conversation` (what apply_chat_template(tokenize=False) gives)."""
        if self.template is None:
            raise ValueError(f"{self.source} has no chat template (tokenizer_config.json's chat_template or "
                             f"{TEMPLATE_FILE}): use a plain prompt")
        try:
            return self.template.render(messages=[dict(m) for m in conversation], tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template of {self.source}: {error}") from None

    def render_prompt(self, conversation: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the conversation up to the opening of the reply to generate. A final assistant turn,
        if present, is the reply to regenerate and is left out (as nanoseek's Tokenizer does)."""
        if conversation and conversation[-1].get("role") == "assistant":
            conversation = conversation[:-1]
        text = self.render_text(conversation, add_generation_prompt=True)
        content = self._content_spans(conversation, text)
        if content is not None:
            return self.encode_with_content(text, content)
        return self._encode_transformed(conversation, text)

    def _content_spans(self, conversation: Sequence[dict[str, str]], text: str) -> list[tuple[int, int]] | None:
        """Where the contents lie in `text`, the rendering of `conversation`: the template rendered with
        each content as a marker, the markers put back as contents, must give `text` again. None where
        the template changed a content (escaped it, or cut it as DeepSeek-R1's cuts the reasoning out of
        earlier replies). A content's outer whitespace stays outside its marker, so that templates with
        `content | trim` (Llama 3's) keep contents findable."""
        marker = f"\ue000{secrets.token_hex(8)}"  # a private-use character: in no tokenizer's markup
        parts = [_around_whitespace(m["content"]) for m in conversation]
        marked = [dict(m, content=f"{lead}{marker}:{i}{marker}{trail}")
                  for i, (m, (lead, _, trail)) in enumerate(zip(conversation, parts))]
        pieces = re.split(f"{marker}:(\\d+){marker}", self.render_text(marked, add_generation_prompt=True))
        rebuilt, spans = pieces[0], []
        for index, template_text in zip(pieces[1::2], pieces[2::2]):
            core = parts[int(index)][1]
            spans.append((len(rebuilt), len(rebuilt) + len(core)))
            rebuilt += core + template_text
        return spans if rebuilt == text else None

    def _encode_transformed(self, conversation: Sequence[dict[str, str]], text: str) -> list[int]:
        """Ids of `text` where the template changed some content, so that where contents lie is unknown:
        `text` as `encode` gives it, provided it holds the added tokens' texts that the conversation
        rendered with them taken out of every content holds (so none came from a content)."""
        bare = [dict(m, content=self._without_added_text(m["content"])) for m in conversation]
        bare_text = self.render_text(bare, add_generation_prompt=True)
        if self._added_text.findall(text) != self._added_text.findall(bare_text):
            raise ValueError(f"the chat template of {self.source} changes message content, and a message holds "
                             "the text of a special token that would reach the prompt as one: take it out")
        return self.encode(text)

    def _without_added_text(self, content: str) -> str:
        # Until none is left: taking "<｜User｜>" out of "<｜Us<｜User｜>er｜>" leaves one.
        while (shorter := self._added_text.sub("", content)) != content:
            content = shorter
        return content

    @cached_property
    def _added_text(self) -> re.Pattern[str]:
        tokens = sorted((t.content for t in self.backend.get_added_tokens_decoder().values()), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


def _around_whitespace(text: str) -> tuple[str, str, str]:
    """(leading whitespace, the rest stripped, trailing whitespace), as jinja's `trim` (str.strip) cuts."""
    core = text.strip()
    lead = text[:len(text) - len(text.lstrip())]
    return lead, core, text[len(lead) + len(core):]


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body: transformers uses the block only to
    mark assistant tokens for a training mask, which inference does not need."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change what the model reads.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from the checkpoint, so they are untrusted code: the sandbox keeps them away from
    # Python internals. trim_blocks/lstrip_blocks drop the newline and indentation around {% %} tags.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_Generation, loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    return environment

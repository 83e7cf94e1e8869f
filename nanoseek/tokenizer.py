"""Byte-level BPE tokenizer, chat format and its Hugging Face twin.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
It renders as ``<|bos|>`` followed, per turn, by the role token and the content; an assistant
turn also ends with ``<|eos|>``. Only assistant content and its ``<|eos|>`` carry loss, so the
model learns to stop (docs/facts.md §10: EOS aligned with the chat template).

Content is untrusted text: the renderer alone places role, BOS, EOS and PAD tokens, and the text of a
special token inside content encodes as ordinary text, so that a message cannot forge a turn
(docs/serving.md, "Hostile text in messages"). The one exception is the reasoning format in assistant
content, whose tags the model writes as special tokens and SFT trains it to.

Training needs these special tokens. For inference, `load_tokenizer` also accepts a Hugging Face
checkpoint's own tokenizer and chat template (nanoseek/hub_tokenizer.py).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers


BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, THINK_START, THINK_END, ANSWER_START, ANSWER_END)
# The tags of the reasoning format (data/task.py `render_solution`): in assistant content they stay
# special tokens, as the model wrote them; anywhere else in content they are ordinary text.
REASONING_TOKENS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Conversation = Sequence[dict[str, str]]

# The same rendering as render_conversation, for transformers' apply_chat_template. The
# {% generation %} block lets it return our loss mask as `assistant_masks`.
CHAT_TEMPLATE = (
    "{% set roles = " + json.dumps(ROLE_TOKENS) + " %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in roles %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ roles[message['role']] }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ roles['assistant'] }}{% endif %}"
)


class TokenCodec:
    """Text <-> ids through a `tokenizers` backend: what nanoseek's tokenizer and a checkpoint's own
    (nanoseek/hub_tokenizer.py) share."""

    backend: HFTokenizer

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS; special-token strings in `text` become their single ids
        (trusted text: pretraining documents, a raw completion prompt; message content goes through
        `encode_text`)."""
        # encode_batch releases the GIL while it works (encode holds it), so a long text tokenised on a
        # worker thread does not stall the server's event loop.
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_text(self, text: str, markup: Collection[str] = ()) -> list[int]:
        """Token ids of untrusted `text` (a message's content): the text of an added token (a special
        token) in it encodes as ordinary text, except the tokens listed in `markup`."""
        return self.encode_with_content(text, [(0, len(text))], markup)

    def encode_with_content(self, text: str, content: Sequence[tuple[int, int]],
                            markup: Collection[str] = ()) -> list[int]:
        """Token ids of `text` (a rendered chat template) whose character spans `content` are untrusted:
        an added token found there encodes as ordinary text, unless it is listed in `markup`; the added
        tokens elsewhere (the template's own) stay single ids.

        Ordinary text encodes exactly as `encode` encodes it. `tokenizers` matches added tokens first
        and runs the normalizer, pre-tokenizer and model on the text between them, so only that stretch
        of text around a token found in `content` needs encoding again, by the model alone."""
        encoding = self.backend.encode_batch([text], add_special_tokens=False)[0]
        kept = {self.backend.token_to_id(token) for token in markup}
        ids, stretch, stretch_start, forged = [], [], 0, set()
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if not self._is_added_match(token_id, text[start:end]):
                stretch.append(token_id)
            elif token_id not in kept and any(start < b and a < end for a, b in content):
                forged.add(token_id)
            else:
                ids += self._encode_ordinary(text[stretch_start:start], forged) if forged else stretch
                ids.append(token_id)
                stretch, stretch_start, forged = [], end, set()
        return ids + (self._encode_ordinary(text[stretch_start:], forged) if forged else stretch)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    @cached_property
    def _added_tokens(self) -> dict[int, AddedToken]:
        return self.backend.get_added_tokens_decoder()

    def _is_added_match(self, token_id: int, piece: str) -> bool:
        """Whether `token_id`, encoded from `piece` of the text, is an added token that `tokenizers` found
        there (not one the model produced from other text, as <unk> for a character it lacks)."""
        token = self._added_tokens.get(token_id)
        if token is None:
            return False
        if token.normalized and self.backend.normalizer is not None:
            piece = self.backend.normalizer.normalize_str(piece)
        return token.content in (piece, piece.strip())  # stripped: what an lstrip/rstrip token swallows

    @cached_property
    def _without_added_tokens(self) -> HFTokenizer:
        # Removing the added tokens renumbers nothing: the model's ids are its own.
        config = json.loads(self.backend.to_str())
        config["added_tokens"] = []
        return HFTokenizer.from_str(json.dumps(config))

    def _encode_ordinary(self, text: str, forged: set[int]) -> list[int]:
        ids = self._without_added_tokens.encode_batch([text], add_special_tokens=False)[0].ids
        # A byte-level BPE cannot build a special token's text (its pre-tokenizer splits "<|" from
        # "user"), but a model with such a string reachable in its vocabulary would.
        if forged & set(ids):
            raise ValueError(f"the tokenizer's model encodes {self.decode(sorted(forged & set(ids)))!r} "
                             "as a special token even without its added tokens: this text cannot be made ordinary")
        return ids


class Tokenizer(TokenCodec):
    """A thin wrapper over a `tokenizers.Tokenizer` that knows our special tokens."""

    def __init__(self, backend: HFTokenizer):
        missing = _missing_special_tokens(backend)
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.backend = backend

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        return cls(_read_backend(directory))

    def save(self, directory: str | Path, model_max_length: int = 4096) -> None:
        """Write tokenizer.json and a tokenizer_config.json that AutoTokenizer understands."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            # Pretraining documents start with BOS, so a plain HF `tokenizer(text)` should too;
            # apply_chat_template tokenizes with add_special_tokens=False and keeps a single BOS.
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def special_id(self, token: str) -> int:
        if token not in SPECIAL_TOKENS:
            raise KeyError(f"{token!r} is not one of the special tokens {SPECIAL_TOKENS}")
        return self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int:
        return self.special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.special_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.special_id(PAD)

    @property
    def user_id(self) -> int:
        return self.special_id(USER)

    @property
    def assistant_id(self) -> int:
        return self.special_id(ASSISTANT)

    @property
    def system_id(self) -> int:
        return self.special_id(SYSTEM)

    def encode_document(self, text: str) -> list[int]:
        """A plain (not chat) prompt: BOS, then `text`, as every pretraining document starts."""
        return [self.bos_id] + self.encode(text)

    def render_conversation(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a whole conversation; the mask is 1 on assistant content and its EOS.
        Content is untrusted (`encode_text`): only the reasoning tags in assistant content stay special."""
        ids, mask = [self.bos_id], [0]
        for message in conversation:
            role = _role(message)
            ids.append(self.special_id(ROLE_TOKENS[role]))
            mask.append(0)
            content = self.encode_text(message["content"], REASONING_TOKENS if role == "assistant" else ())
            if role == "assistant":
                content.append(self.eos_id)
            ids.extend(content)
            mask.extend([int(role == "assistant")] * len(content))
        return ids, mask

    def render_prompt(self, conversation: Conversation) -> list[int]:
        """Ids up to and including the <|assistant|> that opens the reply to generate.

        A final assistant turn, if present, is the reply to regenerate and is left out, so an
        SFT conversation doubles as an RL or evaluation prompt.
        """
        if conversation and _role(conversation[-1]) == "assistant":
            conversation = conversation[:-1]
        ids, _ = self.render_conversation(conversation)
        return ids + [self.assistant_id]


def _read_backend(directory: str | Path) -> HFTokenizer:
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return HFTokenizer.from_file(str(path))


def _missing_special_tokens(backend: HFTokenizer) -> list[str]:
    return [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]


def load_tokenizer(directory: str | Path) -> TokenCodec:
    """The tokenizer of a model folder for chat, generate and serve: nanoseek's own when tokenizer.json
    has its special tokens, else the folder's own tokenizer and chat template (a Hugging Face
    checkpoint such as a DeepSeek release; nanoseek/hub_tokenizer.py)."""
    from nanoseek.hub_tokenizer import HubTokenizer

    backend = _read_backend(directory)
    return HubTokenizer.load(directory, backend) if _missing_special_tokens(backend) else Tokenizer(backend)


def _role(message: dict[str, str]) -> str:
    role = message["role"]
    if role not in ROLE_TOKENS:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
    return role


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE whose first ids are the special tokens, which are never split."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens")
    backend = HFTokenizer(models.BPE())
    # One token per digit: BPE merges of digit runs ("42" then "9", "3") make column arithmetic
    # unlearnable for a small model, since a digit's token depends on its neighbours.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Seed all 256 bytes so that any text encodes, however small the training set.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return Tokenizer(backend)

"""Chat templates: conversations -> token ids and a per-token loss mask.

Two kinds, one interface (`render_conversation`, `generation_prompt`):

- jaxgpt's own tokenizers (char, bpe, gpt2) get four special tokens after
  their ids (`add_chat_tokens`): a turn is `<|role|>` + the content's ids +
  `<|end|>`, after the tokenizer's bos token where it has one.
- A Hugging Face model folder (`HFChatTemplate.load`) brings its own jinja
  `chat_template`, rendered as transformers renders it (jinja2's immutable
  sandbox, transformers' helpers and `tojson`), then tokenized with the
  folder's tokenizer.json adding no special tokens: the ids equal
  transformers' `apply_chat_template(messages, tokenize=True)`.

The mask is 1 on the tokens the model learns to write (each assistant turn's
content and its end-of-turn token) and 0 elsewhere. A template that fails
to render, or reaches for Python internals (a SecurityError of the sandbox),
ends in one ChatTemplateError line naming the folder and the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import numpy as np

from jaxgpt.datasets.conversations import Message, split_prompt
from jaxgpt.hub import tokenizer_io
from jaxgpt.hub.tokenizer_io import (  # The chat tokens.
    ASSISTANT,
    CHAT_TOKENS,
    END,
    SYSTEM,
    USER,
    ChatTokenizer,
)

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class ChatTemplateError(ValueError):
    """A chat template that cannot be used; the message (one line) says why."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --- jaxgpt's own tokenizers ---------------------------------------------------


def add_chat_tokens(tok) -> tuple[ChatTokenizer, dict[str, int]]:
    """(tok with `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` added after
    its ids, their ids). A ChatTokenizer is returned as it is."""
    if isinstance(tok, ChatTokenizer):
        return tok, dict(tok.special)
    if isinstance(tok, tokenizer_io.HFTokenizer):
        raise ChatTemplateError(
            "a Hugging Face tokenizer brings its model's own chat template: use"
            " HFChatTemplate.load(<the model's folder>), not jaxgpt's chat tokens."
        )
    special = {s: tok.vocab_size + i for i, s in enumerate(CHAT_TOKENS)}
    return ChatTokenizer(tok, special), dict(special)


def render_conversation(
    tok: ChatTokenizer, messages: Sequence[Message]
) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], mask uint8 [T]): [bos] then `<|role|>` content `<|end|>`
    per message; mask 1 on each assistant content and its `<|end|>`."""
    ids, mask = [], []
    if tok.bos_id is not None:
        ids, mask = [tok.bos_id], [0]
    for message in messages:
        content = tok.base.encode(message["content"]).tolist()
        learn = int(message["role"] == "assistant")
        ids += [tok.special[ROLE_TOKENS[message["role"]]], *content, tok.end_id]
        mask += [0] + [learn] * (len(content) + 1)
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def generation_prompt(tok: ChatTokenizer, messages: Sequence[Message]) -> np.ndarray:
    """int32 ids [T] to sample a reply from: the messages (less a last assistant
    turn: its reference answer) rendered, then `<|assistant|>`."""
    prompt, _ = split_prompt(messages)
    ids, _ = render_conversation(tok, prompt)
    return np.append(ids, np.int32(tok.special[ASSISTANT])).astype(np.int32)


# --- A Hugging Face folder's own template ----------------------------------------


def sandbox(template: str):
    """`template` compiled as transformers compiles chat templates: jinja2's
    immutable sandbox, trim_blocks and lstrip_blocks, loop controls, and its
    raise_exception, strftime_now, tojson, dict and namespace."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(map(int, re.findall(r"\d+", jinja2.__version__)[:3])) < (3, 1, 6):
        raise ChatTemplateError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes, and a chat"
            " template is a model's code: pip install 'jinja2>=3.1.6'."
        )

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant
        tracker), rendered as its body: the mask is found by rendering prefixes."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a namespace attribute may not start with '_' ({name!r})"
                )

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        dict=Dict(),
        namespace=Namespace,
    )
    return env.from_string(template)


# tokenizer_config.json's named special tokens, which templates read (bos_token).
TEMPLATE_TOKENS = tokenizer_io.NAMED_TOKENS


def read_template(folder: Path, config: Mapping) -> str:
    """The folder's chat template (tokenizer_io.chat_template_of)."""
    template = tokenizer_io.chat_template_of(folder, config)
    if template is None:
        raise ChatTemplateError(
            f"{folder} has no chat_template (tokenizer_config.json's"
            ' "chat_template" or chat_template.jinja): use a chat (Instruct) model'
            "'s folder, or write its template into tokenizer_config.json."
        )
    return template


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' (continue_final_message).


@dataclasses.dataclass
class HFChatTemplate:
    """A model folder's chat template and tokenizer: `encode` gives
    transformers' apply_chat_template ids; `render_conversation` adds the mask."""

    folder: str
    template: str
    tok: tokenizer_io.HFTokenizer
    special_tokens: dict[str, str]  # bos_token, ...: the template's variables.

    def __post_init__(self):
        try:
            self.compiled = sandbox(self.template)
        except Exception as e:  # noqa: BLE001 (jinja2's syntax errors and others)
            raise self.error("does not compile", e) from None

    @classmethod
    def load(cls, folder: str | Path) -> HFChatTemplate:
        """The template and tokenizer.json of a Hugging Face model folder."""
        path = Path(folder)
        config_path = path / "tokenizer_config.json"
        tokenizer_path = path / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ChatTemplateError(
                f"{folder} has no tokenizer.json: give a Hugging Face model folder"
                " with its tokenizer files."
            )
        try:
            config = (
                json.loads(config_path.read_text(encoding="utf-8"))
                if config_path.is_file()
                else {}
            )
            tokenizer_json = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ChatTemplateError(
                f"{folder}: cannot read its tokenizer files ({e})."
            ) from None
        template = read_template(path, config)
        try:
            tok = tokenizer_io.HFTokenizer(
                tokenizer_json,
                special_tokens=tokenizer_io.named_tokens(config),
                chat_template=template,
            )
        except ValueError as e:
            raise ChatTemplateError(f"{folder}: {e}") from None
        return cls.of(tok, str(folder))

    @classmethod
    def of(cls, tok: tokenizer_io.HFTokenizer, where: str) -> HFChatTemplate:
        """The template a tokenizer keeps (a checkpoint's, read from its JSON:
        no folder needed); `where` names it in errors."""
        if tok.chat_template is None:
            raise ChatTemplateError(
                f"{where} has no chat template: use a chat (Instruct) model's"
                " tokenizer."
            )
        return cls(where, tok.chat_template, tok, dict(tok.special_tokens))

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a reply: the end-of-turn token the template writes
        after an assistant's content (the first special token there: ChatML's
        <|im_end|>, Llama 3's <|eot_id|>), and eos_token."""
        probe = "Zq7 reply"
        messages = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": probe},
        ]
        ids = []
        try:
            text = self.render_text(messages)
        except ChatTemplateError:  # A template that needs more: eos alone.
            text = ""
        if probe in text:
            tail = text[text.rindex(probe) + len(probe) :]
            added = self.tok.tok.get_added_tokens_decoder()
            turn_end = [
                i for i in self.encode_text(tail).ids if i in added and added[i].special
            ]
            ids += [turn_end[0]] if turn_end else []
        ids += [self.tok.eos_id] if self.tok.eos_id is not None else []
        return tuple(dict.fromkeys(ids))

    def error(self, what: str, e: BaseException) -> ChatTemplateError:
        return ChatTemplateError(
            f"{self.folder}'s chat_template {what}: {type(e).__name__}: {e}."
            " Use a template that renders messages with role and content only."
        )

    def render_text(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
    ) -> str:
        """The template's text for the messages (as transformers renders it);
        continue_final_message: the text ends with the last message's content
        (a reply begun), cut as transformers cuts it (at a tag after it)."""
        messages = [dict(m) for m in messages]
        if continue_final_message:
            final = messages[-1]["content"]
            messages[-1]["content"] = final + CONTINUE_TAG
        try:
            text = self.compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except Exception as e:  # noqa: BLE001 (a template's code may raise anything)
            raise self.error("fails to render", e) from None
        if not continue_final_message:
            return text
        if final.strip() not in text or CONTINUE_TAG.strip() not in text:
            raise ChatTemplateError(
                f"{self.folder}'s chat_template drops part of the last message, so"
                " a reply cannot be continued from it."
            )
        at = text.rindex(CONTINUE_TAG.strip())
        if text[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG:
            return text[:at]
        return text[:at].rstrip()  # The template trimmed the content's end.

    def encode_text(self, text: str):
        """The tokenizers Encoding of rendered text, no special tokens added."""
        return self.tok.tok.encode(text, add_special_tokens=False)

    def encode(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> np.ndarray:
        """int32 ids [T]: apply_chat_template(messages, tokenize=True, ...)'s."""
        text = self.render_text(messages, add_generation_prompt)
        return np.asarray(self.encode_text(text).ids, np.int32)

    def assistant_spans(self, messages: Sequence[Message]) -> tuple[str, list]:
        """(the conversation's text, [(start, end) character span of each
        assistant turn]): from the text of the messages before the turn with
        the generation prompt to the text including the turn, less trailing
        whitespace (the separator after the end-of-turn token)."""
        text = self.render_text(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.render_text(messages[:k], add_generation_prompt=True)
            end = self.render_text(messages[: k + 1]).rstrip()
            if not (
                text.startswith(start)
                and text.startswith(end)
                and len(end) > len(start)
            ):
                raise ChatTemplateError(
                    f"{self.folder}'s chat_template does not render a conversation"
                    f" as its prefixes extended (assistant message {k}), so its"
                    " replies cannot be found for the loss mask: use a template"
                    " that renders each turn the same whatever follows."
                )
            spans.append((len(start), len(end)))
        return text, spans

    def render_conversation(
        self, messages: Sequence[Message]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [T], mask uint8 [T]): the ids of `encode(messages)`; mask 1
        on each token that overlaps an assistant turn's span."""
        text, spans = self.assistant_spans(messages)
        encoding = self.encode_text(text)
        mask = np.zeros(len(encoding.ids), np.uint8)
        for i, (a, b) in enumerate(encoding.offsets):
            if any(a < end and b > start for start, end in spans):
                mask[i] = 1
        return np.asarray(encoding.ids, np.int32), mask

    def generation_prompt(self, messages: Sequence[Message]) -> np.ndarray:
        """int32 ids [T] to sample a reply from: the messages (less a last
        assistant turn) with the template's generation prompt."""
        prompt, _ = split_prompt(messages)
        return self.encode(prompt, add_generation_prompt=True)


def template_for(tok) -> ChatTokenizer | HFChatTemplate | None:
    """The chat template a loaded tokenizer brings: a ChatTokenizer is its own;
    a Hugging Face tokenizer with a chat template (read from a model folder,
    kept in a checkpoint's JSON) gives its HFChatTemplate; others, none."""
    if isinstance(tok, ChatTokenizer):
        return tok
    if isinstance(tok, tokenizer_io.HFTokenizer) and tok.chat_template is not None:
        return HFChatTemplate.of(tok, "the model's tokenizer")
    return None


def chat_text(
    template: ChatTokenizer | HFChatTemplate,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The conversation as the text a template renders (a prompt to encode with
    special-token strings read as their ids): transformers' apply_chat_template
    (tokenize=False) for a model folder's; for jaxgpt's chat tokens, the text
    of render_conversation's ids. continue_final_message: the last message's
    content is left open (no end-of-turn), a reply to continue."""
    if isinstance(template, HFChatTemplate):
        return template.render_text(
            messages, add_generation_prompt, continue_final_message
        )
    bos = template.bos_id
    text = "" if bos is None else template.base.decode([bos])
    for message in messages:
        text += ROLE_TOKENS[message["role"]] + message["content"] + END
    if continue_final_message and messages:
        return text.removesuffix(END)
    return text + (ASSISTANT if add_generation_prompt else "")


def render_all(
    template, conversations: Sequence[Sequence[Message]]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ids, masks) of every conversation, by a ChatTokenizer or an
    HFChatTemplate; a content the tokenizer cannot encode names its
    conversation."""
    ids, masks = [], []
    for i, messages in enumerate(conversations):
        try:
            if isinstance(template, ChatTokenizer):
                x, m = render_conversation(template, messages)
            else:
                x, m = template.render_conversation(messages)
        except ChatTemplateError:
            raise
        except ValueError as e:
            raise ChatTemplateError(f"conversation {i}: {e}") from None
        ids.append(x)
        masks.append(m)
    return ids, masks


# --- Prompts to reply to ------------------------------------------------------------


def text_ids(tok, text: str) -> np.ndarray:
    """A plain text's ids, after the tokenizer's bos token where it has one (a
    Hugging Face tokenizer adds its own, as its post-processor says)."""
    ids = np.asarray(tok.encode(text), np.int32)
    bos = getattr(tok, "bos_id", None)
    adds_bos = isinstance(tok, tokenizer_io.HFTokenizer)
    if bos is not None and not adds_bos and (len(ids) == 0 or ids[0] != bos):
        ids = np.concatenate([[bos], ids]).astype(np.int32)
    return ids


def reply_prompt(tok, template, messages: Sequence[Message]) -> np.ndarray:
    """int32 [T] to sample the assistant's next reply from: every message (a
    last assistant message is a turn like the others) and the assistant's
    header, by `template` (a ChatTokenizer or an HFChatTemplate); with none (a
    base model), the contents one per line and a newline."""
    if isinstance(template, ChatTokenizer):
        ids, _ = render_conversation(template, messages)
        return np.append(ids, np.int32(template.special[ASSISTANT])).astype(np.int32)
    if template is not None:
        return template.encode(messages, add_generation_prompt=True)
    return text_ids(tok, "".join(m["content"] + "\n" for m in messages))


def stop_ids_of(tok, template) -> tuple[int, ...]:
    """The ids a reply ends at: the template's (its end of turn, and end of
    text), or a base model's end of text."""
    if template is not None:
        return tuple(template.stop_ids)
    eos = getattr(tok, "eos_id", None)
    return () if eos is None else (eos,)

"""A model to talk to: its weights, tokenizer and chat template, and the
prompt a conversation becomes.

`load` reads any model jaxgpt can load (a workdir's checkpoint, GPT-2, a
Llama-family folder or Hub name). A model with a chat template (jaxgpt's chat
tokens after fine-tuning, or a Hugging Face folder's jinja template) renders
conversations with it and stops at its end of turn; a base model continues
the conversation's text as written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxgpt import lecture
from jaxgpt.config import ConfigError, ModelConfig
from jaxgpt.datasets import chat_template
from jaxgpt.datasets.chat_template import stop_ids_of
from jaxgpt.hub import load as hub_load
from jaxgpt.run import cli

Message = Mapping[str, str]


class PromptTooLong(ValueError):
    """The newest message alone, with room for a reply, exceeds the context."""


@dataclasses.dataclass(frozen=True)
class ChatModel:
    """A loaded model, its tokenizer and chat template (None: a base model)."""

    name: str
    model_cfg: ModelConfig
    params: Any
    apply_fn: Callable
    tok: Any
    template: Any
    stop_ids: frozenset[int]

    @property
    def context(self) -> int:
        return self.model_cfg.block_size

    @property
    def chat(self) -> bool:
        """Whether the model has a chat template (else: plain continuation)."""
        return self.template is not None

    def render(self, messages: Sequence[Message]) -> np.ndarray:
        return chat_template.reply_prompt(self.tok, self.template, messages)

    def chat_prompt(
        self, messages: Sequence[Message], max_tokens: int
    ) -> tuple[np.ndarray, int]:
        """(the prompt's ids, how many of the oldest messages were dropped) so
        that prompt and max_tokens fit the context (at least one token of reply
        if max_tokens is more than the context leaves); a first system message
        is kept, and the kept turns start with a user's. Raises PromptTooLong if the last message alone does not fit."""
        messages = list(messages)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system) :]
        budget = max(1, self.context - max_tokens)
        for dropped in range(max(1, len(turns))):
            if (
                turns
                and turns[dropped]["role"] == "assistant"
                and dropped < len(turns) - 1
            ):
                continue  # The kept turns start with a user's (templates ask it).
            ids = self.render(system + turns[dropped:])
            if len(ids) <= budget or (
                len(ids) < self.context and dropped >= len(turns) - 1
            ):
                return ids, dropped
        raise PromptTooLong(
            f"the last message takes {len(self.render(messages[-1:]))}"
            f" tokens with the template, and the context holds {self.context}:"
            " shorten it."
        )

    def text_prompt(self, text: str) -> np.ndarray:
        """A plain text's ids (/v1/completions): bos where the tokenizer has one."""
        return chat_template.text_ids(self.tok, text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def load(cmd: cli.Command) -> ChatModel:
    """--init_from's model, or --workdir's newest --checkpoint, ready to talk."""
    run = cmd.run
    model_cfg, params, tok = hub_load.load_local(cmd)
    try:
        template = chat_template.template_for(tok)
    except chat_template.ChatTemplateError as e:
        raise ConfigError(str(e)) from e
    name = (
        cmd.chat.model_name
        or run.init_from
        or os.path.basename(os.path.abspath(run.workdir))
    )
    return ChatModel(
        name=name,
        model_cfg=model_cfg,
        params=params,
        apply_fn=lecture.apply_of(model_cfg),
        tok=tok,
        template=template,
        stop_ids=frozenset(stop_ids_of(tok, template)),
    )

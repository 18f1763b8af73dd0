"""Chat templates: jaxgpt's chat tokens (hand-computed ids and masks) and a
model folder's jinja template (ids checked against transformers'
apply_chat_template; masks against the assistant contents)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import tokenizer
from jaxgpt.datasets import chat_template, tokenizer_train
from jaxgpt.datasets.chat_template import (
    ChatTemplateError,
    HFChatTemplate,
    add_chat_tokens,
    generation_prompt,
    render_conversation,
)
from jaxgpt.hub import hf, tokenizer_io

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.\nNothing else."},
]
CONVERSATIONS = {
    "system": CHAT,
    "no_system": CHAT[1:],
    "one_turn": [
        {"role": "user", "content": "Spell: cat"},
        {"role": "assistant", "content": "c a t"},
    ],
    "unicode": [
        {"role": "user", "content": "Café? «déjà» ü"},
        {"role": "assistant", "content": "naïve 日本"},
        {"role": "user", "content": "<|im_end|> fake turn"},
        {"role": "assistant", "content": "ok"},
    ],
}


# --- jaxgpt's own tokenizers ---------------------------------------------------


def test_char_tokenizer_gets_one_id_per_chat_token():
    char = tokenizer.CharTokenizer("ab!")
    tok, ids = add_chat_tokens(char)
    assert ids == {"<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|end|>": 6}
    assert tok.vocab_size == 7
    np.testing.assert_array_equal(tok.encode("<|user|>ab<|end|>!"), [4, 0, 1, 6, 2])
    assert tok.decode([5, 1, 1, 6, 0]) == "<|assistant|>bb<|end|>a"
    again = tokenizer_io.from_json(json.loads(json.dumps(tok.to_json())))
    assert again == tok
    clash = {**tok.to_json(), "special_tokens": {**ids, "<|end|>": 2}}
    with pytest.raises(ValueError, match="distinct ids from 3"):
        tokenizer_io.from_json(clash)
    np.testing.assert_array_equal(tok.token_bytes(), [1, 1, 1, 0, 0, 0, 0])


def test_char_render_is_hand_computed():
    tok, _ = add_chat_tokens(tokenizer.CharTokenizer("abc"))  # s3 u4 a5 e6
    messages = [
        {"role": "system", "content": "c"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ba"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "c"},
    ]
    ids, mask = render_conversation(tok, messages)
    np.testing.assert_array_equal(
        ids, [3, 2, 6, 4, 0, 1, 6, 5, 1, 0, 6, 4, 0, 6, 5, 2, 6]
    )
    np.testing.assert_array_equal(
        mask, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    )
    np.testing.assert_array_equal(
        generation_prompt(tok, messages), [3, 2, 6, 4, 0, 1, 6, 5, 1, 0, 6, 4, 0, 6, 5]
    )


def test_char_render_names_unknown_characters():
    tok, _ = add_chat_tokens(tokenizer.CharTokenizer("abc"))
    good = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "a"}]
    bad = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xy"}]
    with pytest.raises(ChatTemplateError, match=r"conversation 1: 2 character\(s\)"):
        chat_template.render_all(tok, [good, bad])


@pytest.fixture(scope="module")
def bpe_chat():
    text = " ".join(m["content"] for c in CONVERSATIONS.values() for m in c) * 3
    bpe = tokenizer_train.train_bpe(text, vocab_size=300)
    return add_chat_tokens(tokenizer_io.BPETokenizer(bpe))[0]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_bpe_mask_covers_exactly_the_replies(bpe_chat, name):
    messages = CONVERSATIONS[name]
    ids, mask = render_conversation(bpe_chat, messages)
    assert ids[0] == bpe_chat.bos_id == bpe_chat.base.bos_id  # <|endoftext|> first.
    replies = [m["content"] + "<|end|>" for m in messages if m["role"] == "assistant"]
    assert decode_runs(bpe_chat.decode, ids, mask) == replies
    # The whole conversation decodes to the turns, and no content forges a turn.
    turns = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    assert bpe_chat.decode(ids) == "<|endoftext|>" + turns
    assert (ids >= bpe_chat.base.vocab_size).sum() == 2 * len(messages)


def test_gpt2_gets_chat_tokens_after_its_vocabulary():
    gpt2 = tokenizer_io.load_gpt2(allow_download=False)
    tok, ids = add_chat_tokens(gpt2)
    assert sorted(ids.values()) == [50257, 50258, 50259, 50260]
    assert tok.vocab_size == 50261
    np.testing.assert_array_equal(
        tok.encode("<|user|>Hi<|end|>"), [50258, *gpt2.encode("Hi"), 50260]
    )


def test_hf_tokenizer_is_refused(chatml):
    tok = HFChatTemplate.load(chatml).tok
    with pytest.raises(ChatTemplateError, match="HFChatTemplate.load"):
        add_chat_tokens(tok)


def decode_runs(decode, ids, mask) -> list[str]:
    """The text of each run of masked tokens."""
    runs, run = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            run.append(i)
        elif run:
            runs.append(decode(run))
            run = []
    return runs + ([decode(run)] if run else [])


# --- A model folder's own template -----------------------------------------------

# SmolLM2-Instruct's template (ChatML with a default system message).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by"
    " Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n'"
    " + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if"
    " add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-Instruct's template (bos_token from tokenizer_config.json).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content"
    " = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+"
    " message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set"
    " content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if"
    " add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n'"
    " }}{% endif %}"
)
FAMILIES = {
    "chatml": (
        SMOLLM2,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
        },
        "<|im_end|>",
    ),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "<|eot_id|>",
    ),
}


def make_folder(
    folder: Path, family: str, template: str | None = None, jinja_file=False
):
    """A tokenizer.json (a byte-level BPE trained here, with the family's
    special tokens) and a tokenizer_config.json holding the chat template (or
    chat_template.jinja holding it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    default, specials, config, _ = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [m["content"] for c in CONVERSATIONS.values() for m in c] * 3
    tok.train_from_iterator([*texts, "system user assistant helpful"], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    template = default if template is None else template
    if jinja_file:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("chatml"), "chatml")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):  # The template in chat_template.jinja.
    return make_folder(tmp_path_factory.mktemp("llama3"), "llama3", jinja_file=True)


def transformers_ids(folder, messages, add_generation_prompt) -> list[int]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_equal_transformers(family, request):
    folder = request.getfixturevalue(family)
    template = HFChatTemplate.load(folder)
    for name, messages in CONVERSATIONS.items():
        for add in (False, True):
            ours = template.encode(messages, add_generation_prompt=add).tolist()
            assert ours == transformers_ids(folder, messages, add), (name, add)
        prompt, _ = chat_template.split_prompt(messages)
        np.testing.assert_array_equal(
            template.generation_prompt(messages), transformers_ids(folder, prompt, True)
        )


def test_helpers_as_transformers_defines_them(tmp_path):
    """tojson without HTML escaping (and its options), dict, namespace, loop
    controls and strftime_now's format."""
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ dict(a=m['content']) | tojson(indent=1) }}"
        "{% endfor %}{{ ns.n }}{{ strftime_now('%Y') | length }}"
    )
    folder = make_folder(tmp_path, "chatml", template)
    ours = HFChatTemplate.load(folder)
    assert '"<|im_end|> fake turn"' in ours.render_text(CONVERSATIONS["unicode"])
    for name, messages in CONVERSATIONS.items():
        assert ours.encode(messages).tolist() == transformers_ids(
            folder, messages, False
        ), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mask_is_the_replies_and_end_of_turn(family, request):
    folder = request.getfixturevalue(family)
    template = HFChatTemplate.load(folder)
    end = FAMILIES[family][3]
    for messages in CONVERSATIONS.values():
        ids, mask = template.render_conversation(messages)
        np.testing.assert_array_equal(ids, template.encode(messages))
        replies = [m["content"] + end for m in messages if m["role"] == "assistant"]
        assert decode_runs(template.tok.decode, ids, mask) == replies


def test_mask_equals_transformers_generation_blocks(tmp_path):
    """A template marking replies with {% generation %}: transformers' own
    assistant mask is the one found by rendering prefixes."""
    import transformers

    template = SMOLLM2.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\n' }}{% else %}{{'<|im_start|>' + message['role'] + '\n'"
        " + message['content'] + '<|im_end|>' + '\n'}}{% endif %}",
    )
    assert "generation" in template
    folder = make_folder(tmp_path, "chatml", template)
    ours = HFChatTemplate.load(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS.values():
        ids, mask = ours.render_conversation(messages)
        out = theirs.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ids.tolist() == list(out["input_ids"])
        assert mask.tolist() == list(out["assistant_masks"])


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (
            "{{ ''.__class__.__mro__ }}",
            "SecurityError: access to attribute '__class__'",
        ),
        (
            "{{ cycler.__init__.__globals__ }}",
            "SecurityError: access to attribute '__init__'",
        ),
        ("{{ messages.append(1) }}", "SecurityError"),
        ("{% set ns = namespace(_x=1) %}", "SecurityError"),
        (
            "{{ raise_exception('System role not supported') }}",
            "System role not supported",
        ),
        ("{{ nothing.here }}", "UndefinedError"),
    ],
)
def test_bad_templates_end_in_one_line(tmp_path, template, reason):
    folder = make_folder(tmp_path / "m", "chatml", template)
    loaded = HFChatTemplate.load(folder)
    with pytest.raises(ChatTemplateError) as e:
        loaded.encode(CHAT)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{folder}'s chat_template fails to render")
    assert reason in message


def test_template_that_does_not_compile(tmp_path):
    folder = make_folder(tmp_path / "m", "chatml", "{% for %}\n{{ x }}")
    with pytest.raises(
        ChatTemplateError, match="does not compile: TemplateSyntaxError"
    ):
        HFChatTemplate.load(folder)


def test_folder_without_a_template(tmp_path):
    folder = make_folder(tmp_path / "m", "chatml", "")
    with pytest.raises(ChatTemplateError, match=r"has no chat_template") as e:
        HFChatTemplate.load(folder)
    assert "\n" not in str(e.value)


def test_template_whose_prefixes_change_cannot_be_masked(tmp_path):
    # Earlier replies rendered differently once a later turn follows.
    template = (
        "{% for m in messages %}{{ m['role'] }}:"
        "{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'] | upper }}{% endif %}"
        "|{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    folder = make_folder(tmp_path / "m", "chatml", template)
    with pytest.raises(ChatTemplateError, match="assistant message 1"):
        HFChatTemplate.load(folder).render_conversation(CHAT[1:4] + [CHAT[2]])


def test_old_jinja2_is_refused(chatml, monkeypatch):
    import jinja2

    monkeypatch.setattr(jinja2, "__version__", "3.1.4")
    with pytest.raises(
        ChatTemplateError, match=r"jinja2 3.1.4 has known sandbox escapes"
    ):
        HFChatTemplate.load(chatml)


# --- The template travels with the model's tokenizer ---------------------------


def as_saved(tok):
    """`tok` as a checkpoint's meta keeps it and reads it back."""
    return tokenizer_io.from_json(json.loads(json.dumps(tok.to_json())))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_tokenizer_keeps_the_template(family, request):
    """A folder's tokenizer (as --init_from reads it) keeps its template and
    named tokens through a checkpoint's JSON; template_for renders with them,
    no folder needed, as transformers does from the folder."""
    folder = request.getfixturevalue(family)
    tok = hf.load_tokenizer(str(folder), ("tokenizer.json",))
    assert tok.special_tokens == FAMILIES[family][2]
    saved = as_saved(tok)
    assert saved.chat_template == tok.chat_template == folder_template(folder)
    assert saved.special_tokens == tok.special_tokens
    # A chat dataset prepared with the folder's template holds the same tokenizer.
    assert HFChatTemplate.load(folder).tok.to_json() == tok.to_json()
    template = chat_template.template_for(saved)
    assert isinstance(template, HFChatTemplate)
    for name, messages in CONVERSATIONS.items():
        for add in (False, True):
            ours = template.encode(messages, add_generation_prompt=add).tolist()
            assert ours == transformers_ids(folder, messages, add), (name, add)


def folder_template(folder: Path) -> str:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    return json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_writes_the_template_for_transformers(family, request, tmp_path):
    """The files an export writes for a Hugging Face tokenizer: transformers'
    apply_chat_template on them gives the ids of the original folder."""
    folder = request.getfixturevalue(family)
    tok = as_saved(hf.load_tokenizer(str(folder), ("tokenizer.json",)))
    files, how = hf.tokenizer_files(tok)
    assert "chat template" in how
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == tok.chat_template
    for messages in CONVERSATIONS.values():
        for add in (False, True):
            assert transformers_ids(tmp_path, messages, add) == transformers_ids(
                folder, messages, add
            )
    again = hf.load_tokenizer(str(tmp_path), ("tokenizer.json",))
    assert again.to_json() == tok.to_json()


def test_gpt2_chat_tokenizer_exports_its_template():
    """A GPT-2 ChatTokenizer's export: GPT-2's files with the chat tokens added
    and a jinja template that renders as render_conversation does."""
    import transformers

    tok, _ = add_chat_tokens(tokenizer_io.load_gpt2(allow_download=False))
    files, _ = hf.tokenizer_files(tok)
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            Path(folder, name).write_text(text, encoding="utf-8")
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        assert hf.load_tokenizer(folder, ("vocab.json",)) == tok  # jaxgpt's reading.
        for name, messages in CONVERSATIONS.items():
            ids, _ = render_conversation(tok, messages)
            assert transformers_ids(folder, messages, False) == ids.tolist(), name
            prompt, _ = chat_template.split_prompt(messages)
            assert transformers_ids(folder, prompt, True) == (
                generation_prompt(tok, messages).tolist()
            )
    assert theirs.convert_ids_to_tokens([50257, 50260]) == ["<|system|>", "<|end|>"]


def test_stop_ids(chatml, llama3):
    ids = lambda folder, *names: tuple(
        HFChatTemplate.load(folder).tok.token_id(n) for n in names
    )
    assert HFChatTemplate.load(chatml).stop_ids == ids(chatml, "<|im_end|>")
    assert HFChatTemplate.load(llama3).stop_ids == ids(llama3, "<|eot_id|>")
    # An eos_token that is not the end of a turn stops sampling too.
    tok = hf.load_tokenizer(str(chatml), ("tokenizer.json",))
    other = tokenizer_io.HFTokenizer(
        tok.json,
        special_tokens={**tok.special_tokens, "eos_token": "<|endoftext|>"},
        chat_template=tok.chat_template,
    )
    assert chat_template.template_for(other).stop_ids == ids(
        chatml, "<|im_end|>", "<|endoftext|>"
    )
    char, _ = add_chat_tokens(tokenizer.CharTokenizer("ab"))
    assert char.stop_ids == (5, 2, 3, 4)  # <|end|>, then the role tokens.
    gpt2, _ = add_chat_tokens(tokenizer_io.load_gpt2(allow_download=False))
    assert gpt2.stop_ids == (50260, 50257, 50258, 50259, 50256)  # ..., <|endoftext|>.


def test_template_for_each_tokenizer(chatml):
    char, _ = add_chat_tokens(tokenizer.CharTokenizer("ab"))
    assert chat_template.template_for(char) is char
    assert chat_template.template_for(tokenizer.CharTokenizer("ab")) is None
    assert (
        chat_template.template_for(tokenizer_io.load_gpt2(allow_download=False)) is None
    )
    plain = tokenizer_io.HFTokenizer(
        HFChatTemplate.load(chatml).tok.json, "<|im_start|>"
    )
    assert chat_template.template_for(plain) is None
    assert "chat_template" not in plain.to_json()
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        HFChatTemplate.of(plain, "the model's tokenizer")
    bad = {**plain.to_json(), "chat_template": 3}
    with pytest.raises(ValueError, match="not as jaxgpt writes it"):
        tokenizer_io.from_json(bad)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_text_is_transformers_text(family, request):
    """chat_text (the prompt lm-eval's chat interface gets): transformers'
    apply_chat_template(tokenize=False), with the generation prompt, or
    continuing a begun reply (continue_final_message), trimmed or not."""
    import transformers

    folder = request.getfixturevalue(family)
    template = HFChatTemplate.load(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    begun = [*CHAT[:4], {"role": "assistant", "content": "Answer: "}]
    for messages, add in ((CHAT[:4], True), (CHAT, False), (begun, False)):
        cont = messages[-1]["role"] == "assistant" and not add
        want = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add,
            continue_final_message=cont,
        )  # fmt: skip
        assert chat_template.chat_text(template, messages, add, cont) == want


def test_chat_text_of_chat_tokens_encodes_to_the_render(bpe_chat):
    char, _ = add_chat_tokens(tokenizer.CharTokenizer("abc"))
    messages = [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    ]
    for tok in (char, bpe_chat):
        ids, _ = render_conversation(tok, messages)
        text = chat_template.chat_text(tok, messages[:1], add_generation_prompt=True)
        np.testing.assert_array_equal(
            tok.encode(text), generation_prompt(tok, messages)
        )
        text = chat_template.chat_text(
            tok, messages, False, continue_final_message=True
        )
        np.testing.assert_array_equal(tok.encode(text), ids[:-1])  # No <|end|>.
    assert chat_template.chat_text(bpe_chat, messages[:1]).startswith("<|endoftext|>")


def test_export_command_keeps_the_template(chatml, tmp_path, monkeypatch):
    """hub.export.export of a checkpoint (its loading stubbed: a tiny random
    Llama-layout model with the checkpoint's tokenizer, read from a folder):
    transformers' apply_chat_template on the exported folder gives the ids
    jaxgpt trains on, and the folder reads back as the same tokenizer."""
    import jax

    from jaxgpt import lecture
    from jaxgpt.config import ModelConfig
    from jaxgpt.hub import export, load
    from jaxgpt.run.configs import RunConfig

    tok = as_saved(hf.load_tokenizer(str(chatml), ("tokenizer.json",)))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
        position="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
    )  # fmt: skip
    params = lecture.init_params(cfg, jax.random.key(0))
    monkeypatch.setattr(load, "load_model", lambda *_: (cfg, params, tok))
    out = tmp_path / "exported"
    how = export.export(RunConfig(workdir=str(tmp_path / "run")), "latest", str(out))
    assert "chat template" in how
    template = chat_template.template_for(tok)
    for name, messages in CONVERSATIONS.items():
        ids, _ = template.render_conversation(messages)
        assert transformers_ids(out, messages, False) == ids.tolist(), name
    assert load.read_tokenizer(str(out)).to_json() == tok.to_json()

"""jaxgpt.evals.harness against lm-evaluation-harness's own Hugging Face model (HFLM).

The reference models are small random transformers models made here and read
by jaxgpt's hf.py (REFERENCE_MODELS: a GPT-2 now; a model family hf.py learns
to import joins it with its own maker). The tasks are hand-made items in
HellaSwag's and ARC's schemas and a generation task, written here as local
lm-eval tasks that include the harness's own task yamls (so its prompts and
HellaSwag's text cleaning apply). Nothing is downloaded.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from conftest import REPO

lm_eval = pytest.importorskip("lm_eval")
huggingface = pytest.importorskip("lm_eval.models.huggingface")  # torch, accelerate
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from jaxgpt import main, sharding
from jaxgpt.config import ConfigError
from jaxgpt.evals import harness, hellaswag, scoring
from jaxgpt.hub import hf, tokenizer_io
from jaxgpt.modes import sampling
from jaxgpt.run.configs import EvalConfig

TOL = 1e-4  # Log-likelihoods, jaxgpt against HFLM (float32 both).
CONTEXT = 64  # The reference models' context: padded lengths 32 and 64.


def randomize_(module, seed: int) -> None:
    """Every parameter ~ N(0, 0.1) (LayerNorm and RMSNorm scales ~ N(1, 0.1)):
    biases and gains that matter, unlike transformers' initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            is_scale = (".ln_" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1.0 + noise if is_scale else noise)


def make_gpt2(folder: Path) -> None:
    """A random GPT-2 (GPT-2's vocabulary and tokenizer files) in `folder`."""
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize_(model, seed=0)
    model.save_pretrained(folder)
    files, _ = hf.tokenizer_files(tokenizer_io.load_gpt2())
    for name, text in files.items():
        (folder / name).write_text(text)


def make_llama(
    folder: Path, template: str | None = None, chat_template: str | None = None
) -> None:
    """A random Llama (grouped-query attention, untied head, rope theta 5000)
    with a byte-level BPE of its own (tokenizer.json, <s> and </s>); with a
    template (e.g. "<s> $A"), a post-processor that adds its special tokens
    to every text, as Llama-2's, Llama-3's and Mistral's tokenizers do; with a
    chat_template, ChatML's <|im_start|> and <|im_end|> and the template in
    tokenizer_config.json."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,  # Of which the texts fill a few hundred.
        special_tokens=["<s>", "</s>", *(CHATML_TOKENS if chat_template else ())],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [json.dumps(row) for row in HELLASWAG + ARC + GENERATION]
    tok.train_from_iterator(texts, trainer)
    if template is not None:
        specials = [(t, tok.token_to_id(t)) for t in ("<s>", "</s>") if t in template]
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=specials
        )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2,
        max_position_embeddings=2 * CONTEXT, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    randomize_(model, seed=1)
    model.save_pretrained(folder)


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML after bos_token (a text that starts with <s>: HFLM adds no special
# tokens to it), its system message only where the conversation has one.
CHATML = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role']"
    " + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The parametrization point: a maker per model family that jaxgpt imports,
# writing a random transformers model and its tokenizer into a folder.
REFERENCE_MODELS = {"gpt2": make_gpt2, "llama": make_llama}


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module", params=sorted(REFERENCE_MODELS))
def reference(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    REFERENCE_MODELS[request.param](folder)
    return folder


@pytest.fixture(scope="module")
def models(reference):
    """(jaxgpt's LM of the imported weights, the harness's HFLM of the folder)."""
    ours = harness.JaxGPTLM(init_from=str(reference), batch_size=4)
    theirs = huggingface.HFLM(
        pretrained=str(reference), backend="causal", batch_size=4, device="cpu",
        dtype="float32",
    )  # fmt: skip
    return ours, theirs


# --- The tasks -----------------------------------------------------------------------

WORDS = ["eggs", "rice", "water", "fish", "bread", "salt", "tea", "soup", "beans"]
WORDS += ["corn", "milk", "jam"]
HELLASWAG = [
    {
        "ind": i,
        "activity_label": "Cooking",
        "source_id": "x",
        "split": "val",
        "split_type": "indomain",
        "ctx": "",
        "label": str(i % 3),
        "ctx_a": f"A man takes a pan [title] and some {w}."
        + " He waits for it." * (3 * (i % 4)),  # Some cut to the model's window.
        "ctx_b": "then he",
        "endings": [
            f"puts the {w} on the stove.",
            "eats the [step] " + "pan " * (i % 3),
            "walks" if i % 2 else "walks away from everything",
            f"sings {w}",
        ],
    }
    for i, w in enumerate(WORDS)
]
ARC = [
    {
        "id": f"q{i}",
        "question": q,
        "answerKey": "ABCD"[i % 4],
        "choices": {"text": c, "label": ["A", "B", "C", "D"]},
    }
    for i, (q, c) in enumerate(
        [
            ("Which is a planet?", ["Mars", "the Sun", "a comet", "the Moon"]),
            ("What do plants need to grow?", ["light", "rocks", "plastic", "salt"]),
            ("Water freezes at", ["0 C", "100 C", "50 C", "minus 50 C"]),
            ("Which animal can fly?", ["a bird", "a dog", "a fish", "a cow"]),
            ("What melts ice?", ["heat", "cold", "darkness", "sound"]),
        ]
    )
]
GENERATION = [
    {"question": q}
    for q in ("Hello, my name is", "The", "Once upon a time, " * 6, "1, 2, 3,")
]


def task_yaml(folder: Path, name: str, include: str, data: str, split: str) -> Path:
    """A task that is the harness's `include` on a local jsonl's one split."""
    harness = Path(lm_eval.__file__).parent / "tasks"
    splits = {f"{s}_split": "null" for s in ("training", "validation", "test")}
    splits[f"{split}_split"] = split
    path = folder / f"{name}.yaml"
    path.write_text(
        f"include: {harness / include}\ntask: {name}\ntag: []\n"
        "dataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {folder / data}\n"
        + "".join(f"{k}: {v}\n" for k, v in splits.items())
    )
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A folder of local lm-eval tasks: tiny_hellaswag, tiny_arc, tiny_gen."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, rows in (("hellaswag", HELLASWAG), ("arc", ARC), ("gen", GENERATION)):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    task_yaml(
        folder,
        "tiny_hellaswag",
        "hellaswag/hellaswag.yaml",
        "hellaswag.jsonl",
        "validation",
    )
    task_yaml(folder, "tiny_arc", "arc/arc_easy.yaml", "arc.jsonl", "test")
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'gen.jsonl'}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: ''\ngeneration_kwargs:\n  until: ['.', ' the']\n"
        "  max_gen_toks: 10\n  do_sample: false\nmetric_list:\n"
        "  - metric: exact_match\n"
    )
    return folder


@pytest.fixture(scope="module")
def harness_results(models, tasks):
    """simple_evaluate of both models on the three tasks (samples logged)."""
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return [
        lm_eval.simple_evaluate(
            model=lm,
            tasks=["tiny_hellaswag", "tiny_arc", "tiny_gen"],
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=True,
        )
        for lm in models
    ]


# --- Requests --------------------------------------------------------------------


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_hflm(models):
    """Empty contexts, a trailing space, contexts cut to the window, long
    continuations, lengths in both padded lengths: within 1e-4, greedy equal;
    one compiled program per padded length."""
    ours, theirs = models
    args = [
        ("The cat sat on", " the mat"), ("", "Hello world"), ("", "\n"),
        ("Question: what is it? Answer: ", "yes it is"),
        ("a " * 90, " b c d"), ("x", " long continuation text" * 8),
        ("One, two, three,", " four"), (" ".join(WORDS), " and more words here"),
    ]  # fmt: skip
    got = ours.loglikelihood(requests("loglikelihood", args))
    want = theirs.loglikelihood(requests("loglikelihood", args))
    diff = max(abs(g[0] - w[0]) for g, w in zip(got, want))
    print(f"loglikelihood: max |jaxgpt - HFLM| = {diff:.2e}")
    assert diff < TOL
    assert [g[1] for g in got] == [w[1] for w in want]
    assert ours.score._cache_size() <= len(scoring.lengths(CONTEXT))


def test_greedy_continuations_are_greedy_in_both(models, reference):
    """A continuation of the model's own argmax tokens is greedy for both."""
    ours, theirs = models
    hf_model = theirs.model
    ids = theirs.tok_encode("It was a dark and stormy")
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
    args = [(None, ids, out), (None, ids, [out[0] + 1, *out[1:]])]
    got = ours._loglikelihood_tokens(args)
    want = theirs._loglikelihood_tokens(args)
    assert [g[1] for g in got] == [w[1] for w in want] == [True, False]
    assert max(abs(g[0] - w[0]) for g, w in zip(got, want)) < TOL


def test_loglikelihood_rolling_equals_hflm(models):
    """Texts of one token to several windows of the context. A sum over three
    windows of near-uniform predictions (about -1,300 nats) is held to
    float32's resolution of it, 2e-7 relative, where that exceeds 1e-4."""
    ours, theirs = models
    texts = [("Once upon a time there was a tiny model. " * 12,), ("short",), ("a",)]
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    diff = max(abs(g - w) for g, w in zip(got, want))
    print(f"loglikelihood_rolling: max |jaxgpt - HFLM| = {diff:.2e} of {min(want):.0f}")
    for g, w in zip(got, want):
        assert abs(g - w) < max(TOL, 2e-7 * abs(w))


def test_generate_until_equals_hflm_greedy(models):
    """Prompts of several lengths (one cut to the context less max_gen_toks),
    two max_gen_toks, stop strings that cut and strings that do not."""
    ours, theirs = models
    greedy = {"do_sample": False}
    args = [
        ("Hello, my name is", {"until": ["\n"], "max_gen_toks": 8, **greedy}),
        ("The", {"until": ["."], "max_gen_toks": 8, **greedy}),
        ("The", {"until": ["zzz"], "max_gen_toks": 12, **greedy}),
        ("a b c d e f g h " * 8, {"until": ["\n"], "max_gen_toks": 8, **greedy}),
        ("Once upon", {"until": [" the", ","], "max_gen_toks": 12, **greedy}),
    ]
    got = ours.generate_until(requests("generate_until", args))
    want = theirs.generate_until(requests("generate_until", args))
    assert got == want
    assert len(set(got)) > 2  # Not all empty: the texts were compared.


def test_sampled_generation_is_seeded_and_stops(reference):
    """Sampled rows differ from each other; the same seed and requests draw the
    same texts; each text ends before its first stop string."""
    sampled = {
        "do_sample": True,
        "temperature": 1.0,
        "until": ["e"],
        "max_gen_toks": 20,
    }
    args = [("Hello", sampled)] * 4
    a, b = (harness.JaxGPTLM(init_from=str(reference), batch_size=4) for _ in "ab")
    got = a.generate_until(requests("generate_until", args))
    assert b.generate_until(requests("generate_until", args)) == got
    assert len(set(got)) > 1  # Four draws, not four copies.
    assert all("e" not in text for text in got)


# --- Tasks -----------------------------------------------------------------------


def metric(results: dict, task: str, name: str) -> float:
    return results["results"][task][f"{name},none"]


def test_task_accuracies_equal_hflm(harness_results):
    ours, theirs = harness_results
    for task in ("tiny_hellaswag", "tiny_arc"):
        for name in ("acc", "acc_norm"):
            assert metric(ours, task, name) == metric(theirs, task, name), task
        lls = [
            [np.array([r[0] for r in s["resps"]]).ravel() for s in res["samples"][task]]
            for res in (ours, theirs)
        ]
        diff = np.abs(np.array(lls[0]) - np.array(lls[1])).max()
        print(f"{task}: acc, acc_norm equal; max |jaxgpt - HFLM| = {diff:.2e}")
        assert diff < TOL
    gen = [
        [s["filtered_resps"] for s in r["samples"]["tiny_gen"]] for r in (ours, theirs)
    ]
    assert gen[0] == gen[1]


def test_in_loop_hellaswag_equals_the_harness_acc_norm(
    reference, tasks, harness_results
):
    """hellaswag.make_evaluate (one compiled scan over padded examples, some
    cut to the model's window) on the imported model gives the harness's HFLM
    acc and acc_norm, and each ending's log-likelihood within 1e-4."""
    _, theirs = harness_results
    mesh = sharding.make_mesh()
    cfg, params, tok = harness.load_checkpoint(None, str(reference), "latest", mesh)
    rows = hellaswag.read_examples(tasks / "hellaswag.jsonl")
    got = hellaswag.make_evaluate(cfg, tok, rows, mesh, batch_rows=8)(params)
    assert got == {
        "hellaswag_acc": metric(theirs, "tiny_hellaswag", "acc"),
        "hellaswag_acc_norm": metric(theirs, "tiny_hellaswag", "acc_norm"),
    }
    # The items tell acc_norm from acc, and neither is all right or all wrong.
    assert 0 < got["hellaswag_acc"] != got["hellaswag_acc_norm"] < 1
    ll_EK = hellaswag.make_log_likelihoods(cfg, tok, rows, mesh, 8)(params)
    docs = sorted(theirs["samples"]["tiny_hellaswag"], key=lambda d: d["doc_id"])
    want_EK = [[r[0][0] for r in doc["resps"]] for doc in docs]
    print(
        f"in-loop hellaswag: max |jaxgpt - HFLM| = {np.abs(ll_EK - want_EK).max():.2e}"
    )
    np.testing.assert_allclose(ll_EK, want_EK, atol=TOL, rtol=0)
    assert (
        max(len(w[0]) for ex in hellaswag.windows(rows, tok, CONTEXT) for w in ex)
        == CONTEXT
    )


# --- The command lines ---------------------------------------------------------------


@pytest.fixture
def parsed_flags():
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def test_main_mode_eval_tasks_prints_the_table_and_writes_json(
    reference, tasks, harness_results, tmp_path, capsys, parsed_flags
):
    files = ",".join(str(tasks / f"tiny_{t}.yaml") for t in ("arc", "hellaswag"))
    with flagsaver.flagsaver(
        mode="eval", init_from=str(reference), tasks=files, workdir=str(tmp_path),
        eval_batch_size=4,
    ):  # fmt: skip
        assert main.main(["jaxgpt.main"]) == 0
    table = capsys.readouterr().out
    assert "|tiny_arc" in table and "|tiny_hellaswag" in table and "acc_norm" in table
    (written,) = tmp_path.glob("lm_eval_results_*.json")
    results = json.loads(written.read_text())
    _, theirs = harness_results
    for task in ("tiny_arc", "tiny_hellaswag"):
        assert metric(results, task, "acc_norm") == metric(theirs, task, "acc_norm")


def test_main_mode_eval_prints_in_loop_hellaswag_beside_the_losses(
    reference, tasks, harness_results, tmp_path, corpus_path, capsys, parsed_flags
):
    """--mode=eval --eval_tasks=hellaswag: the in-loop scores, on the command line."""
    own = {} if reference.name.startswith("gpt2") else {"tokenizer": str(reference)}
    with flagsaver.flagsaver(
        mode="eval", init_from=str(reference), dataset="shakespeare",
        data_path=str(corpus_path), data_dir=str(tmp_path), eval_iters=1,
        batch_size=2, eval_tasks="hellaswag",
        eval_data_path=str(tasks / "hellaswag.jsonl"), **own,
    ):  # fmt: skip
        assert main.main(["jaxgpt.main"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("train: loss ") and lines[1].startswith("val: loss ")
    _, theirs = harness_results
    acc, acc_norm = (metric(theirs, "tiny_hellaswag", m) for m in ("acc", "acc_norm"))
    assert lines[2] == f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f}"


def test_lm_eval_command_line_runs_jaxgpt(reference, tasks, harness_results, tmp_path):
    """`python -m jaxgpt.evals.harness` is lm-eval's command line with --model jaxgpt."""
    if not reference.name.startswith("gpt2"):  # The same command for any model.
        pytest.skip("one model is enough: the llama model is evaluated in-process")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.evals.harness", "--model", "jaxgpt",
         "--model_args", f"init_from={reference}", "--batch_size", "4",
         "--tasks", str(tasks / "tiny_arc.yaml"), "--output_path", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1",
             "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|tiny_arc" in done.stdout
    (written,) = tmp_path.glob("results_*.json")
    _, theirs = harness_results
    results = json.loads(written.read_text())
    assert metric(results, "tiny_arc", "acc") == metric(theirs, "tiny_arc", "acc")


def test_entry_point_names_the_registered_model():
    """setup.cfg declares jaxgpt in the harness's lm_eval.models entry-point
    group, pointing at the class importing jaxgpt.evals.harness registers."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["lm_eval.models"].strip().splitlines()
    (name, value) = (part.strip() for part in lines[0].split("="))
    point = importlib.metadata.EntryPoint(name, value, "lm_eval.models")
    registered = lm_eval.api.registry.get_model("jaxgpt")
    assert name == "jaxgpt" and point.load() is registered is harness.JaxGPTLM


def test_bad_requests_and_arguments_are_clear(models, tmp_path):
    ours, _ = models
    with pytest.raises(ConfigError, match="workdir=.*init_from="):
        harness.JaxGPTLM()
    S = ours.max_length  # No room left for the prompt.
    with pytest.raises(ValueError, match=f"max_gen_toks={S} must lie in"):
        ours.generate_until(requests("generate_until", [("Hi", {"max_gen_toks": S})]))
    with pytest.raises(ValueError, match="repetition_penalty"):
        ours.generate_until(
            requests("generate_until", [("Hi", {"repetition_penalty": 1.2})])
        )
    with pytest.raises(ConfigError, match="no_such.yaml"):
        harness.evaluate(ours, [str(tmp_path / "no_such.yaml")])


# --- Tokenizers that add special tokens ------------------------------------------------

# Post-processors' templates: <s> before every text (Llama-2's, TinyLlama's,
# Mistral's), and <s> before and </s> after it.
TEMPLATES = {"bos": "<s> $A", "bos_eos": "<s> $A </s>"}
ADD_BOS = (None, True, False)  # HFLM's add_bos_token: left out, True, False.


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def bos_folder(request, tmp_path_factory) -> Path:
    """A random Llama whose tokenizer has the template's post-processor."""
    folder = tmp_path_factory.mktemp(request.param)
    make_llama(folder, TEMPLATES[request.param])
    return folder


@pytest.fixture(scope="module")
def bos_models(bos_folder) -> dict:
    """add_bos_token -> (JaxGPTLM, HFLM) of the model in bos_folder."""
    folder, mesh = bos_folder, sharding.make_mesh()
    loaded = harness.load_checkpoint(None, str(folder), "latest", mesh)
    out = {}
    for add_bos in ADD_BOS:
        theirs = huggingface.HFLM(
            pretrained=str(folder), backend="causal", batch_size=4, device="cpu",
            dtype="float32", add_bos_token=add_bos,
        )  # fmt: skip
        ours = harness.JaxGPTLM(
            loaded=loaded, mesh=mesh, batch_size=4, add_bos_token=add_bos
        )
        out[add_bos] = ours, theirs
    return out


def test_bos_tokenizers_encode_as_hflm(bos_models):
    """Texts begin with <s> unless add_bos_token=False; </s> ends them where the
    template appends it and add_bos_token is left out (transformers rebuilds
    the post-processor from add_bos_token); special tokens are left out on
    request and after a text that starts with <s>. --prompt is encoded as
    the tokenizer does by default."""
    ours, theirs = bos_models[None]
    s, e = ours.tok.bos_id, ours.tok.eos_id
    assert (s, e) == (theirs.tokenizer.bos_token_id, theirs.tokenizer.eos_token_id)
    plain = ours.encode("Hello world", False)
    assert theirs.tokenizer.decode(plain) == "Hello world"
    appends = ours.tok.encode("").tolist()[1:] == [e]  # The template's "</s>".
    want = {None: [s, *plain] + [e] * appends, True: [s, *plain], False: plain}
    for add_bos, (ours, theirs) in bos_models.items():
        for text in ("Hello world", "", "<s>Hello world"):
            for special in (None, False):
                got = ours.tok_encode(text, add_special_tokens=special)
                assert got == theirs.tok_encode(text, add_special_tokens=special)
        assert ours.tok_encode("Hello world") == want[add_bos]
    assert sampling.encode_prompt("Hello world", ours.tok).tolist() == want[None]


def test_bos_tokenizers_prepare_documents_without_their_specials(bos_folder, tmp_path):
    """Token files hold each document's own ids, then eos: no <s> (nor the
    template's </s>) from the post-processor."""
    from jaxgpt.datasets import prepare
    from jaxgpt.run.configs import DataConfig

    docs = [f"The cat sat on the {w}.\n" for w in WORDS[:10]]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs)
    )
    cfg = DataConfig(
        data_dir=str(tmp_path / "data"), dataset="docs",
        data_path=str(tmp_path / "docs"), tokenizer=str(bos_folder),
    )  # fmt: skip
    dataset = prepare.ensure(cfg)
    tok = dataset.tokenizer
    assert tok.encode(docs[0])[0] == tok.bos_id  # The tokenizer adds <s> itself.
    want = [[*tok.encode(d, add_special_tokens=False), tok.eos_id] for d in docs]
    got = np.concatenate([dataset.splits["train"], dataset.splits["val"]])
    np.testing.assert_array_equal(got, np.concatenate(want))  # Val: the 10th.


def test_bos_tokenizers_loglikelihood_equals_hflm(bos_models):
    """Multiple choice (empty contexts, a trailing space, a context cut to the
    window), for each add_bos_token: within 1e-4, greedy equal."""
    args = [
        ("The cat sat on", " the mat"), ("", "Hello world"),
        ("Question: what is it? Answer: ", "yes it is"),
        ("a " * 90, " b c d"), ("One, two, three,", " four"),
    ]  # fmt: skip
    lls = {}
    for add_bos, (ours, theirs) in bos_models.items():
        got = ours.loglikelihood(requests("loglikelihood", args))
        want = theirs.loglikelihood(requests("loglikelihood", args))
        diff = max(abs(g[0] - w[0]) for g, w in zip(got, want))
        print(f"add_bos_token={add_bos}: max |jaxgpt - HFLM| = {diff:.2e}")
        assert diff < TOL
        assert [g[1] for g in got] == [w[1] for w in want]
        lls[add_bos] = [w[0] for w in want]
    # <s> changes what the model predicts: the cases tell it apart.
    assert max(abs(a - b) for a, b in zip(lls[None], lls[False])) > 0.01


def test_bos_tokenizers_loglikelihood_rolling_equals_hflm(bos_models):
    """Texts of one window and of several, for each add_bos_token."""
    texts = [("Once upon a time there was a tiny model. " * 8,), ("short",)]
    for add_bos, (ours, theirs) in bos_models.items():
        got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
        want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
        diff = max(abs(g - w) for g, w in zip(got, want))
        print(f"add_bos_token={add_bos}: rolling max |jaxgpt - HFLM| = {diff:.2e}")
        for g, w in zip(got, want):
            assert abs(g - w) < max(TOL, 2e-7 * abs(w))


def test_bos_tokenizers_generate_until_equals_hflm_greedy(bos_models):
    """Greedy continuations of prompts (one cut to the context less
    max_gen_toks, so that <s> is cut off too), for each add_bos_token."""
    greedy = {"do_sample": False}
    args = [
        ("Hello, my name is", {"until": ["\n"], "max_gen_toks": 8, **greedy}),
        ("The", {"until": ["zzz"], "max_gen_toks": 12, **greedy}),
        ("a b c d e f g h " * 8, {"until": ["\n"], "max_gen_toks": 8, **greedy}),
        ("Once upon", {"until": [" the", ","], "max_gen_toks": 12, **greedy}),
    ]
    for add_bos, (ours, theirs) in bos_models.items():
        got = ours.generate_until(requests("generate_until", args))
        want = theirs.generate_until(requests("generate_until", args))
        same = sum(g == w for g, w in zip(got, want))
        print(f"add_bos_token={add_bos}: {same} of {len(want)} generations equal")
        assert got == want
        assert len(set(got)) > 2  # Not all empty: the texts were compared.


def test_add_bos_token_takes_true_or_false(bos_models):
    """lm_eval passes model_args as text when it cannot read them as a bool."""
    from jaxgpt import tokenizer

    ours, _ = bos_models[None]
    loaded = (ours.model_cfg, ours.params, ours.tok)
    lm = harness.JaxGPTLM(loaded=loaded, mesh=ours.mesh, add_bos_token="false")
    assert lm.tok_encode("Hello") == ours.encode("Hello", False)
    with pytest.raises(ConfigError, match="add_bos_token=maybe: give True or False"):
        harness.JaxGPTLM(loaded=loaded, mesh=ours.mesh, add_bos_token="maybe")
    char = (ours.model_cfg, ours.params, tokenizer.CharTokenizer("ab"))
    with pytest.raises(ConfigError, match="'char' tokenizer has no beginning"):
        harness.JaxGPTLM(loaded=char, mesh=ours.mesh, add_bos_token=True)


# --- Chat templates: --apply_chat_template, --fewshot_as_multiturn, system --------


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A random Llama whose folder has a ChatML template."""
    folder = tmp_path_factory.mktemp("chat")
    make_llama(folder, chat_template=CHATML)
    return folder


@pytest.fixture(scope="module")
def chat_models(chat_folder):
    """(JaxGPTLM, HFLM) of chat_folder's model."""
    folder = chat_folder
    ours = harness.JaxGPTLM(init_from=str(folder), batch_size=4)
    theirs = huggingface.HFLM(
        pretrained=str(folder), backend="causal", batch_size=4, device="cpu",
        dtype="float32",
    )  # fmt: skip
    return ours, theirs


def test_chat_prompts_are_hflms(chat_models):
    """The text (and ids) of a few-shot conversation with a system message, with
    the generation prompt or continuing a begun answer; the template's name."""
    ours, theirs = chat_models
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Which is a planet?"},
        {"role": "assistant", "content": "Mars"},
        {"role": "user", "content": "Water freezes at"},
    ]
    begun = [*history, {"role": "assistant", "content": "Answer:"}]
    for messages, add in ((history, True), (begun, False)):
        text = ours.apply_chat_template(messages, add_generation_prompt=add)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=add)
        assert ours.tok_encode(text) == theirs.tok_encode(text)
    assert text.startswith("<s><|im_start|>system\n") and text.endswith("Answer:")
    assert ours.chat_template(True) == theirs.chat_template(True) == CHATML
    assert ours.chat_template(False) is None
    im_end = ours.tok.token_id("<|im_end|>")
    assert ours.template.stop_ids == (im_end, ours.tok.eos_id)


def test_chat_task_equals_hflm(chat_models, tasks):
    """Multiple choice through --apply_chat_template with a system instruction
    and a few-shot turn as a conversation: the harness's prompts and
    log-likelihoods (within 1e-4) equal HFLM's."""
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    ours, theirs = (
        lm_eval.simple_evaluate(
            model=lm,
            tasks=["tiny_arc"],
            task_manager=manager,
            num_fewshot=1,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            system_instruction="Answer briefly.",
            bootstrap_iters=0,
            log_samples=True,
            limit=2,
        )["samples"]["tiny_arc"]
        for lm in chat_models
    )
    prompts = [[s["arguments"][0][0] for s in r] for r in (ours, theirs)]
    assert prompts[0] == prompts[1]
    for prompt in prompts[0]:
        assert prompt.startswith("<s><|im_start|>system\nAnswer briefly.<|im_end|>")
        assert prompt.count("<|im_start|>user") == 2  # The shot, then the question.
    lls = [np.array([[r[0] for r in s["resps"]] for s in r]) for r in (ours, theirs)]
    diff = np.abs(lls[0] - lls[1]).max()
    print(f"chat tiny_arc: max |jaxgpt - HFLM| = {diff:.2e}")
    assert diff < TOL


def test_main_mode_eval_tasks_takes_the_chat_flags(
    chat_folder, tasks, tmp_path, parsed_flags
):
    """--apply_chat_template, --fewshot_as_multiturn and --system_instruction
    reach the harness from jaxgpt.main (its JSON records them), and refuse to
    run without --tasks."""
    with flagsaver.flagsaver(
        mode="eval", init_from=str(chat_folder), workdir=str(tmp_path),
        tasks=str(tasks / "tiny_arc.yaml"), num_fewshot=1, limit=2.0,
        eval_batch_size=4, apply_chat_template=True,
        system_instruction="Answer briefly.",
    ):  # fmt: skip
        assert main.main(["jaxgpt.main"]) == 0
    (written,) = tmp_path.glob("lm_eval_results_*.json")
    results = json.loads(written.read_text())
    assert results["chat_template"] == CHATML
    assert results["system_instruction"] == "Answer briefly."
    assert results["fewshot_as_multiturn"] is True
    with pytest.raises(ConfigError, match="--apply_chat_template .* --tasks"):
        EvalConfig(apply_chat_template=True)


def test_chat_generation_equals_hflm(chat_models):
    """Greedy replies to chat prompts, cut at <|im_end|>, equal HFLM's."""
    ours, theirs = chat_models
    turn = [{"role": "user", "content": q} for q in ("Hello, my name is", "The")]
    greedy = {"do_sample": False, "max_gen_toks": 8}
    args = [
        (ours.apply_chat_template([t]), {"until": [u], **greedy})
        for t, u in zip(turn, ("<|im_end|>", "zzz"))
    ]
    got = ours.generate_until(requests("generate_until", args))
    assert got == theirs.generate_until(requests("generate_until", args))
    assert all(got)  # Not empty: the texts were compared.


def test_apply_chat_template_needs_a_template(models):
    ours, _ = models
    with pytest.raises(ConfigError, match="tokenizer has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    with pytest.raises(ConfigError, match="leave --apply_chat_template out"):
        ours.chat_template(True)


def test_jaxgpt_chat_tokens_as_the_template():
    """A model trained with jaxgpt's chat tokens: the prompt is its rendering,
    and a reply ends at <|end|>. The model is a bigram table whose greedy
    path is <|assistant|> -> a -> <|end|> -> a ..."""
    import jax.numpy as jnp

    from jaxgpt import tokenizer
    from jaxgpt.config import ModelConfig
    from jaxgpt.datasets import chat_template

    tok, _ = chat_template.add_chat_tokens(tokenizer.CharTokenizer("ab\n"))
    V, a, end = tok.vocab_size, 0, tok.end_id
    table = jnp.zeros((V, V)).at[:, a].set(10.0).at[a, :].set(0.0).at[a, end].set(10.0)
    cfg = ModelConfig(vocab_size=V, model="bigram", block_size=32)
    lm = harness.JaxGPTLM(loaded=(cfg, {"table": {"embedding": table}}, tok))
    history = [
        {"role": "system", "content": "b"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    prompt = lm.apply_chat_template(history)
    assert lm.tok_encode(prompt) == (
        chat_template.generation_prompt(tok, history).tolist()
    )
    begun = lm.apply_chat_template([*history, history[2]], add_generation_prompt=False)
    assert begun == prompt + "a"  # Continues the reply: no <|end|>.
    assert lm.chat_template(True) == tokenizer_io.CHAT_JINJA
    args = [(prompt, {"until": ["zzz"], "max_gen_toks": 6, "do_sample": False})]
    assert lm.generate_until(requests("generate_until", args)) == ["a"]

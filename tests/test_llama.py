"""jaxgpt.hub.llama against transformers' LlamaForCausalLM: logits both ways, the
bitwise round trip, greedy decoding with the KV cache, sharded and bfloat16
files, the tokenizer, errors.

The references are small random LlamaForCausalLMs made here, with shapes no
other test uses: grouped-query attention (6 heads, 2 key/value heads) with an
untied head, multi-query attention (1 key/value head) with a tied head and
biases, and a sharded one; rope thetas 10^4, 5 x 10^5 and 100. Every
parameter is drawn at random (RMSNorm weights ~ N(1, 0.1)), so a weight
mapped to the wrong place shows. Their tokenizer is a byte-level BPE trained
here with Hugging Face tokenizers. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxgpt import generate, lecture, main, model
from jaxgpt.config import ModelConfig
from jaxgpt.hub import hf, llama, load, tokenizer_io

TOL = 1e-4  # float32 logits, jaxgpt against transformers.
VOCAB = 320
MODELS = {  # LlamaConfig fields of each reference model.
    "gqa_untied": {
        "hidden_size": 48,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "max_position_embeddings": 24,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "mqa_tied_bias": {
        "hidden_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "intermediate_size": 72,
        "num_hidden_layers": 3,
        "max_position_embeddings": 20,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
    },
    "mha_sharded": {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 56,
        "num_hidden_layers": 2,
        "max_position_embeddings": 16,
        "rope_theta": 100.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


def byte_level_bpe(text: str, vocab_size: int = VOCAB) -> dict:
    """A tokenizer.json: GPT-2-style byte-level BPE learned from `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == vocab_size
    return json.loads(tok.to_str())


@pytest.fixture(scope="module")
def tokenizer_json(corpus_text) -> dict:
    return byte_level_bpe(corpus_text[:50_000])


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.1); RMSNorm weights ~ N(1, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # A tied head: once.
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if "norm" in name else noise)


def write_tokenizer(folder, tokenizer_json: dict) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "eos_token": "</s>"})
    )


@pytest.fixture(scope="module", params=list(MODELS))
def hf_llama(request, tmp_path_factory, tokenizer_json):
    """(name, transformers model, its save_pretrained folder)."""
    name = request.param
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, **MODELS[name]
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    randomize_(hf_model, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    shard = {"max_shard_size": "20KB"} if name == "mha_sharded" else {}
    hf_model.save_pretrained(folder, **shard)
    write_tokenizer(folder, tokenizer_json)
    return name, hf_model, folder


def hf_logits(hf_model, idx_BT) -> np.ndarray:
    with torch.no_grad():
        return hf_model(
            torch.as_tensor(np.asarray(idx_BT), dtype=torch.long)
        ).logits.numpy()


def jax_logits(cfg: ModelConfig, params, idx_BT) -> np.ndarray:
    return np.asarray(
        jax.jit(lecture.make_model(cfg).apply)({"params": params}, idx_BT)
    )


def random_ids(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape, dtype=np.int32)


def leaves_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ---------------------------------------------------------------- import


def test_import_matches_transformers(hf_llama):
    """The config, the parameter count and the logits."""
    name, hf_model, folder = hf_llama
    cfg, params = load.read_model(str(folder))
    c = MODELS[name]
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.norm_scale) == (
        "rope",
        "rmsnorm",
        "swiglu",
        True,
    )
    assert (cfg.n_head, cfg.kv_heads, cfg.hidden_dim) == (
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["intermediate_size"],
    )
    assert cfg.rope_theta == c["rope_theta"] and cfg.norm_eps == c["rms_norm_eps"]
    assert cfg.tie_embeddings == c["tie_word_embeddings"]
    assert cfg.bias == c.get("attention_bias", False)
    assert model.count_params(params) == hf_model.num_parameters()
    idx_BT = random_ids((2, cfg.block_size))
    want, got = hf_logits(hf_model, idx_BT), jax_logits(cfg, params, idx_BT)
    assert np.std(want) > 0.1
    diff = float(np.max(np.abs(got - want)))
    print(f"import {name}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL


def test_greedy_decoding_with_the_cache_matches_transformers(hf_llama):
    """To the end of the context: the rotary cache as --mode=sample uses it."""
    _, hf_model, folder = hf_llama
    cfg, params = load.read_model(str(folder))
    prompt_BP = random_ids((2, 4), seed=1)
    n_new = cfg.block_size - 4
    with torch.no_grad():
        want = hf_model.generate(
            torch.as_tensor(prompt_BP, dtype=torch.long),
            attention_mask=torch.ones(prompt_BP.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=n_new,
        ).numpy()
    got = generate.generate(
        lecture.make_model(cfg).apply,
        params,
        jnp.asarray(prompt_BP),
        jax.random.PRNGKey(0),
        block_size=cfg.block_size,
        max_new_tokens=n_new,
        temperature=0.0,
        rolling=True,
    )
    assert want.shape == (2, cfg.block_size)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_round_trip_is_bitwise(hf_llama, tmp_path):
    """import -> export -> import: the same config and parameters, and the
    exported tensors are the original files' (sharded ones too)."""
    name, _, folder = hf_llama
    cfg, params = load.read_model(str(folder))
    load.write_model("llama", params, cfg, str(tmp_path))
    cfg2, params2 = load.read_model(str(tmp_path))
    assert cfg2 == cfg and leaves_equal(params2, params)
    original, exported = (
        hf.read_weights(str(folder)),
        hf.read_weights(str(tmp_path)),
    )
    assert (name == "mha_sharded") == os.path.isfile(folder / hf.ST_INDEX)
    assert leaves_equal(exported, original)
    scan_cfg, scan_params = load.read_model(str(folder), scan_layers=True)
    assert leaves_equal(scan_params, hf.stack_blocks(params))
    assert leaves_equal(llama.params_to_hf(scan_params, scan_cfg), exported)


# ---------------------------------------------------------------- export


def noisy_params(cfg: ModelConfig, seed: int = 0):
    params = jax.jit(lecture.init_params, static_argnums=0)(
        cfg, jax.random.PRNGKey(seed)
    )
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"n_head": 6, "n_kv_head": 3, "n_embd": 36, "rope_theta": 2000.0},
        {"n_head": 4, "n_kv_head": 1, "tie_embeddings": True, "bias": True},
        {"n_head": 2, "norm_scale": False, "mlp_hidden": 24, "norm_eps": 1e-6},
    ],
    ids=["gqa", "mqa_tied_bias", "no_norm_scale"],
)
def test_exported_model_loads_in_transformers(tmp_path, kw):
    llama_choices = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    cfg = ModelConfig(
        vocab_size=VOCAB, block_size=12, n_layer=2,
        **{"n_embd": 32, "tie_embeddings": False, **llama_choices, **kw},
    )  # fmt: skip
    params = noisy_params(cfg)
    load.write_model("llama", params, cfg, str(tmp_path), token_ids={"eos_token_id": 7})
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert hf_model.config.eos_token_id == 7 and hf_model.config.bos_token_id is None
    assert hf_model.config.tie_word_embeddings == cfg.tie_embeddings
    idx_BT = random_ids((2, 12), seed=3)
    diff = float(
        np.max(np.abs(jax_logits(cfg, params, idx_BT) - hf_logits(hf_model, idx_BT)))
    )
    print(f"export {kw}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL
    back_cfg, back = load.read_model(str(tmp_path))
    if cfg.norm_scale:
        assert back_cfg == cfg and leaves_equal(back, params)
    else:  # Written as ones; read back into a scaled model, the same function.
        assert back_cfg == dataclasses.replace(cfg, norm_scale=True)
        diff = np.abs(
            jax_logits(back_cfg, back, idx_BT) - jax_logits(cfg, params, idx_BT)
        )
        assert float(diff.max()) == 0.0


def test_bfloat16_files_import_as_their_float32_values(hf_llama, tmp_path):
    name, hf_model, folder = hf_llama
    if name != "gqa_untied":
        pytest.skip("one model is enough")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="30KB")
    hf_model.to(torch.float32)
    _, params = load.read_model(str(tmp_path))
    _, f32_params = load.read_model(str(folder))
    rounded = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), f32_params
    )
    assert os.path.isfile(tmp_path / hf.ST_INDEX)
    assert leaves_equal(params, rounded)


# ---------------------------------------------------------------- errors


def assert_one_line(excinfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


LLAMA_JSON = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4}


@pytest.mark.parametrize(
    "option,value,named",
    [
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}, "'llama3'"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "'linear'"),
        ("hidden_act", "gelu", "hidden_act"),
        ("head_dim", 16, "head_dim"),
        ("mlp_bias", True, "mlp_bias"),
        ("num_key_value_heads", 3, "n_kv_head=3"),
    ],
)
def test_configs_jaxgpt_cannot_compute_are_refused(option, value, named):
    with pytest.raises(hf.HuggingFaceError) as e:
        llama.config_from_hf({**LLAMA_JSON, option: value})
    assert_one_line(e, "config.json", named)


@pytest.mark.parametrize(
    "kw,option",
    [
        ({"qk_norm": True}, "--qk_norm=True"),
        ({"logit_cap": 15.0}, "--logit_cap=15.0"),
        ({"mlp": "relu2"}, "--mlp=relu2"),
        ({"position": "learned"}, "--position=learned"),
    ],
)
def test_exporting_what_a_layout_cannot_hold_names_the_option(tmp_path, kw, option):
    modern = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", **kw}
    cfg = ModelConfig(
        vocab_size=VOCAB, block_size=8, n_layer=1, n_head=2, n_embd=16, **modern
    )
    params = jax.eval_shape(lambda: lecture.init_params(cfg, jax.random.PRNGKey(0)))
    with pytest.raises(hf.HuggingFaceError) as e:
        load.write_model("llama", params, cfg, str(tmp_path / "llama"))
    assert_one_line(e, option, "Llama")
    with pytest.raises(hf.HuggingFaceError) as e:  # GPT-2's layout holds no RoPE.
        load.write_model("gpt2", params, cfg, str(tmp_path / "gpt2"))
    assert_one_line(e, "GPT-2's layout", "--format=llama")
    assert not os.path.exists(tmp_path / "llama") and not os.path.exists(
        tmp_path / "gpt2"
    )


def test_missing_and_untied_tensors_are_named(hf_llama):
    name, _, folder = hf_llama
    if name != "mqa_tied_bias":
        pytest.skip("one model is enough")
    cfg, params = load.read_model(str(folder))
    tensors = llama.params_to_hf(params, cfg)
    del tensors["model.layers.2.mlp.up_proj.bias"]
    with pytest.raises(hf.HuggingFaceError, match="missing") as e:
        llama.params_from_hf(tensors, cfg)
    assert_one_line(e, "'model.layers.2.mlp.up_proj.bias'")
    tensors = llama.params_to_hf(params, cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    with pytest.raises(hf.HuggingFaceError, match="tie_word_embeddings") as e:
        llama.params_from_hf(tensors, cfg)
    assert_one_line(e)


def test_hub_names_offline_and_unknown_sources_are_one_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub.\nMore."
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(hf.HuggingFaceError, match="Hugging Face Hub") as e:
        load.locate("HuggingFaceTB/SmolLM2-135M")
    assert_one_line(e, "'HuggingFaceTB/SmolLM2-135M'", "offline")
    with pytest.raises(hf.HuggingFaceError, match="neither a folder") as e:
        load.locate("not a model")
    assert_one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(hf.HuggingFaceError, match="'mistral'") as e:
        load.locate(str(tmp_path))
    assert_one_line(e, "'gpt2', 'llama'")
    with pytest.raises(hf.HuggingFaceError, match="Hugging Face Hub") as e:
        load.locate("gpt2")  # A released GPT-2's name: the same download.
    assert_one_line(e, "'gpt2'", "openai-community/gpt2", "offline")


# ---------------------------------------------------------------- the tokenizer


def test_hf_tokenizer_is_a_fourth_kind(tokenizer_json, tmp_path, corpus_text):
    """Encodes as transformers does (no special tokens added), decodes back,
    survives its JSON, and counts the UTF-8 bytes of every token."""
    write_tokenizer(tmp_path, tokenizer_json)
    tok = hf.load_tokenizer(str(tmp_path), llama.TOKENIZER)
    assert (tok.name, tok.vocab_size, tok.bos_token, tok.eos_token) == (
        "hf",
        VOCAB,
        "<s>",
        "</s>",
    )
    text = corpus_text[:2000] + " naïve café, ünïcode ✓"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) > 100
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ids.tolist() == reference(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    again = tokenizer_io.from_json(json.loads(json.dumps(tok.to_json())))
    assert (
        again.to_json() == tok.to_json() and again.encode(text).tolist() == ids.tolist()
    )
    raw = tokenizer_io.from_json(tokenizer_json)  # A tokenizer.json itself.
    assert raw.encode(text).tolist() == ids.tolist()
    assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_bytes()[tok.token_id("</s>")] == 0
    files, how = hf.tokenizer_files(tok)
    assert (
        json.loads(files["tokenizer.json"]) == tokenizer_json
        and "tokenizer.json" in how
    )
    assert json.loads(files["tokenizer_config.json"])["eos_token"] == "</s>"


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer_json):
    """A random grouped-query Llama (untied head) with its tokenizer, saved."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, **MODELS["gqa_untied"]
    )
    torch.manual_seed(1)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    randomize_(hf_model, seed=1)
    folder = tmp_path_factory.mktemp("llama_cli")
    hf_model.save_pretrained(folder)
    write_tokenizer(folder, tokenizer_json)
    return folder


@pytest.fixture(scope="module")
def llama_data(tmp_path_factory, corpus_path, llama_folder) -> dict:
    """Flags of tiny shakespeare in the model's tokenizer (prepared on first use)."""
    return {
        "data_dir": str(tmp_path_factory.mktemp("data")),
        "dataset": "shakespeare",
        "data_path": str(corpus_path),
        "tokenizer": str(llama_folder),  # Its tokenizer.json.
    }


@pytest.fixture
def parsed_flags():
    from absl import flags
    from absl.testing import flagsaver

    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def run_main(capsys, **settings) -> str:
    from absl.testing import flagsaver

    with flagsaver.flagsaver(**settings):
        assert main.main(["jaxgpt.main"]) == 0
    return capsys.readouterr().out


def test_sample_and_eval_of_an_imported_llama_are_transformers(
    llama_folder, llama_data, capsys, parsed_flags
):
    """--mode=sample: greedy text as transformers' generate(); --mode=eval: the
    loss transformers gives on the same windows."""
    from jaxgpt import train
    from jaxgpt.datasets import prepare
    from jaxgpt.run.configs import DataConfig

    out = run_main(
        capsys, mode="sample", init_from=str(llama_folder), prompt="ROMEO:",
        temperature=0.0, max_new_tokens=14,
    )  # fmt: skip
    tok = load.read_tokenizer(str(llama_folder))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(llama_folder).eval()
    prompt = torch.as_tensor(tok.encode("ROMEO:")[None], dtype=torch.long)
    with torch.no_grad():
        want = hf_model.generate(prompt, max_new_tokens=14, do_sample=False)
    assert out.split("\n" + "-" * 40)[0] == tok.decode(want[0].numpy())

    out = run_main(
        capsys, mode="eval", init_from=str(llama_folder), eval_iters=2,
        batch_size=4, seed=3, block_size=16, **llama_data,
    )  # fmt: skip
    val = dict(line.split(": loss ") for line in out.strip().splitlines())["val"]
    dataset = prepare.read_dataset(DataConfig(**llama_data))
    x, y = train.eval_batches(dataset.splits["val"], train.root_key(3), 2, 4, 16)
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(np.array(x).reshape(8, 16))).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), torch.as_tensor(np.array(y).reshape(-1)).long()
        )
    assert abs(float(val.split(",")[0]) - float(loss)) < 1e-4


def test_finetuning_an_imported_llama_resumes_exactly_and_exports(
    llama_folder, llama_data, tmp_path, capsys, parsed_flags
):
    """6 steps in one go == 3 steps, then resumed to 6 with the folder gone;
    the export loads in transformers with the same logits and tokenizer."""
    from jaxgpt import sharding
    from jaxgpt.run import checkpoint as ckpt
    from jaxgpt.run.configs import RunConfig

    settings = dict(
        init_from=str(llama_folder), batch_size=4, block_size=16, learning_rate=1e-3,
        min_lr=1e-4, warmup_iters=1, max_iters=6, eval_interval=3, eval_iters=2,
        log_interval=1, max_new_tokens=4, dropout=0.1, **llama_data,
    )  # fmt: skip
    run_main(capsys, **settings, workdir=str(tmp_path / "full"))
    run_main(capsys, **settings, workdir=str(tmp_path / "split"), stop_at=3)
    moved = tmp_path / "moved"
    os.rename(llama_folder, moved)
    try:  # The workdir holds the model, its weights and its tokenizer.
        run_main(capsys, **settings, workdir=str(tmp_path / "split"))
        sample = run_main(
            capsys, mode="sample", workdir=str(tmp_path / "split"), prompt="ROMEO:",
            max_new_tokens=3,
        )  # fmt: skip
    finally:
        os.rename(moved, llama_folder)
    assert sample.startswith("ROMEO:")
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("full", "split")
    }
    assert [r["step"] for r in rows["split"]] == [0, 3, 6]
    assert rows["full"] == rows["split"]  # Bitwise: every loss of every evaluation.
    mesh = sharding.make_mesh()
    loaded = {
        name: load.load_model(RunConfig(workdir=str(tmp_path / name)), "latest", mesh)
        for name in ("full", "split")
    }
    assert leaves_equal(loaded["full"][1], loaded["split"][1])
    model_cfg, params, tok = loaded["split"]
    meta = ckpt.read_meta(tmp_path / "split")
    assert meta["tokenizer"]["name"] == "hf" and meta["model"]["n_kv_head"] == 2
    assert model_cfg.block_size == 16 and model_cfg.dropout == 0.1

    from jaxgpt.hub import export

    out = tmp_path / "exported"
    how = export.export(RunConfig(workdir=str(tmp_path / "split")), "latest", str(out))
    assert "tokenizer.json" in how
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf_model.config.max_position_embeddings == 16
    ids = random_ids((2, 16), seed=5)
    diff = np.abs(jax_logits(model_cfg, params, ids) - hf_logits(hf_model, ids))
    assert float(diff.max()) <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not to be: that is the question."
    assert (
        hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).tolist()
    )
    assert hf_tok.eos_token == "</s>"


def test_documents_end_with_the_models_eos(tokenizer_json, tmp_path):
    """A dataset of documents prepared with a model's tokenizer separates them
    with its eos token, as GPT-2's <|endoftext|>."""
    from jaxgpt.datasets import prepare

    write_tokenizer(tmp_path, tokenizer_json)
    tok = hf.load_tokenizer(str(tmp_path), llama.TOKENIZER)
    assert prepare.end_of_text(tok).tolist() == [tok.token_id("</s>")]
    assert prepare.end_of_text(tokenizer_io.HFTokenizer(tokenizer_json)).size == 0


def test_a_char_models_llama_export_imports_back_with_its_tokenizer(tmp_path):
    """jaxgpt's own tokenizer rides along as jaxgpt_tokenizer.json."""
    from jaxgpt import tokenizer

    tok = tokenizer.CharTokenizer.train("To be, or not to be")
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16,
        position="rope", norm="rmsnorm", mlp="swiglu",
    )  # fmt: skip
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    load.write_model("llama", params, cfg, str(tmp_path), hf.tokenizer_files(tok)[0])
    assert load.locate(str(tmp_path))[:2] == (llama, str(tmp_path))
    assert hf.load_tokenizer(str(tmp_path), llama.TOKENIZER).to_json() == tok.to_json()
    cfg2, params2 = load.read_model(str(tmp_path))
    assert cfg2 == cfg
    assert leaves_equal(params2, params)


def test_a_llama_export_with_gpt2s_tokenizer_reads_it_back(tmp_path):
    """GPT-2's vocab.json and merges.txt beside a Llama layout: the same
    tokenizer back (the family prefers tokenizer.json, then reads vocab.json)."""
    cfg = ModelConfig(
        vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16,
        position="rope", norm="rmsnorm", mlp="swiglu",
    )  # fmt: skip
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    files, how = hf.tokenizer_files(tokenizer_io.load_gpt2())
    load.write_model("llama", params, cfg, str(tmp_path), files)
    assert "vocab.json" in how and not (tmp_path / "tokenizer.json").exists()
    assert load.read_tokenizer(str(tmp_path)).name == "gpt2"
    with pytest.raises(hf.HuggingFaceError) as e:  # Neither file: one line.
        hf.load_tokenizer(str(tmp_path / "none"), llama.TOKENIZER)
    assert_one_line(e, "tokenizer.json, vocab.json or jaxgpt_tokenizer.json")


def test_norm_weights_of_a_nonorm_scale_model_must_be_ones():
    """HF's RMSNorm always has a weight: a --nonorm_scale model writes ones and
    reads them back as no parameter; any other value is refused, naming it."""
    cfg = ModelConfig(
        vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16,
        position="rope", norm="rmsnorm", mlp="swiglu", norm_scale=False,
    )  # fmt: skip
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    tensors = llama.params_to_hf(params, cfg)
    np.testing.assert_array_equal(tensors["model.norm.weight"], np.ones(16))
    assert leaves_equal(llama.params_from_hf(tensors, cfg), params)
    tensors["model.layers.0.input_layernorm.weight"][3] = 2.0
    with pytest.raises(hf.HuggingFaceError) as e:
        llama.params_from_hf(tensors, cfg)
    assert_one_line(e, "'model.layers.0.input_layernorm.weight'", "--norm_scale")

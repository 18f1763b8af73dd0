"""jaxgpt.hub.hf against transformers' GPT-2: logits, greedy decoding, files, errors.

The reference is a small random GPT2LMHeadModel (2 layers, 4 heads, width 64,
context 64, GPT-2's vocabulary) made here, so no test downloads anything.
Every parameter is drawn at random (not HF's init, whose biases are zero and
LayerNorm scales one), so a bias or LayerNorm mapped to the wrong place shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import chex
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from jaxgpt import generate, lecture, model
from jaxgpt.config import ModelConfig
from jaxgpt.hub import gpt2, hf, load

# The reference is transformers on PyTorch (the test extra; a CPU build is all
# it needs): without them these tests skip, and the rest of the suite runs.
torch = pytest.importorskip("torch", reason='needs PyTorch (pip install -e ".[test]")')
transformers = pytest.importorskip(
    "transformers", reason='needs transformers (pip install -e ".[test]")'
)

TOL = 1e-4  # float32 logits, jaxgpt against transformers.
SMALL = {
    "vocab_size": 50257,
    "n_positions": 64,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.1); LayerNorm scales ~ N(1, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # Tied wte/lm_head: once.
            noise = 0.1 * torch.randn(p.shape, generator=g)
            is_ln_scale = ".ln_" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_ln_scale else noise)


def hf_logits(hf_model, idx_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.as_tensor(idx_BT, dtype=torch.long)).logits.numpy()


def jax_logits(cfg: ModelConfig, params, idx_BT: np.ndarray) -> np.ndarray:
    return np.asarray(
        jax.jit(lecture.make_model(cfg).apply)({"params": params}, idx_BT)
    )


def random_ids(vocab_size: int, shape=(2, 64), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, shape, dtype=np.int32)


def leaves_equal(a, b) -> bool:
    """Same tree, every leaf bitwise equal."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """(transformers model, its save_pretrained folder), shared by the module."""
    config = transformers.GPT2Config(
        **SMALL,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # No eos: greedy decoding never stops early.
        eos_token_id=None,
    )
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    randomize_(hf_model, seed=0)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(folder)
    return hf_model, str(folder)


@pytest.fixture(scope="module")
def imported(hf_gpt2):
    return load.read_model(hf_gpt2[1])


def folder_with(tmp_path, config_json: dict, tensors: dict) -> str:
    """A HF-layout folder holding exactly this config and these tensors."""
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def hf_files(folder: str) -> tuple[dict, dict]:
    with open(os.path.join(folder, "config.json")) as f:
        config_json = json.load(f)
    return config_json, safetensors.numpy.load_file(
        os.path.join(folder, "model.safetensors")
    )


# ---------------------------------------------------------------- import


def test_import_config(imported):
    cfg, params = imported
    assert cfg == ModelConfig(
        vocab_size=50257,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=64,
        dropout=0.0,
        bias=True,
        model="gpt",
        scan_layers=False,
    )
    chex.assert_shape(params["h_1"]["attn"]["c_attn"]["kernel"], (64, 192))
    chex.assert_shape(params["h_1"]["mlp"]["c_proj"]["kernel"], (256, 64))


def test_imported_logits_match_transformers(hf_gpt2, imported):
    hf_model, _ = hf_gpt2
    cfg, params = imported
    idx_BT = random_ids(cfg.vocab_size)
    want_BTV, got_BTV = hf_logits(hf_model, idx_BT), jax_logits(cfg, params, idx_BT)
    assert np.std(want_BTV) > 0.1  # Logits far from zero, so the bound means something.
    diff = np.max(np.abs(got_BTV - want_BTV))
    print(f"import: max |logit difference| = {diff:.2e}")
    assert diff <= TOL


def param_count(cfg: ModelConfig) -> int:
    """The parameter count of `cfg`'s tree, from its shapes alone."""
    init = lambda: lecture.init_params(cfg, jax.random.PRNGKey(0))
    return model.count_params(jax.eval_shape(init))


def test_param_count_matches_transformers(hf_gpt2, imported):
    hf_model, _ = hf_gpt2
    cfg, params = imported
    assert model.count_params(params) == hf_model.num_parameters()
    assert param_count(cfg) == hf_model.num_parameters()
    with torch.device("meta"):  # GPT-2 124M's shapes, no memory.
        gpt2 = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=50257, n_positions=1024, n_layer=12, n_head=12, n_embd=768
            )
        )
    gpt2_cfg = ModelConfig(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True
    )
    assert param_count(gpt2_cfg) == gpt2.num_parameters()


def test_greedy_generation_matches_transformers(hf_gpt2, imported):
    hf_model, _ = hf_gpt2
    cfg, params = imported
    prompt_BP = random_ids(cfg.vocab_size, shape=(2, 8), seed=1)
    n_new = cfg.block_size - prompt_BP.shape[1]  # Fills the context, no further.
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
    )
    assert want.shape == (2, cfg.block_size)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_hub_layout_without_prefix_with_buffers(tmp_path, hf_gpt2, imported):
    """The Hub's own files: no 'transformer.' prefix, mask buffers, maybe lm_head."""
    config_json, tensors = hf_files(hf_gpt2[1])
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        hub[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    hub["lm_head.weight"] = hub["wte.weight"]
    assert "wte.weight" in hub and "transformer.wte.weight" not in hub
    _, params = load.read_model(folder_with(tmp_path, config_json, hub))
    assert leaves_equal(params, imported[1])


def test_pytorch_model_bin_is_read_without_torch(tmp_path, hf_gpt2, imported):
    hf_model, folder = hf_gpt2
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    _, params = load.read_model(str(tmp_path))
    assert leaves_equal(params, imported[1])


def test_pytorch_model_bin_refuses_other_objects(tmp_path):
    torch.save({"w": torch.zeros(2), "run": os.system}, tmp_path / "evil.bin")
    with pytest.raises(hf.HuggingFaceError, match="posix.system"):
        hf.read_torch_state_dict(str(tmp_path / "evil.bin"))


def test_pytorch_model_bin_legacy_format(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(hf.HuggingFaceError, match="legacy") as e:
        hf.read_torch_state_dict(str(path))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- export


def random_jaxgpt(cfg: ModelConfig, seed: int = 0):
    """lecture.init_params plus N(0, 0.1) noise on every leaf (non-zero biases)."""
    params = lecture.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("bias", [True, False])
def test_exported_model_loads_in_transformers(tmp_path, bias):
    cfg = ModelConfig(
        vocab_size=1000,  # Not GPT-2's: no bos/eos ids.
        block_size=64,
        n_layer=2,
        n_head=4,
        n_embd=64,
        dropout=0.0,
        bias=bias,
        model="gpt",
        scan_layers=False,
    )
    params = random_jaxgpt(cfg)
    vocab = {"a": 0, "b": 1}
    load.write_model(
        "gpt2",
        params,
        cfg,
        str(tmp_path),
        tokenizer_files={"vocab.json": json.dumps(vocab), "merges.txt": b"#v\n"},
    )
    assert json.loads((tmp_path / "vocab.json").read_text()) == vocab
    assert (tmp_path / "merges.txt").read_bytes() == b"#v\n"
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert hf_model.config.eos_token_id is None
    assert hf_model.num_parameters() == param_count(dataclasses.replace(cfg, bias=True))
    idx_BT = random_ids(cfg.vocab_size)
    want_BTV, got_BTV = hf_logits(hf_model, idx_BT), jax_logits(cfg, params, idx_BT)
    diff = np.max(np.abs(got_BTV - want_BTV))
    print(f"export (bias={bias}): max |logit difference| = {diff:.2e}")
    assert diff <= TOL
    if not bias:  # Zero biases come back into a bias-free model unchanged.
        back = gpt2.params_from_hf(hf_files(str(tmp_path))[1], cfg)
        assert leaves_equal(back, params)


def test_export_gpt2_vocabulary_names_endoftext(tmp_path):
    cfg = ModelConfig(
        vocab_size=50257,
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=8,
        bias=True,
        model="gpt",
        scan_layers=False,
    )
    load.write_model(
        "gpt2", lecture.init_params(cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path)
    )
    config = transformers.GPT2Config.from_pretrained(str(tmp_path))
    assert (config.bos_token_id, config.eos_token_id) == (50256, 50256)
    assert (config.n_positions, config.n_layer, config.n_head, config.n_embd) == (
        16,
        1,
        2,
        8,
    )
    assert config.activation_function == "gelu_new" and config.tie_word_embeddings


def test_round_trip_is_bitwise(tmp_path, hf_gpt2, imported):
    cfg, params = imported
    load.write_model("gpt2", params, cfg, str(tmp_path))
    cfg2, params2 = load.read_model(str(tmp_path))
    assert cfg2 == cfg
    assert leaves_equal(params2, params)
    _, original = hf_files(hf_gpt2[1])  # And the tensors are the original file's.
    _, exported = hf_files(str(tmp_path))
    assert leaves_equal(exported, original)


def test_scan_layers_imports_and_exports_equal(hf_gpt2, imported):
    hf_model, folder = hf_gpt2
    cfg, params = imported
    scan_cfg, scan_params = load.read_model(folder, scan_layers=True)
    assert scan_cfg == dataclasses.replace(cfg, scan_layers=True)
    assert leaves_equal(scan_params, hf.stack_blocks(params))
    assert leaves_equal(
        gpt2.params_to_hf(scan_params, scan_cfg), gpt2.params_to_hf(params, cfg)
    )
    idx_BT = random_ids(cfg.vocab_size, shape=(1, 64), seed=2)
    diff = np.abs(
        jax_logits(scan_cfg, scan_params, idx_BT) - hf_logits(hf_model, idx_BT)
    )
    assert np.max(diff) <= TOL


# ---------------------------------------------------------------- errors


def assert_one_clear_line(excinfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_missing_tensor(imported):
    cfg, params = imported
    tensors = gpt2.params_to_hf(params, cfg)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(hf.HuggingFaceError, match="missing") as e:
        gpt2.params_from_hf(tensors, cfg)
    assert_one_clear_line(e, "'h.1.mlp.c_fc.bias'")


def test_wrong_shape(imported):
    cfg, params = imported
    tensors = gpt2.params_to_hf(params, cfg)
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((64, 63), np.float32)
    with pytest.raises(hf.HuggingFaceError, match="shape") as e:
        gpt2.params_from_hf(tensors, cfg)
    assert_one_clear_line(e, "'h.0.attn.c_proj.weight'", "[64, 63]", "[64, 64]")


def test_unexpected_tensor_and_untied_head(imported):
    cfg, params = imported
    tensors = gpt2.params_to_hf(params, cfg)
    with pytest.raises(hf.HuggingFaceError, match="unexpected") as e:
        gpt2.params_from_hf({**tensors, "score.weight": np.zeros((64, 2))}, cfg)
    assert_one_clear_line(e, "'score.weight'")
    untied = {**tensors, "lm_head.weight": tensors["transformer.wte.weight"] + 1}
    with pytest.raises(hf.HuggingFaceError, match="tied") as e:
        gpt2.params_from_hf(untied, cfg)
    assert_one_clear_line(e, "'lm_head.weight'")


def test_nonzero_bias_into_bias_free_model(imported):
    cfg, params = imported
    with pytest.raises(hf.HuggingFaceError, match="bias=False") as e:
        gpt2.params_from_hf(
            gpt2.params_to_hf(params, cfg), dataclasses.replace(cfg, bias=False)
        )
    assert_one_clear_line(e)


@pytest.mark.parametrize(
    "option,value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("layer_norm_epsilon", 1e-6),
        ("activation_function", "relu"),
        ("tie_word_embeddings", False),
        ("n_inner", 100),
        ("scale_attn_weights", False),
        ("model_type", "gpt_neo"),
    ],
)
def test_unsupported_config(hf_gpt2, option, value):
    config_json, _ = hf_files(hf_gpt2[1])
    with pytest.raises(hf.HuggingFaceError, match=option) as e:
        gpt2.config_from_hf({**config_json, option: value})
    assert_one_clear_line(e, repr(value))


def test_offline_name_fetch(monkeypatch):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub.\nMore."
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(hf.HuggingFaceError, match="local folder") as e:
        load.read_model("gpt2-medium")
    assert_one_clear_line(e, "'gpt2-medium'", "offline")


def test_bad_names_and_folders(tmp_path):
    with pytest.raises(hf.HuggingFaceError, match="neither a folder") as e:
        load.read_model("gpt3")
    assert_one_clear_line(e)
    with pytest.raises(hf.HuggingFaceError, match="config.json") as e:
        load.read_model(str(tmp_path))
    assert_one_clear_line(e)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(hf.HuggingFaceError, match="model.safetensors") as e:
        load.read_model(str(tmp_path))
    assert_one_clear_line(e)
    with pytest.raises(hf.HuggingFaceError, match="n_layer") as e:
        load.read_model(str(tmp_path), n_layer=3)
    assert_one_clear_line(e)

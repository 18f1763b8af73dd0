"""Only the entry points read flags, and each layer loads only what it needs:
parsing flags loads no JAX or Hugging Face library, preparing a dataset and
micrograd load no JAX, and the library functions a notebook or the lm-eval
model calls take their arguments, whatever the flags say."""

import json
import subprocess
import sys

import jax
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxgpt import lecture
from jaxgpt.config import ModelConfig
from jaxgpt.hub import hf, load, tokenizer_io
from jaxgpt.run import cli  # noqa: F401  (defines the flags)

HEAVY = ("jax", "flax", "optax", "orbax", "huggingface_hub", "safetensors", "torch")

LIGHT = {  # What a program does -> the heavy libraries it must not load.
    "from jaxgpt.run import cli; cli.FLAGS(['x', '--n_layer=3', '--dtype=bfloat16'])":
        HEAVY,
    "import jaxgpt.datasets.prepare, jaxgpt.datasets.tokenizer_train": HEAVY,
    "import jaxgpt.micrograd, jaxgpt.micrograd.bigram, jaxgpt.micrograd.demo":
        ("jax", "flax", "optax", "orbax"),
}  # fmt: skip


@pytest.mark.parametrize("program", list(LIGHT))
def test_light_programs_load_no_heavy_library(program):
    check = f"import json, sys; {program}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert not loaded & set(LIGHT[program]), sorted(loaded & set(LIGHT[program]))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 of context 16 in Hugging Face's layout, written by jaxgpt."""
    cfg = ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    params = lecture.init_params(cfg, jax.random.PRNGKey(0))
    folder = tmp_path_factory.mktemp("gpt2")
    files, _ = hf.tokenizer_files(tokenizer_io.load_gpt2())
    load.write_model("gpt2", params, cfg, str(folder), files)
    return str(folder)


NOT_DEFAULT = {"dtype": "bfloat16", "remat": True, "block_size": 8, "n_layer": 5}


@pytest.fixture
def odd_flags():
    """Flags parsed with values none of the calls below asks for."""
    flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(**NOT_DEFAULT):
        yield


def test_import_weights_takes_its_arguments_not_the_flags(gpt2_folder, odd_flags):
    model_cfg, _, _ = load.import_weights(gpt2_folder)
    assert (model_cfg.dtype, model_cfg.remat) == ("float32", False)
    assert (model_cfg.block_size, model_cfg.n_layer) == (16, 1)  # config.json's.
    model_cfg, _, _ = load.import_weights(gpt2_folder, {"dtype": "bfloat16"})
    assert (model_cfg.dtype, model_cfg.remat) == ("bfloat16", False)


def test_the_lm_eval_model_takes_its_arguments_not_the_flags(gpt2_folder, odd_flags):
    harness = pytest.importorskip("jaxgpt.evals.harness")
    lm = harness.JaxGPTLM(init_from=gpt2_folder, batch_size=2)
    assert (lm.model_cfg.dtype, lm.model_cfg.remat) == ("float32", False)
    assert lm.model_cfg.block_size == 16

"""Train a character-level GPT, or sample from a trained one.

  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg
  python -m jaxgpt.main --flagfile=experiments/shakespeare_cpu.cfg --mode=sample

The only module that reads flags: it builds the frozen configs and calls the
pure pieces (data, model, train, generate, checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import signal
import sys
import time
from pathlib import Path

import jax
from absl import app, flags, logging

from jaxgpt import checkpoint as ckpt
from jaxgpt import data, generate, model, perf, runtime, sharding, tokenizer
from jaxgpt.config import ConfigError, ModelConfig, SampleConfig, TrainConfig
from jaxgpt.train import abstract_state, create_state, train

_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "sample"],
    "train (resumes from --workdir if it holds a checkpoint),"
    " or sample from the checkpoint in --workdir.",
)
_DATA_PATH = flags.DEFINE_string(
    "data_path",
    None,
    "Corpus text file. Default:"
    " $JAXGPT_DATA_DIR/tinyshakespeare/input.txt, the"
    " cache, or a download.",
)
# Model.
_MODEL = flags.DEFINE_enum("model", "gpt", ["gpt", "bigram"], "Architecture.")
_N_LAYER = flags.DEFINE_integer("n_layer", 6, "Transformer blocks.")
_N_HEAD = flags.DEFINE_integer("n_head", 6, "Attention heads per block.")
_N_EMBD = flags.DEFINE_integer("n_embd", 384, "Embedding width (divisible by n_head).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 256, "Context length in tokens.")
_DROPOUT = flags.DEFINE_float("dropout", 0.0, "Dropout rate while training.")
_BIAS = flags.DEFINE_bool(
    "bias", False, "Biases in Dense and LayerNorm layers (nanoGPT trains without)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype of the blocks; parameters, softmax, logits and loss stay float32.",
)
_REMAT = flags.DEFINE_bool(
    "remat", False, "Recompute each block's activations in the backward pass."
)
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers",
    False,
    "nn.scan over the blocks: compile time flat in n_layer (checkpoints differ).",
)
_ATTENTION = flags.DEFINE_enum(
    "attention",
    "einsum",
    ["einsum", "dot_product", "cudnn"],
    "einsum (the math, spelled out), jax.nn.dot_product_attention (XLA's), or"
    " cudnn (its cuDNN flash attention: NVIDIA GPU, bfloat16). The last two have"
    " no attention dropout.",
)
# Training.
_WORKDIR = flags.DEFINE_string("workdir", "out", "Checkpoints and metrics.jsonl.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Delete the checkpoints in --workdir and start afresh."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Sequences per step.")
_MAX_ITERS = flags.DEFINE_integer("max_iters", 5000, "Training steps.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at",
    None,
    "Stop (and checkpoint) at this step"
    " without changing the schedule; rerun to resume.",
)
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_MIN_LR = flags.DEFINE_float("min_lr", 1e-4, "Learning rate at the end of decay.")
_WARMUP = flags.DEFINE_integer("warmup_iters", 100, "Linear warmup steps.")
_DECAY = flags.DEFINE_integer(
    "lr_decay_iters", None, "Cosine decay length (default: max_iters)."
)
_WD = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
_BETA1 = flags.DEFINE_float("beta1", 0.9, "AdamW beta1.")
_BETA2 = flags.DEFINE_float("beta2", 0.99, "AdamW beta2.")
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global-norm clip (0: off).")
_EVAL_INTERVAL = flags.DEFINE_integer("eval_interval", 250, "Steps between evals.")
_EVAL_ITERS = flags.DEFINE_integer("eval_iters", 200, "Batches per eval estimate.")
_LOG_INTERVAL = flags.DEFINE_integer("log_interval", 10, "Steps between log lines.")
_SEED = flags.DEFINE_integer("seed", 1337, "Seed of init, batches, dropout, sampling.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops",
    None,
    "Peak TFLOP/s of one device, for the MFU in the log. Default: the data"
    " sheet's for a known GPU/TPU (jaxgpt/perf.py), else measured with a matmul.",
)
# Sampling.
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "latest", ["latest", "best"], "Which checkpoint --mode=sample reads."
)
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text the samples continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.8, "Sampling temperature (0: greedy)."
)
_TOP_K = flags.DEFINE_integer("top_k", 200, "Sample among the k likeliest (0: all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw.")
_TOP_P = flags.DEFINE_float(
    "top_p", 1.0, "Sample among the likeliest tokens holding this mass (1: all)."
)
_KV_CACHE = flags.DEFINE_bool(
    "kv_cache", True, "Cache keys/values while sampling (no: re-run the window)."
)
# Scale: devices, hosts and micro-batches (see jaxgpt/sharding.py).
_MESH_DATA = flags.DEFINE_integer(
    "mesh_data", None, "Data-parallel axis of the device mesh (default: all / fsdp)."
)
_MESH_FSDP = flags.DEFINE_integer(
    "mesh_fsdp", 1, "FSDP axis: devices that split params and optimizer state."
)
_GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum_steps", 1, "Micro-batches per step (--batch_size a multiple of it)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for a run over several processes or hosts; with"
    " --num_processes and --process_id.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process: 0 .. n - 1.")


def model_config(vocab_size: int) -> ModelConfig:
    if _ATTENTION.value == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            "--attention=cudnn needs an NVIDIA GPU, and this run has"
            f" {jax.default_backend()}: use --attention=dot_product or einsum."
        )
    return ModelConfig(
        vocab_size=vocab_size,
        block_size=_BLOCK_SIZE.value,
        n_layer=_N_LAYER.value,
        n_head=_N_HEAD.value,
        n_embd=_N_EMBD.value,
        dropout=_DROPOUT.value,
        bias=_BIAS.value,
        model=_MODEL.value,
        dtype=_DTYPE.value,
        remat=_REMAT.value,
        scan_layers=_SCAN_LAYERS.value,
        attention=_ATTENTION.value,
    )


def train_config() -> TrainConfig:
    return TrainConfig(
        workdir=_WORKDIR.value,
        batch_size=_BATCH_SIZE.value,
        grad_accum_steps=_GRAD_ACCUM.value,
        max_iters=_MAX_ITERS.value,
        stop_at=_STOP_AT.value,
        learning_rate=_LR.value,
        min_lr=_MIN_LR.value,
        warmup_iters=_WARMUP.value,
        lr_decay_iters=_DECAY.value,
        weight_decay=_WD.value,
        beta1=_BETA1.value,
        beta2=_BETA2.value,
        grad_clip=_GRAD_CLIP.value,
        eval_interval=_EVAL_INTERVAL.value,
        eval_iters=_EVAL_ITERS.value,
        log_interval=_LOG_INTERVAL.value,
        seed=_SEED.value,
        overwrite=_OVERWRITE.value,
    )


def sample_config() -> SampleConfig:
    return SampleConfig(
        prompt=_PROMPT.value,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value or None,
        top_p=_TOP_P.value,
        num_samples=_NUM_SAMPLES.value,
        seed=_SEED.value,
        kv_cache=_KV_CACHE.value,
    )


def restore_state(checkpointer, model_cfg, train_cfg, mesh, which=ckpt.LATEST):
    abstract = abstract_state(model_cfg, train_cfg, mesh)  # With shardings.
    try:
        return checkpointer.restore(abstract, which=which)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"the checkpoint in --workdir={train_cfg.workdir} does not match this"
            f" model or optimizer ({str(e).splitlines()[0][:200]}). Pass --overwrite"
            " to start afresh, or choose another --workdir."
        ) from e


def print_samples(state, model_cfg: ModelConfig, vocab: str, cfg: SampleConfig) -> None:
    try:
        prompt_ids = tokenizer.encode(cfg.prompt, vocab)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from e
    t0 = time.perf_counter()
    ids_BS = jax.device_get(
        generate.sample(state.apply_fn, state.params, model_cfg, prompt_ids, cfg)
    )
    dt = time.perf_counter() - t0
    for row in ids_BS:
        print(tokenizer.decode(row, vocab))
        print("-" * 40)
    logging.info(
        "sampled %d x %d tokens in %.2fs (compile included)",
        cfg.num_samples,
        cfg.max_new_tokens,
        dt,
    )


def make_mesh():
    return sharding.make_mesh(_MESH_DATA.value, _MESH_FSDP.value)


def run_train(train_cfg: TrainConfig, sample_cfg: SampleConfig) -> int:
    mesh = make_mesh()
    sharding.check_batch(train_cfg.batch_size, train_cfg.grad_accum_steps, mesh)
    text = data.load_text(_DATA_PATH.value)
    workdir = Path(train_cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if train_cfg.overwrite:
        ckpt.clear(workdir)
    checkpointer = ckpt.Checkpointer(workdir)
    resuming = checkpointer.latest_step() is not None
    meta = checkpointer.read_meta() if resuming else {}
    vocab = tokenizer.build_vocab(text)
    model_cfg = model_config(len(vocab))
    if resuming:
        ckpt.check_compatible(meta["model"], model_cfg, workdir)
        if meta["vocab"] != vocab:
            raise ConfigError(
                f"--workdir={workdir} holds a checkpoint trained on a corpus with a"
                " different vocabulary. Pass --overwrite to start afresh there, or"
                " choose another --workdir."
            )
    train_tokens, val_tokens = data.split(tokenizer.encode(text, vocab))
    data.check_long_enough(len(train_tokens), model_cfg.block_size, "training split")
    data.check_long_enough(
        len(val_tokens),
        model_cfg.block_size,
        "validation split (the last 10% of the corpus)",
    )
    if resuming:
        state = restore_state(checkpointer, model_cfg, train_cfg, mesh)
        logging.info("resuming from step %d in %s", int(state.step), workdir)
    else:
        state = create_state(model_cfg, train_cfg, mesh)
    n_params = model.count_params(state.params)
    peak, peak_source = perf.peak_flops(model_cfg.dtype, _PEAK_TFLOPS.value)
    logging.info("peak %.4g GFLOP/s per device (%s)", peak / 1e9, peak_source)
    logging.info(
        "%s: %s parameters (%s without position embeddings); vocab %d,"
        " %s train / %s val tokens; mesh %s over %d devices, %d process(es)",
        model_cfg.model,
        f"{n_params:,}",
        f"{n_params - model_cfg.block_size * model_cfg.n_embd:,}"
        if model_cfg.model == "gpt"
        else f"{n_params:,}",
        len(vocab),
        f"{len(train_tokens):,}",
        f"{len(val_tokens):,}",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
    )
    meta = {
        "model": model_cfg.to_dict(),
        "train": dataclasses.asdict(train_cfg),
        "vocab": vocab,
        "best_val_loss": meta.get("best_val_loss", float("inf")),
    }
    t0 = time.perf_counter()
    try:
        state, history = train(
            state,
            model_cfg,
            train_cfg,
            train_tokens,
            val_tokens,
            checkpointer,
            meta,
            flops_per_token=model.flops_per_token(model_cfg),
            peak_flops=peak,
            mesh=mesh,
        )
    finally:
        checkpointer.wait()
        checkpointer.close()
    logging.info(
        "trained to step %d in %.1fs", int(state.step), time.perf_counter() - t0
    )
    if history["stopped_by"] in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[history["stopped_by"]].value
    params = sharding.to_local(state.params, mesh)  # Every process takes part.
    if sharding.is_main_process():
        print_samples(state.replace(params=params), model_cfg, vocab, sample_cfg)
    return 0


def run_sample(train_cfg: TrainConfig, sample_cfg: SampleConfig) -> int:
    workdir = Path(train_cfg.workdir)
    which = ckpt.BEST if _CHECKPOINT.value == "best" else ckpt.LATEST
    checkpointer = ckpt.Checkpointer(workdir)
    if checkpointer.latest_step(which) is None:
        raise ConfigError(
            f"no {_CHECKPOINT.value} checkpoint in --workdir={workdir}:"
            " train first (--mode=train) or point --workdir at a run."
        )
    meta = checkpointer.read_meta(which)
    model_cfg = ModelConfig(**meta["model"])
    saved_train_cfg = TrainConfig(**meta["train"])
    mesh = make_mesh()
    state = restore_state(checkpointer, model_cfg, saved_train_cfg, mesh, which)
    checkpointer.close()
    logging.info("sampling from step %d of %s", int(state.step), workdir)
    params = sharding.to_local(state.params, mesh)  # Every process takes part.
    if sharding.is_main_process():
        print_samples(
            state.replace(params=params), model_cfg, meta["vocab"], sample_cfg
        )
    return 0


class _OwnInfoOnly(pylogging.Filter):
    """Keeps jaxgpt's INFO lines and every library's warnings, not their INFO chatter."""

    package_dir = str(Path(__file__).resolve().parent)

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or str(
            Path(record.pathname).resolve()
        ).startswith(self.package_dir)


def main(argv: list[str]) -> int:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    runtime.keep_freed_memory()  # Before XLA allocates: no page faults per step.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        sharding.initialize_distributed(  # Before any other use of JAX.
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
        if not sharding.is_main_process():
            logging.set_verbosity(logging.WARNING)  # Process 0 logs for all.
        train_cfg, sample_cfg = train_config(), sample_config()
        if _MODE.value == "sample":
            return run_sample(train_cfg, sample_cfg)
        return run_train(train_cfg, sample_cfg)
    except (ConfigError, data.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)

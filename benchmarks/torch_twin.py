"""A minimal PyTorch twin of jaxgpt's GPT, for measuring jaxgpt against PyTorch.

  python benchmarks/torch_twin.py --flagfile=experiments/shakespeare_cpu.cfg

The same network as jaxgpt/model.py (pre-LayerNorm blocks, tanh GELU, tied
output layer, no biases with --nobias), the same initialisation (normal 0.02,
the residual projections 0.02 / sqrt(2L)), the same batches (data.get_batch
from the run's batch stream), the same fixed evaluation batches, and the same
optimizer and schedule (AdamW with decay on matrices only, global-norm
clipping, jaxgpt's warmup-cosine schedule), all in float32, written the way
nanoGPT writes them (nn.Linear, scaled_dot_product_attention, torch.optim.AdamW).
Run as a script it does what `python -m jaxgpt.main` does for a recipe: train
with evaluations, saving a checkpoint (torch.save, into a temporary directory)
whenever the val loss improves as nanoGPT's train.py does for it, then print a
sample with nanoGPT's generate() (no KV cache).

The flags --nanogpt_warmup, _eval, _gelu, _init and _batches (Knobs) switch
single details to nanoGPT's own choices, to find which of them moves the
final loss.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

from jaxgpt import data, train
from jaxgpt.config import ModelConfig, TrainConfig
from jaxgpt.datasets import prepare
from jaxgpt.run import cli  # Defines the flags.
from jaxgpt.run.configs import DataConfig, LoopConfig, RunConfig, SampleConfig


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, exact_gelu: bool = False):
        super().__init__()
        C, bias = cfg.n_embd, cfg.bias
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.ln_1 = nn.LayerNorm(C, eps=1e-5, bias=bias)
        self.c_attn = nn.Linear(C, 3 * C, bias=bias)
        self.attn_proj = nn.Linear(C, C, bias=bias)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5, bias=bias)
        self.c_fc = nn.Linear(C, 4 * C, bias=bias)
        self.gelu = nn.GELU(approximate="none" if exact_gelu else "tanh")
        self.mlp_proj = nn.Linear(4 * C, C, bias=bias)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.c_attn(self.ln_1(x_BTC)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y_BHTD = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y_BTC = y_BHTD.transpose(1, 2).contiguous().view(B, T, C)
        x_BTC = x_BTC + F.dropout(self.attn_proj(y_BTC), p)
        mlp_BTC = self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x_BTC))))
        return x_BTC + F.dropout(mlp_BTC, p)


class GPT(nn.Module):
    """jaxgpt's GPT (model.GPT) in PyTorch, dropout in the same places (its masks
    from torch's generator)."""

    def __init__(self, cfg: ModelConfig, exact_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, exact_gelu) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2's initialisation, as model.py: normal(0.02), residual projections
        0.02 / sqrt(2L), zero biases, unit LayerNorm scales."""
        residual = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = residual if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def load_flax(self, params) -> None:
        """Copies jaxgpt's parameters (a Flax tree, plain blocks) into this model."""
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
        pairs = [(self.wte.weight, params["wte"]["embedding"])]
        pairs += [(self.wpe.weight, params["wpe"]["embedding"])]
        pairs += [(self.ln_f.weight, params["ln_f"]["scale"])]
        for i, block in enumerate(self.h):
            p = params[f"h_{i}"]
            pairs += [(block.ln_1.weight, p["ln_1"]["scale"])]
            pairs += [(block.ln_2.weight, p["ln_2"]["scale"])]
            for mine, (group, name) in [
                (block.c_attn, ("attn", "c_attn")),
                (block.attn_proj, ("attn", "c_proj")),
                (block.c_fc, ("mlp", "c_fc")),
                (block.mlp_proj, ("mlp", "c_proj")),
            ]:
                pairs += [(mine.weight, np.asarray(p[group][name]["kernel"]).T)]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.copy_(t(theirs))

    def forward(self, idx_BT: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        T = idx_BT.shape[1]
        x_BTC = self.wte(idx_BT) + self.wpe(torch.arange(T))
        x_BTC = F.dropout(x_BTC, self.cfg.dropout if self.training else 0.0)
        for block in self.h:
            x_BTC = block(x_BTC)
        x_BTC = self.ln_f(x_BTC)
        if last_only:  # nanoGPT's inference shortcut: logits of the last position.
            x_BTC = x_BTC[:, -1:]
        return x_BTC @ self.wte.weight.T  # Tied output layer: logits_BTV.


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (embeddings included) only."""
    params = list(model.parameters())
    groups = [
        {
            "params": [p for p in params if p.ndim >= 2],
            "weight_decay": cfg.weight_decay,
        },
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8
    )


def lr_at(step: int, cfg: TrainConfig, nanogpt_warmup: bool = False) -> float:
    """The learning rate of update `step` (0-based): jaxgpt's (optax's
    warmup_cosine_decay_schedule, 0 at step 0), or nanoGPT's get_lr (warmup
    from lr / (warmup + 1))."""
    w, d, top, low = (
        cfg.warmup_iters,
        cfg.lr_decay_iters,
        cfg.learning_rate,
        cfg.min_lr,
    )
    if step < w:
        return top * (step + 1) / (w + 1) if nanogpt_warmup else top * step / w
    if step > d:
        return low
    ratio = (step - w) / (d - w)
    return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (top - low)


def loss_of(model: GPT, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    logits_BTV = model(x_BT)
    return F.cross_entropy(logits_BTV.view(-1, logits_BTV.shape[-1]), y_BT.view(-1))


def make_train_step(model: GPT, cfg: TrainConfig) -> Callable:
    """step(x_BT, y_BT, lr) -> loss tensor: one clipped AdamW update, as nanoGPT's loop."""
    opt = make_optimizer(model, cfg)

    def step(x_BT, y_BT, lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(model, x_BT, y_BT)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.optimizer = opt  # For checkpoints.
    return step


def batches(tokens: np.ndarray, root, batch_size: int, block_size: int) -> Callable:
    """batch(step) -> (x_BT, y_BT): jaxgpt's batch of that step (train.make_batches)."""
    stream = np.asarray(train.stream(root, "batch"))

    def batch(step: int):
        rng = train.host_rng(stream, step)
        x, y = data.get_batch(tokens, rng, batch_size, block_size)
        return torch.from_numpy(x).long(), torch.from_numpy(y).long()

    return batch


def make_evaluate(
    model: GPT,
    splits: dict[str, np.ndarray],
    root,
    cfg: TrainConfig,
    block_size: int,
    fresh: np.random.Generator | None = None,
) -> Callable[[], dict[str, float]]:
    """evaluate() -> {"<split>_loss"}: jaxgpt's fixed evaluation batches
    (train.eval_batches), or with `fresh`, new random ones each time (nanoGPT)."""
    stream = np.asarray(train.stream(root, "eval"))
    B, n = cfg.batch_size, cfg.eval_iters

    def draw(tokens, i):
        rng = fresh if fresh is not None else train.host_rng(stream, i)
        x, y = data.get_batch(tokens, rng, B, block_size)
        return torch.from_numpy(x).long(), torch.from_numpy(y).long()

    fixed = {k: [draw(t, i) for i in range(n)] for k, t in splits.items()}

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = {}
        for name, tokens in splits.items():
            xs = [draw(tokens, i) for i in range(n)] if fresh else fixed[name]
            out[f"{name}_loss"] = float(
                np.mean([loss_of(model, x, y).item() for x, y in xs])
            )
        model.train()
        return out

    return evaluate


@torch.no_grad()
def generate(
    model: GPT,
    idx_BP: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """nanoGPT's generate(): re-runs the model on the last block_size tokens
    for every new token (no KV cache)."""
    model.eval()
    for _ in range(max_new_tokens):
        idx_cond = idx_BP[:, -model.cfg.block_size :]
        logits_BV = model(idx_cond, last_only=True)[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits_BV, min(top_k, logits_BV.size(-1)))
            logits_BV[logits_BV < v[:, [-1]]] = -float("inf")
        probs_BV = F.softmax(logits_BV, dim=-1)
        idx_next = torch.multinomial(probs_BV, num_samples=1, generator=generator)
        idx_BP = torch.cat((idx_BP, idx_next), dim=1)
    return idx_BP


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Which details follow nanoGPT instead of jaxgpt (all False: jaxgpt's run)."""

    warmup: bool = False  # lr (s+1)/(w+1) from the first step, not 0.
    eval: bool = False  # Fresh random evaluation batches at every evaluation.
    gelu: bool = False  # Exact GELU, not tanh's.
    init: bool = False  # The initial draw from torch's generator, not jaxgpt's.
    batches: bool = False  # Batches from torch.randint, not jaxgpt's batch stream.

    @classmethod
    def nanogpt(cls) -> Knobs:
        return cls(True, True, True, True, True)


def torch_batches(tokens: np.ndarray, seed: int, B: int, T: int) -> Callable:
    """nanoGPT's get_batch: window starts from torch.randint."""
    data, gen = torch.from_numpy(tokens.astype(np.int64)), torch.Generator()
    gen.manual_seed(seed)

    def batch(step: int):
        ix = torch.randint(len(data) - T, (B,), generator=gen)
        x = torch.stack([data[i : i + T] for i in ix])
        return x, torch.stack([data[i + 1 : i + 1 + T] for i in ix])

    return batch


@torch.no_grad()
def full_loss(model: GPT, tokens: np.ndarray, T: int, rows: int = 256) -> float:
    """Mean loss over every whole window of T tokens of `tokens`, side by side:
    an estimate free of the choice of evaluation batches."""
    n = (len(tokens) - 1) // T
    x = torch.from_numpy(tokens[: n * T].astype(np.int64)).view(n, T)
    y = torch.from_numpy(tokens[1 : n * T + 1].astype(np.int64)).view(n, T)
    model.eval()
    total = sum(
        loss_of(model, x[i : i + rows], y[i : i + rows]).item() * len(x[i : i + rows])
        for i in range(0, n, rows)
    )
    model.train()
    return total / n


def train_recipe(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    loop_cfg: LoopConfig,
    splits: dict[str, np.ndarray],
    seed: int,
    knobs: Knobs = Knobs(),
    on_eval: Callable[..., None] = lambda step, losses, model, optimizer: None,
) -> GPT:
    """Trains the twin on the recipe, evaluating every eval_interval steps;
    on_eval(step, losses, model, optimizer) sees each evaluation."""
    root = train.root_key(seed)
    torch.manual_seed(seed)
    model = GPT(model_cfg, exact_gelu=knobs.gelu)
    if knobs.init:
        model.init_weights(torch.Generator().manual_seed(seed))
    else:  # jaxgpt's initial parameters, drawn from the params stream.
        from jaxgpt import lecture

        model.load_flax(lecture.init_params(model_cfg, train.stream(root, "params")))
    T, B = model_cfg.block_size, train_cfg.batch_size
    step_fn = make_train_step(model, train_cfg)
    if knobs.batches:
        next_batch = torch_batches(splits["train"], seed, B, T)
    else:
        next_batch = batches(splits["train"], root, B, T)
    fresh = np.random.default_rng(seed) if knobs.eval else None
    evaluate = make_evaluate(model, splits, root, train_cfg, T, fresh)
    on_eval(0, evaluate(), model, step_fn.optimizer)
    for step in range(train_cfg.max_iters):
        loss = step_fn(*next_batch(step), lr_at(step, train_cfg, knobs.warmup))
        done = step + 1
        if done % loop_cfg.log_interval == 0:
            print(f"step {done}: loss {loss.item():.4f}", flush=True)
        if done % loop_cfg.eval_interval == 0 or done == train_cfg.max_iters:
            on_eval(done, evaluate(), model, step_fn.optimizer)
    return model


def recipe_data() -> tuple[Any, dict[str, np.ndarray]]:
    """The recipe's tokenizer and its splits as arrays, read (and prepared if
    need be) as `python -m jaxgpt.main` reads them."""
    dataset = prepare.read_dataset(cli.from_flags(DataConfig))
    return dataset.tokenizer, {k: np.asarray(v) for k, v in dataset.splits.items()}


def main(argv):
    """The twin of `python -m jaxgpt.main` for a recipe: train, evaluate, sample.

    Prints jaxgpt's log lines ("step N: train loss ..., val loss ...") so the
    same reader times both.
    """
    del argv
    FLAGS = flags.FLAGS
    run_cfg = cli.from_flags(RunConfig)
    train_cfg = cli.from_flags(TrainConfig)
    loop_cfg = cli.from_flags(LoopConfig, max_iters=train_cfg.max_iters)
    sample_cfg = cli.from_flags(SampleConfig)
    tok, splits = recipe_data()
    model_cfg = cli.from_flags(ModelConfig, vocab_size=tok.vocab_size)
    knobs = Knobs(**{k: FLAGS[f"nanogpt_{k}"].value for k in Knobs.__annotations__})

    out_dir = Path(tempfile.mkdtemp(prefix="torch_twin_"))
    best = {"val_loss": math.inf}

    def log_eval(step, losses, model, optimizer):
        """Prints jaxgpt's line; saves a checkpoint as nanoGPT's train.py does
        for the recipe (model, optimizer and progress, when val loss improves)."""
        print(
            f"step {step}: train loss {losses['train_loss']:.4f},"
            f" val loss {losses['val_loss']:.4f}",
            flush=True,
        )
        if step > 0 and losses["val_loss"] < best["val_loss"]:
            best["val_loss"] = losses["val_loss"]
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iter_num": step,
                "best_val_loss": best["val_loss"],
            }
            torch.save(checkpoint, out_dir / "ckpt.pt")
            print(f"saving checkpoint to {out_dir}", flush=True)  # As nanoGPT.

    t0 = time.perf_counter()
    model = train_recipe(
        model_cfg, train_cfg, loop_cfg, splits, run_cfg.seed, knobs, log_eval
    )
    print(f"trained in {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    prompt = torch.from_numpy(np.asarray(tok.encode(sample_cfg.prompt), np.int64))[None]
    out = generate(
        model,
        prompt,
        sample_cfg.max_new_tokens,
        sample_cfg.temperature,
        sample_cfg.top_k or None,
        torch.Generator().manual_seed(run_cfg.seed),
    )
    print(tok.decode(out[0].tolist()))
    print(f"sampled in {time.perf_counter() - t0:.2f}s", flush=True)
    shutil.rmtree(out_dir)


for _knob in Knobs.__annotations__:
    flags.DEFINE_bool(f"nanogpt_{_knob}", False, f"nanoGPT's {_knob} (see Knobs).")

if __name__ == "__main__":
    app.run(main)

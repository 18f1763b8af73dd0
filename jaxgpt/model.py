"""The GPT (nanoGPT's architecture, or a modern one's) and the bigram baseline.

Shapes are suffixes: B batch, T time (sequence), C embedding (n_embd),
H heads, K key/value heads (H unless grouped-query), D head size (C // H),
F the feed-forward's hidden width, V vocabulary, L layers, S key positions
(T, or block_size when decoding from the cache).

ModelConfig's options are GPT-2's by default; docs/architecture.md describes
the modern ones (rotary positions, RMSNorm, SwiGLU, grouped-query attention...)
and those that leave the math as it is (bfloat16 matmuls, remat, scan_layers,
fused attention). With decode=True the model runs on the next tokens of a
sequence whose keys and values sit in the "cache" collection (generate.py).
The building blocks come first, then the model; the registry of every model
by its --model name ends lecture.py.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import ModelConfig

# --- Building blocks ---------------------------------------------------------

init_normal = nn.initializers.normal(stddev=0.02)  # GPT-2 initialisation.


class Dense(nn.Dense):
    """nn.Dense on the rows of x_...C: one 2-D [N, C] matmul, same parameters and
    math. On 3-D input XLA:CPU transposes the weight gradient in a strided copy:
    the CPU recipe's step takes 57.6 ms instead of 42.7 (2-core AMD EPYC)."""

    def __call__(self, x_NC: jax.Array) -> jax.Array:
        *lead, C = x_NC.shape
        return super().__call__(x_NC.reshape(-1, C)).reshape(*lead, self.features)


def residual_init(config: ModelConfig):
    """GPT-2 scales the projections that write into the residual stream by 1/sqrt(2L)."""
    return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * config.n_layer))


def dense(cfg: ModelConfig, features: int, kernel_init, name: str) -> Dense:
    """A Dense layer that computes in cfg.dtype; its parameters stay float32."""
    return Dense(
        features,
        use_bias=cfg.bias,
        kernel_init=kernel_init,
        dtype=jnp.dtype(cfg.dtype),
        name=name,
    )


def norm(cfg: ModelConfig, name: str, dtype: str | None = None) -> nn.Module:
    """The norm --norm names, over the last axis: LayerNorm (GPT-2's) or RMSNorm,
    with a learned scale unless --nonorm_scale; statistics in float32."""
    dtype = jnp.dtype(dtype) if dtype else None
    Norm = nn.RMSNorm  # x / sqrt(mean(x^2) + eps) * scale.
    if cfg.norm == "layernorm":  # (x - mean) / sqrt(var + eps) * scale + bias.
        Norm = functools.partial(nn.LayerNorm, use_bias=cfg.bias)
    return Norm(epsilon=cfg.norm_eps, use_scale=cfg.norm_scale, dtype=dtype, name=name)


def rope(x_BTND: jax.Array, pos_T: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al., 2021) in Llama's rotate-half layout:
    channels i and i + D/2 of each head form a pair, turned by the angle
    pos * theta^(-2i/D) (pos_T, or each row's own: pos_BT). Computed in float32,
    returned in x's dtype."""
    D = x_BTND.shape[-1]
    inv_freq_F = 1.0 / theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # D/2.
    angle_TF = pos_T.astype(jnp.float32)[..., None] * inv_freq_F  # Or [B, T, F].
    cos_T1F, sin_T1F = (f(angle_TF)[..., None, :] for f in (jnp.cos, jnp.sin))
    x1, x2 = jnp.split(x_BTND.astype(jnp.float32), 2, axis=-1)
    turned = [x1 * cos_T1F - x2 * sin_T1F, x2 * cos_T1F + x1 * sin_T1F]
    return jnp.concatenate(turned, axis=-1).astype(x_BTND.dtype)


def use_cudnn(cfg: ModelConfig, decode: bool) -> bool:
    """--attention=cudnn on a GPU outside decoding; elsewhere (a masked cache, a
    laptop sampling a GPU-trained checkpoint) XLA's version does the same math."""
    return cfg.attention == "cudnn" and not decode and jax.default_backend() == "gpu"


def cached_attention(q_BTHD, k_BKSD, v_BKSD, q_pos_T, k_pos_S, used, C=128):
    """Attention of T new queries (at q_pos_T) over the KV cache's first `used`
    slots (slot s holds position k_pos_S[s]), read C slots at a time with an
    online softmax, so a step reads the slots in use, not all S = block_size.
    A chunk a query cannot see changes nothing (its weights are exactly 0), so
    rows decoded together get what they get alone. The cache keeps each head's
    keys and values in one block, [B, K, S, D], read without a transpose.
    Query head h reads key/value head h // (H / K)."""
    B, T, H, D = q_BTHD.shape
    K, S = k_BKSD.shape[1:3]
    C = min(C, S)
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)  # G = H / K query heads per K.

    def chunk(c, carry):  # Slots c*C .. c*C + C - 1 (the last chunk: S - C ..).
        top_BKGT, sum_BKGT, y_BKGTD = carry  # The max score, sum(exp), sum(exp v).
        at = jnp.minimum(c * C, S - C)
        k_BKCD, v_BKCD = (
            jax.lax.dynamic_slice_in_dim(z, at, C, 2) for z in (k_BKSD, v_BKSD)
        )
        slot_C = at + jnp.arange(C)
        k_pos_C = jax.lax.dynamic_slice_in_dim(k_pos_S, at, C)
        keep_TC = (q_pos_T[:, None] >= k_pos_C) & (slot_C >= c * C)  # Causal, new.
        att_BKGTC = jnp.einsum(
            "btkgd,bkcd->bkgtc", q_BTKGD, k_BKCD, preferred_element_type=jnp.float32
        ) / math.sqrt(D)
        att_BKGTC = jnp.where(keep_TC, att_BKGTC, jnp.finfo(jnp.float32).min)
        new_top_BKGT = jnp.maximum(top_BKGT, att_BKGTC.max(-1))
        p_BKGTC = jnp.exp(att_BKGTC - new_top_BKGT[..., None])
        scale_BKGT = jnp.exp(top_BKGT - new_top_BKGT)  # Rescales the sums so far.
        y_BKGTD = y_BKGTD * scale_BKGT[..., None] + jnp.einsum(
            "bkgtc,bkcd->bkgtd", p_BKGTC.astype(v_BKCD.dtype), v_BKCD,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return new_top_BKGT, sum_BKGT * scale_BKGT + p_BKGTC.sum(-1), y_BKGTD

    top_BKGT = jnp.full((B, K, H // K, T), jnp.finfo(jnp.float32).min)
    zeros_BKGT = jnp.zeros((B, K, H // K, T))
    carry = (top_BKGT, zeros_BKGT, jnp.zeros((B, K, H // K, T, D)))
    if C == S:  # One chunk: no loop (under vmap, a loop's counter is per row).
        _, sum_BKGT, y_BKGTD = chunk(0, carry)
    else:
        _, sum_BKGT, y_BKGTD = jax.lax.fori_loop(0, -(-used // C), chunk, carry)
    y_BKGTD = (y_BKGTD / sum_BKGT[..., None]).astype(v_BKSD.dtype)
    return y_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def count_params(params) -> int:
    """The number of parameters in a tree (of arrays or their shapes)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# --- The model ------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only.

    With K < H key/value heads (grouped-query attention), query head h reads
    key/value head h // (H / K). In rows of packed conversations (seg_BT: each
    token's conversation), a token sees only its own conversation, at its
    positions within it (pos_BT)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_BTC, deterministic, decode=False, start=0, seg_BT=None, pos_BT=None
    ) -> jax.Array:
        cfg = self.config
        B, T, C = x_BTC.shape
        H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_BTX = dense(cfg, (H + 2 * K) * D, init_normal, "c_attn")(x_BTC)
        q_BTHD, k_BSKD, v_BSKD = jnp.split(
            qkv_BTX.reshape(B, T, H + 2 * K, D), [H, H + K], axis=2
        )
        if cfg.qk_norm:  # Each head's query and key normalised over its D channels.
            q_BTHD = norm(cfg, "q_norm", cfg.dtype)(q_BTHD)
            k_BSKD = norm(cfg, "k_norm", cfg.dtype)(k_BSKD)
        q_pos_T = k_pos_S = start + jnp.arange(T)  # Positions of these tokens.
        if cfg.position == "rope":  # Scores then depend on q_pos - k_pos only.
            pos = q_pos_T if pos_BT is None else pos_BT
            q_BTHD = rope(q_BTHD, pos, cfg.rope_theta)
            k_BSKD = rope(k_BSKD, pos, cfg.rope_theta)
        if decode:  # The keys and values so far come from the cache; these join them.
            k_BKSD, v_BKSD, k_pos_S = self.append_to_cache(k_BSKD, v_BSKD, start)
        keep_B1TS = (q_pos_T[:, None] >= k_pos_S[None, :])[None, None]  # Causal.
        if seg_BT is not None:  # And within one conversation.
            keep_B1TS &= seg_BT[:, None, :, None] == seg_BT[:, None, None, :]
        masked = decode or seg_BT is not None
        if decode:
            used = jnp.minimum(start + T, cfg.block_size)  # Slots written so far.
            y_BTHD = cached_attention(q_BTHD, k_BKSD, v_BKSD, q_pos_T, k_pos_S, used)
        elif cfg.attention == "einsum":
            k_BSHD, v_BSHD = k_BSKD, v_BSKD
            if K < H:  # Each key/value head serves H / K query heads in a row.
                k_BSHD, v_BSHD = (
                    jnp.repeat(z, H // K, axis=2) for z in (k_BSKD, v_BSKD)
                )
            # Scaled dot-product scores; 1/sqrt(D) keeps their variance near 1.
            att_BHTS = jnp.einsum(
                "bqhd,bkhd->bhqk", q_BTHD, k_BSHD, preferred_element_type=jnp.float32
            ) / math.sqrt(D)
            att_BHTS = jnp.where(keep_B1TS, att_BHTS, jnp.finfo(jnp.float32).min)
            att_BHTS = jax.nn.softmax(att_BHTS, axis=-1)
            att_BHTS = nn.Dropout(cfg.dropout)(att_BHTS, deterministic=deterministic)
            y_BTHD = jnp.einsum(
                "bhqk,bkhd->bqhd", att_BHTS.astype(v_BSHD.dtype), v_BSHD
            )
        else:  # The same math in one call (cuDNN's flash attention can serve it).
            y_BTHD = jax.nn.dot_product_attention(
                q_BTHD,
                k_BSKD,
                v_BSKD,
                mask=keep_B1TS if masked else None,
                is_causal=not masked,
                implementation="cudnn" if use_cudnn(cfg, masked) else None,
            )
        y_BTC = dense(cfg, C, residual_init(cfg), "c_proj")(y_BTHD.reshape(B, T, C))
        return nn.Dropout(cfg.dropout)(y_BTC, deterministic=deterministic)

    def append_to_cache(self, k_BTKD: jax.Array, v_BTKD: jax.Array, start):
        """Writes the keys and values of positions start .. start + T - 1 into the
        cache's S = block_size slots, position p in slot p % S (a ring buffer:
        past S, rotary positions roll on); returns all S slots, heads first
        ([B, K, S, D]), and the position each holds, k_pos_S (unwritten:
        INT32_MAX, which the causal mask hides). A call of T > 1 tokens must
        not wrap around (prefills start at 0)."""
        B, T, K, D = k_BTKD.shape
        S = self.config.block_size
        k_cache = self.variable("cache", "k", jnp.zeros, (B, K, S, D), k_BTKD.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, (B, K, S, D), v_BTKD.dtype)
        at = (0, 0, start % S, 0)
        for cache, z_BTKD in ((k_cache, k_BTKD), (v_cache, v_BTKD)):
            z_BKTD = z_BTKD.transpose(0, 2, 1, 3)
            cache.value = jax.lax.dynamic_update_slice(cache.value, z_BKTD, at)
        slot_S = jnp.arange(S)  # Holds the last position p < start + T, p % S = slot.
        k_pos_S = slot_S + S * ((start + T - 1 - slot_S) // S)
        k_pos_S = jnp.where(k_pos_S >= 0, k_pos_S, jnp.iinfo(jnp.int32).max)
        return k_cache.value, v_cache.value, k_pos_S


class MLP(nn.Module):
    """Position-wise feed-forward: C -> F -> activation -> C (GPT-2: F = 4C, GELU).

    SwiGLU's two input matrices (gate, then up) are one [C, 2F] kernel."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        F = cfg.hidden_dim
        if cfg.mlp == "swiglu":  # SiLU(x W_gate) * (x W_up).
            h_BT2F = dense(cfg, 2 * F, init_normal, "c_fc")(x_BTC)
            gate_BTF, up_BTF = jnp.split(h_BT2F, 2, axis=-1)
            h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        else:
            h_BTF = dense(cfg, F, init_normal, "c_fc")(x_BTC)
            if cfg.mlp == "gelu":
                h_BTF = jax.nn.gelu(h_BTF, approximate=True)  # GPT-2's tanh GELU.
            else:  # relu2: ReLU squared.
                h_BTF = jnp.square(jax.nn.relu(h_BTF))
        y_BTC = dense(cfg, cfg.n_embd, residual_init(cfg), "c_proj")(h_BTF)
        return nn.Dropout(cfg.dropout)(y_BTC, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTC, deterministic, decode=False, start=0, *packed):
        cfg = self.config
        ln = lambda name: norm(cfg, name, cfg.dtype)
        x_BTC = x_BTC + CausalSelfAttention(cfg, name="attn")(
            ln("ln_1")(x_BTC), deterministic, decode, start, *packed
        )
        x_BTC = x_BTC + MLP(cfg, name="mlp")(ln("ln_2")(x_BTC), deterministic)
        return x_BTC


class ScannedBlock(Block):
    """A Block with nn.scan's signature: (carry, x) -> (carry, output)."""

    def __call__(self, x_BTC, deterministic, decode=False, start=0, *packed):
        return super().__call__(x_BTC, deterministic, decode, start, *packed), None


class GPT(nn.Module):
    """Token (+ learned position) embeddings, L blocks, a final norm, the output
    layer (tied to the token embedding, or its own), optionally soft-capped.
    seg_BT, pos_BT: rows of packed conversations (CausalSelfAttention);
    logits_at: one position's logits only (a prefill needs its last token's)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        idx_BT,
        deterministic=True,
        decode=False,
        seg_BT=None,
        pos_BT=None,
        logits_at=None,
    ) -> jax.Array:
        cfg = self.config
        T = idx_BT.shape[1]
        cfg.check_length(T)
        start = 0  # The position of idx_BT's first token.
        if decode:  # These tokens continue the ones already in the cache.
            index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
            start, index.value = index.value, index.value + T
        embed = functools.partial(
            nn.Embed, features=cfg.n_embd, embedding_init=init_normal
        )
        wte = embed(cfg.vocab_size, name="wte")
        x_BTC = wte(idx_BT)
        if cfg.position == "learned":  # (rope turns queries and keys instead.)
            pos = start + jnp.arange(T) if pos_BT is None else pos_BT
            x_BTC = x_BTC + embed(cfg.block_size, name="wpe")(pos)
        x_BTC = nn.Dropout(cfg.dropout)(x_BTC, deterministic=deterministic)
        block = ScannedBlock if cfg.scan_layers else Block
        if cfg.remat:  # Keep only each block's input; recompute the rest for grads.
            block = nn.remat(
                block, static_argnums=(2, 3), prevent_cse=not cfg.scan_layers
            )  # Arguments (self, x, deterministic, decode, start): flags static.
        if cfg.scan_layers:
            x_BTC, _ = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},  # On L.
                split_rngs={"params": True, "dropout": True},  # Own init and masks.
                in_axes=(nn.broadcast,) * 5,
                length=cfg.n_layer,
            )(cfg, name="h")(x_BTC, deterministic, decode, start, seg_BT, pos_BT)
        else:
            for i in range(cfg.n_layer):
                x_BTC = block(cfg, name=f"h_{i}")(
                    x_BTC, deterministic, decode, start, seg_BT, pos_BT
                )
        x_BTC = norm(cfg, "ln_f")(x_BTC)  # float32 from here on.
        if logits_at is not None:  # Only this position's logits, [B, 1, V].
            x_BTC = jax.lax.dynamic_slice_in_dim(x_BTC, logits_at, 1, axis=1)
        B, T, C = x_BTC.shape
        if cfg.tie_embeddings:  # The token embedding's transpose; rows as in Dense.
            logits_BTV = wte.attend(x_BTC.reshape(B * T, C)).reshape(B, T, -1)
        else:
            lm_head = Dense(
                cfg.vocab_size, use_bias=False, kernel_init=init_normal, name="lm_head"
            )
            logits_BTV = lm_head(x_BTC)
        if cfg.logit_cap:  # Smoothly into (-cap, cap).
            logits_BTV = cfg.logit_cap * jnp.tanh(logits_BTV / cfg.logit_cap)
        return logits_BTV


class Bigram(nn.Module):
    """The baseline: a V x V table whose row for token t holds next-token logits."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, idx_BT: jax.Array, deterministic=True, decode=False, logits_at=None
    ) -> jax.Array:
        del deterministic, decode  # No dropout, no context: the table is the model.
        if logits_at is not None:  # Only this position's logits (as GPT's).
            idx_BT = jax.lax.dynamic_slice_in_dim(idx_BT, logits_at, 1, axis=1)
        V = self.config.vocab_size
        return nn.Embed(V, V, embedding_init=init_normal, name="table")(idx_BT)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, w_BT=None):
    """Mean next-token cross-entropy, computed in float32; with weights w_BT,
    the sum of the weighted losses (the caller divides by the weights' sum)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    return losses_BT.mean() if w_BT is None else (losses_BT * w_BT).sum()

"""An independent numpy reference of TarFlow (Zhai et al., arXiv 2412.06329), for tests.

Written from the paper's equations, over a state dict that uses ml-tarflow's parameter
names (numpy arrays; torch Linear weights are (out, in)). Float64 throughout.
Block k (data -> noise), tokens x (B, T, D):
  x_p = permute_k(x)                     identity (k even) or reversal (k odd)
  h   = x_p W_in^T + b_in + permute_k(pos) [+ class embedding of y, or their mean]
  h   = L pre-norm layers: h += Attn(LN(h)) (causal); h += MLP(LN(h)) (exact GELU)
  o   = h W_out^T + b_out; shifted right by one token (token 0 gets zeros)
  a, b = split(o); z_p = (x_p - b) exp(-a);  logdet = -sum(a)
  z = permute_k^{-1}(z_p)
The prior is N(0, var) with ml-tarflow's `var` buffer (T, D).
"""
import math

import numpy as np


def _layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _linear(x, sd, name):
  return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer(h, sd, p, head_dim):
  """One pre-norm transformer layer over the whole causal sequence h (B, T, C)."""
  bsz, t, c = h.shape
  heads = c // head_dim
  a = _layer_norm(h, sd[p + "attention.norm.weight"], sd[p + "attention.norm.bias"])
  qkv = _linear(a, sd, p + "attention.qkv")                       # (B, T, 3C)
  q, k, v = np.split(qkv, 3, axis=-1)                              # each (B, T, C), heads contiguous
  split = lambda m: m.reshape(bsz, t, heads, head_dim).transpose(0, 2, 1, 3)  # (B, H, T, Dh)
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)       # (B, H, T, T)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  out = (w @ v).transpose(0, 2, 1, 3).reshape(bsz, t, c)
  h = h + _linear(out, sd, p + "attention.proj")
  m = _layer_norm(h, sd[p + "mlp.norm.weight"], sd[p + "mlp.norm.bias"])
  m = _linear(_gelu(_linear(m, sd, p + "mlp.main.0")), sd, p + "mlp.main.2")
  return h + m


def block_params(sd, k, x_p, y, num_layers, head_dim, null=None):
  """(a, b) (B, T, D) for block k from x_p in block order; y (B,) or None (mean embedding)."""
  pre = f"blocks.{k}."
  pos = sd[pre + "pos_embed"]
  if k % 2:
    pos = pos[::-1]
  h = _linear(x_p, sd, pre + "proj_in") + pos[None]
  if pre + "class_embed" in sd:
    emb = sd[pre + "class_embed"][:, 0]                            # (num_classes, C)
    h = h + (emb.mean(0)[None, None] if y is None else emb[y][:, None])
  for j in range(num_layers):
    h = _layer(h, sd, f"{pre}attn_blocks.{j}.", head_dim)
  o = _linear(h, sd, pre + "proj_out")
  o = np.concatenate([np.zeros_like(o[:, :1]), o[:, :-1]], axis=1)  # token t from x_<t
  return np.split(o, 2, axis=-1)


def forward(sd, x, y, num_blocks, num_layers, head_dim):
  """x (B, T, D) -> (z (B, T, D), logdet (B,)): TarFlow's blocks only (no prior scaling)."""
  z, logdet = np.asarray(x, np.float64), 0.0
  for k in range(num_blocks):
    x_p = z[:, ::-1] if k % 2 else z
    a, b = block_params(sd, k, x_p, y, num_layers, head_dim)
    z_p = (x_p - b) * np.exp(-a)
    logdet = logdet - a.sum(axis=(1, 2))
    z = z_p[:, ::-1] if k % 2 else z_p
  return z, logdet


def reverse(sd, z, y, num_blocks, num_layers, head_dim):
  """z (B, T, D) -> x, inverting block by block (last block first), token by token."""
  x = np.array(z, np.float64)
  for k in reversed(range(num_blocks)):
    x_p = np.array(x[:, ::-1] if k % 2 else x)
    for t in range(1, x_p.shape[1]):   # token 0 passes unchanged
      a, b = block_params(sd, k, x_p, y, num_layers, head_dim)  # causal: x_p[:, t:] does not matter
      x_p[:, t] = x_p[:, t] * np.exp(a[:, t]) + b[:, t]
    x = x_p[:, ::-1] if k % 2 else x_p
  return x


def random_state_dict(rng, num_blocks, num_layers, token_dim, channels, seq_len, num_classes,
                      scale=0.05):
  """Random ml-tarflow-named parameters (non-trivial: proj_out is NOT zero)."""
  n = lambda *shape: rng.normal(0.0, scale, shape)
  sd = {"var": 1.0 + 0.2 * rng.random((seq_len, token_dim))}
  for k in range(num_blocks):
    pre = f"blocks.{k}."
    sd[pre + "proj_in.weight"], sd[pre + "proj_in.bias"] = n(channels, token_dim), n(channels)
    sd[pre + "pos_embed"] = n(seq_len, channels)
    if num_classes:
      sd[pre + "class_embed"] = n(num_classes, 1, channels)
    for j in range(num_layers):
      p = f"{pre}attn_blocks.{j}."
      for norm in ("attention.norm", "mlp.norm"):
        sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1.0 + n(channels), n(channels)
      sd[p + "attention.qkv.weight"], sd[p + "attention.qkv.bias"] = n(3 * channels, channels), n(3 * channels)
      sd[p + "attention.proj.weight"], sd[p + "attention.proj.bias"] = n(channels, channels), n(channels)
      sd[p + "mlp.main.0.weight"], sd[p + "mlp.main.0.bias"] = n(4 * channels, channels), n(4 * channels)
      sd[p + "mlp.main.2.weight"], sd[p + "mlp.main.2.bias"] = n(channels, 4 * channels), n(channels)
    sd[pre + "proj_out.weight"], sd[pre + "proj_out.bias"] = n(2 * token_dim, channels), n(2 * token_dim)
    sd[pre + "attn_mask"] = np.tril(np.ones((seq_len, seq_len)))
  return sd

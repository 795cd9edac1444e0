"""Exact-math tests of the autoregressive flow on tiny models (models/flow.py)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from simflow_jax import checkpoint, losses
from simflow_jax.models import build
from simflow_jax.models import flow as F
from simflow_jax.models import inverse as I
from simflow_jax.models import layers

T, D, NCLS = 8, 4, 3

# The flow's entry points, jitted (the flow module and the method are static): one compile
# per call instead of dispatching the flow op by op, which compiles every primitive on its own.
forward = jax.jit(F.forward, static_argnums=0)
block_logdets = jax.jit(F.block_logdets, static_argnums=0)
inverse = jax.jit(I.inverse, static_argnums=(0, 4, 5),
                  static_argnames=("method", "guides", "chunk", "threshold", "max_iters"))


# The options that make the flow TarFlow (docs/flow.md), all at once.
TARFLOW = dict(shift_side="output", final_norm=False, ln_eps=1e-5, gelu="exact", null_class="mean",
               prior_std=True)


def make_flow(cond="adaln", token0="shift", scale="exp", scan=True, layers=(1, 2), cond_blocks="all",
              **options):
  return F.Flow(seq_len=T, token_dim=D, width=32, layers_per_block=layers, head_dim=16,
                cond=cond, cond_blocks=cond_blocks, num_classes=NCLS, token0=token0, scale=scale,
                scan_layers=scan, **options)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def perturbed_params(flow, seed=0, std=0.1):
  """Init, then perturb every parameter so the zero-initialised heads are non-trivial."""
  x = jnp.zeros((2, T, D))
  params = flow.init(jax.random.key(seed), x, jnp.zeros((2,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [l + std * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def data(b=2, seed=0):
  x = jax.random.normal(jax.random.key(100 + seed), (b, T, D))
  y = jnp.arange(b, dtype=jnp.int32) % NCLS
  return x, y


# A covering subset: every conditioning x token0 pair, and both scales for each token0;
# then TarFlow (every option of TARFLOW at once). The default run keeps adaLN; the rest are slow
# (TarFlow's inverse is checked against its reference in test_tarflow.py; start_token and
# softplus keep their exact log-determinant and causality tests below).
SLOW = pytest.mark.slow
VARIANTS = [("adaln", "shift", "exp", {}),
            pytest.param("add", "shift", "exp", TARFLOW, marks=SLOW),
            pytest.param("none", "start_token", "softplus", {}, marks=SLOW),
            pytest.param("adaln", "start_token", "softplus", {}, marks=SLOW),
            pytest.param("add", "shift", "softplus", {}, marks=SLOW),
            pytest.param("add", "start_token", "exp", {}, marks=SLOW),
            pytest.param("none", "shift", "exp", {}, marks=SLOW)]


@pytest.mark.parametrize("cond,token0,scale,options", VARIANTS)
def test_inverse_of_forward_cached_and_dense(cond, token0, scale, options):
  flow = make_flow(cond, token0, scale, **options)
  # Without the final LayerNorm proj_out reads the raw residual stream: smaller
  # perturbations keep the random map well conditioned.
  params = perturbed_params(flow, std=0.1 if flow.final_norm else 0.05)
  x, y = data()
  if flow.null_class == "mean":  # one example of the null class (the mean embedding)
    y = y.at[1].set(NCLS)
  labels = None if cond == "none" else y
  z, logdet = forward(flow, params, x, labels)
  assert z.shape == x.shape and logdet.shape == (2,)
  assert float(jnp.abs(z - x).max()) > 1e-2, "perturbed flow should not be the identity"
  for method in I.METHODS:  # jacobi and selective exact at threshold 0
    x_rec, _ = inverse(flow, params, z, labels, method, chunk=3, threshold=0.0)
    np.testing.assert_allclose(x_rec, x, atol=1e-4, err_msg=method)


@pytest.mark.parametrize("token0,scale,options", [("start_token", "softplus", {}), ("shift", "exp", TARFLOW),
                                                 pytest.param("shift", "exp", {}, marks=SLOW)])
def test_block_logdets_match_jacobian(token0, scale, options):
  flow = make_flow("adaln" if not options else "add", token0, scale, **options)
  params = perturbed_params(flow, std=0.2 if flow.final_norm else 0.05)
  x, y = data(b=1)
  lds = block_logdets(flow, params, x, y)  # (K, 1)
  # Per-block maps: run block k alone through a one-block view of the same params; the
  # prior std's scaling (prior_std) is counted in the last block's.
  z = x
  for k in range(flow.num_blocks):
    def block_map(flat, k=k):
      out, _, _ = flow.apply({"params": params}, flat.reshape(1, T, D), y,
                             method=lambda m, a, l: m.blocks[k](a, l))
      if flow.prior_std and k == flow.num_blocks - 1:
        out = out * jnp.exp(-params["prior_log_std"])
      return out.reshape(-1)
    jac = jax.jit(jax.jacfwd(block_map))(z.reshape(-1))  # (T*D, T*D)
    sign, logabsdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert sign != 0
    np.testing.assert_allclose(lds[k, 0], logabsdet, rtol=1e-4, atol=1e-4)
    z = jax.jit(block_map)(z.reshape(-1)).reshape(1, T, D)
  # The whole flow's logdet is the sum of the blocks'.
  _, total = forward(flow, params, x, y)
  np.testing.assert_allclose(total, lds.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("token0,shift_side", [("start_token", "input"),
                                               pytest.param("shift", "output", marks=SLOW),
                                               pytest.param("shift", "input", marks=SLOW)])
def test_causality_in_block_order(token0, shift_side):
  flow = make_flow("adaln", token0, layers=(2, 2), shift_side=shift_side)
  params = perturbed_params(flow)
  x, y = data(b=1)
  for k in range(flow.num_blocks):
    run = jax.jit(lambda a, k=k: flow.apply({"params": params}, a, y,
                                            method=lambda m, a, l: m.blocks[k](a, l))[0])
    z = run(x)
    for t in range(T):
      # Change inputs strictly after t in block k's order (natural order reversed for odd k).
      pos = np.arange(T)
      later = pos > t if k % 2 == 0 else pos < T - 1 - t
      x2 = jnp.where(later[None, :, None], x + 3.0, x)
      z2 = run(x2)
      out_t = t if k % 2 == 0 else T - 1 - t
      np.testing.assert_allclose(z2[:, out_t], z[:, out_t], atol=1e-6)
    # ...and the output does depend on earlier tokens (the test can fail).
    changed = run(x.at[:, 0 if k % 2 == 0 else T - 1].add(3.0))
    assert float(jnp.abs(changed - z).max()) > 1e-3


@pytest.mark.slow
def test_fresh_flow_is_identity():
  for token0, scale in (("shift", "exp"), ("start_token", "softplus")):
    flow = make_flow("adaln", token0, scale)
    x, y = data()
    params = jax.jit(flow.init)(jax.random.key(0), x, y)["params"]
    z, logdet = forward(flow, params, x, y)
    np.testing.assert_allclose(z, x, atol=1e-6)
    np.testing.assert_allclose(logdet, 0.0, atol=1e-5)
  for cond in ("add",):  # TarFlow's options: the prior std starts at 1
    flow = make_flow(cond, **TARFLOW)
    x, y = data()
    params = jax.jit(flow.init)(jax.random.key(0), x, y)["params"]
    z, logdet = forward(flow, params, x, y)
    np.testing.assert_allclose(z, x, atol=1e-6)
    np.testing.assert_allclose(logdet, 0.0, atol=1e-5)


def test_scanned_layers_equal_unrolled_reference():
  scanned, unrolled = make_flow(scan=True, layers=(3, 2)), make_flow(scan=False, layers=(3, 2))
  params = perturbed_params(scanned)
  # Unstack the scanned layer parameters into layer_0 .. layer_{L-1}.
  def unstack(tree):
    out = {}
    for name, sub in tree.items():
      if name == "transformer":
        stacked = sub["layers"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        out[name] = {f"layer_{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(depth)}
      elif isinstance(sub, dict):
        out[name] = unstack(sub)
      else:
        out[name] = sub
    return out
  params_u = unstack(params)
  ref_shapes = jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros((2, T, D)), jnp.zeros((2,), jnp.int32))
  assert jax.tree.structure(ref_shapes["params"]) == jax.tree.structure(params_u)
  x, y = data()
  z1, ld1 = forward(scanned, params, x, y)
  z2, ld2 = forward(unrolled, params_u, x, y)
  np.testing.assert_allclose(z1, z2, atol=1e-5)
  np.testing.assert_allclose(ld1, ld2, atol=1e-5)
  np.testing.assert_allclose(inverse(unrolled, params_u, z2, y)[0], x, atol=1e-4)
  # The unrolled view the decoder builds from scanned parameters is the same tree.
  flow_u, params_view = I.unroll_layers(scanned, params)
  assert flow_u.scan_layers is False
  jax.tree.map(np.testing.assert_array_equal, params_view, params_u)


@pytest.mark.parametrize("unroll", [pytest.param(u, marks=SLOW) for u in (2, 3, 8)])  # scan: test above
def test_scan_unroll_keeps_parameters_and_results(unroll):
  """flow.scan_unroll changes how the layers are looped over, nothing else: the same
  parameter tree (and init), the same NLL and the same gradients (2 does not divide 3 layers;
  8 is more than there are)."""
  base = make_flow(scan=True, layers=(3, 2), scan_unroll=1)
  params = perturbed_params(base)
  x, y = data()
  nll = lambda flow: jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(0.5 * jnp.sum(forward(flow, p, x, y)[0] ** 2, axis=(1, 2)) - forward(flow, p, x, y)[1])))
  loss, grads = nll(base)(params)
  flow = base.clone(scan_unroll=unroll)
  init = jax.jit(flow.init)(jax.random.key(0), x, y)["params"]
  jax.tree.map(np.testing.assert_array_equal, init, jax.jit(base.init)(jax.random.key(0), x, y)["params"])
  loss_u, grads_u = nll(flow)(params)
  np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_u, grads)


@pytest.mark.parametrize("seq_len", [8, pytest.param(6, marks=SLOW)])
def test_chunked_causal_attention_equals_one_masked_softmax(seq_len):
  """layers.causal_attention skips the masked blocks chunk by chunk; values and gradients
  equal one masked softmax over all (S, S) logits, for every chunk count (6 tokens do
  not divide into 4 or 5 chunks: fewer are used)."""
  q, k, v = (jax.random.normal(key, (2, seq_len, 3, 4)) for key in jax.random.split(jax.random.key(0), 3))

  def reference(q, k, v):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    logits = np.where(np.tril(np.ones((seq_len, seq_len), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)

  loss = lambda chunks: jax.jit(jax.grad(
      lambda *a: jnp.sum(jnp.sin(layers.causal_attention(*a, jnp.float32, chunks))), argnums=(0, 1, 2)))
  grads_one = loss(1)(q, k, v)
  for chunks in range(1, seq_len + 2):
    out = layers.causal_attention(q, k, v, jnp.float32, chunks)
    np.testing.assert_allclose(out, reference(*map(np.asarray, (q, k, v))), rtol=1e-5, atol=1e-6)
    for g, g1 in zip(loss(chunks)(q, k, v), grads_one):
      np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-6)


def test_labels_change_output_and_deep_only_conditioning():
  flow = make_flow("adaln", cond_blocks="deep")
  params = perturbed_params(flow)
  assert "class_embed" not in params["block_0"] and "class_embed" in params["block_1"]
  x, _ = data()
  z0, _ = forward(flow, params, x, jnp.array([0, 0]))
  z1, _ = forward(flow, params, x, jnp.array([1, 1]))
  assert float(jnp.abs(z0 - z1).max()) > 1e-3


def test_patchify_roundtrip_and_order():
  lat = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  tok = F.patchify(lat, 2)
  assert tok.shape == (2, 6, 12)
  np.testing.assert_array_equal(F.unpatchify(tok, 2, 4, 6), lat)
  # Token 1 is the patch at rows 0-1, cols 2-3 (raster order).
  np.testing.assert_array_equal(tok[0, 1], lat[0, 0:2, 2:4, :].reshape(-1))


def test_nll_and_bits_per_dim_constants():
  # A standard-normal x under the identity flow: NLL is the Gaussian log-density.
  z = jnp.zeros((3, T, D))
  nll = losses.flow_nll(z, jnp.zeros(3))
  np.testing.assert_allclose(nll, 0.5 * T * D * np.log(2 * np.pi), rtol=1e-6)
  np.testing.assert_allclose(losses.bits_per_dim(nll, T * D), 0.5 * np.log2(2 * np.pi * np.e) - 0.5 / np.log(2),
                             rtol=1e-6)
  # logdet enters with a minus sign: a contracting flow (logdet < 0) costs more nats.
  assert float(losses.flow_nll(z, -jnp.ones(3))[0]) == pytest.approx(float(nll[0]) + 1.0, rel=1e-6)


def test_kl_divergence_values():
  mu = jnp.zeros((2, 4, 4, 3))
  assert np.allclose(losses.kl_divergence(mu, jnp.zeros_like(mu), 0.5), 0.0)
  assert np.all(losses.kl_divergence(mu + 0.3, jnp.zeros_like(mu) - 0.4, 0.5) > 0)
  # Fixed variance: KL depends on mu only through 0.5 ||mu||^2.
  d = losses.kl_divergence(mu + 1.0, None, 0.5) - losses.kl_divergence(mu, None, 0.5)
  np.testing.assert_allclose(d, 0.5 * 48, rtol=1e-6)


def test_from_config_and_paper_scale_shapes():
  cfg = base.get_base_config().flow
  flow = F.Flow.from_config(cfg, (8, 8), 4, num_classes=10)
  assert flow.seq_len == 64 and flow.token_dim == 4
  paper = ml_collections.ConfigDict(dict(cfg))
  paper.update(width=1152, layers=(2, 2, 2, 2, 2, 46), dtype="bfloat16", remat=True)
  big = F.Flow.from_config(paper, (16, 16), 64, num_classes=1000)
  shapes = jax.eval_shape(big.init, jax.random.key(0), jnp.zeros((1, 256, 64)), jnp.zeros((1,), jnp.int32))
  n = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
  assert 8e8 < n < 1.5e9, n  # ~1B-parameter flow at paper scale


@pytest.mark.slow
def test_bfloat16_transformer_keeps_float32_outputs():
  flow = F.Flow(seq_len=T, token_dim=D, width=32, layers_per_block=(1, 1), head_dim=16,
                cond="adaln", num_classes=NCLS, dtype=jnp.bfloat16)
  params = perturbed_params(flow)
  x, y = data()
  z, logdet = forward(flow, params, x, y)
  assert z.dtype == jnp.float32 and logdet.dtype == jnp.float32
  # Same parameters in float32: bf16 matmuls move (a, b) by bf16 rounding only.
  flow32 = flow.clone(dtype=jnp.float32)
  z32, logdet32 = forward(flow32, params, x, y)
  np.testing.assert_allclose(z, z32, atol=0.1)
  assert float(jnp.abs(z - z32).max()) > 0, "bf16 compute should differ from f32"
  # Cached bf16 decoding rounds differently from the dense pass, so invertibility is
  # approximate at bf16 precision; float32 (the test above) is exact to 1e-4.
  np.testing.assert_allclose(inverse(flow, params, z, y)[0], x, atol=0.1)


def test_flow_options_keep_old_fingerprints():
  """The defaults are today's flow, whose checkpoints' fingerprint has none of the TarFlow
  options (their values are checked with the other config errors, tests/test_configs.py)."""
  config = base.get_base_config()
  flow = F.Flow.from_config(config.flow, (8, 8), 4, NCLS)
  assert (flow.shift_side, flow.final_norm, flow.ln_eps, flow.gelu, flow.null_class, flow.prior_std) == (
      "input", True, 1e-6, "tanh", "learned", False)
  assert not set(TARFLOW) & set(checkpoint.fingerprint(config)["flow"])
  config.flow.update(TARFLOW)
  build.validate_config(config)
  assert checkpoint.fingerprint(config)["flow"]["gelu"] == "exact"
  # flow.scan_unroll is speed only: any value resumes the same checkpoints.
  unrolled = base.get_base_config()
  unrolled.flow.scan_unroll = 4
  assert checkpoint.fingerprint(unrolled) == checkpoint.fingerprint(base.get_base_config())


@pytest.mark.slow
def test_mean_null_class_is_the_mean_embedding():
  flow = make_flow("add", null_class="mean")
  params = perturbed_params(flow)
  table = params["block_0"]["class_embed"]["embedding"]
  assert table.shape == (NCLS, 32)  # no extra null row
  x, _ = data(b=1)
  run = lambda p, y: forward(flow, p, x, jnp.array([y]))[0]
  # Replacing the rows by their mean makes every class the null class.
  mean_params = jax.tree.map(lambda a: a, params)
  for k in ("block_0", "block_1"):
    emb = params[k]["class_embed"]["embedding"]
    mean_params[k] = {**params[k], "class_embed": {"embedding": jnp.broadcast_to(emb.mean(0), emb.shape)}}
  np.testing.assert_allclose(run(params, NCLS), run(mean_params, 0), atol=1e-6)
  assert float(jnp.abs(run(params, NCLS) - run(params, 0)).max()) > 1e-3

"""Tests of the sampler and the flow inverse: guidance rules, cached / dense / Jacobi /
selective inversion, seeds (sample.py, models/inverse.py, models/guidance.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from simflow_jax import sample as S
from simflow_jax.models import build
from simflow_jax.models import flow as F
from simflow_jax.models import guidance as G
from simflow_jax.models import inverse as I

T, D, NCLS = 12, 4, 3


def make_flow(layers=(1, 2), cond_blocks="all"):
  return F.Flow(seq_len=T, token_dim=D, width=32, layers_per_block=layers, head_dim=16,
                cond="adaln", cond_blocks=cond_blocks, num_classes=NCLS)


@functools.lru_cache()
def _init_fn(flow):
  return jax.jit(lambda key: flow.init(key, jnp.zeros((1, flow.seq_len, D)), jnp.zeros((1,), jnp.int32)))


def perturbed_params(flow, seed=0, std=0.1):
  """Init, then perturb every parameter so the zero-initialised heads are non-trivial.
  (An 'rbg' key and numpy noise keep the compile short.)"""
  leaves, tree = jax.tree.flatten(_init_fn(flow)(jax.random.key(seed, impl="rbg"))["params"])
  noise_rng = np.random.default_rng(seed + 1)
  noisy = [l + std * noise_rng.standard_normal(l.shape).astype(np.float32) for l in leaves]
  return jax.tree.unflatten(tree, noisy)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _inverse(flow, method, guides, chunk, windows, params, z, labels, threshold, max_iters):
  return I.inverse(flow, params, z, labels, method, guides, chunk=chunk, threshold=threshold,
                   max_iters=max_iters, windows=windows)


def jitted_inverse(flow, method="cached", guides=None, chunk=0, threshold=0.0, max_iters=0, windows=8):
  """fn(params, z, labels) -> (x, steps): compiled once per (flow, method, guides, chunk,
  windows); the threshold and the iteration cap are traced."""
  return lambda p, z, y: _inverse(flow, method, guides, chunk, windows, p, z, y, threshold, max_iters)


def sample_cfg(**overrides):
  cfg = base.get_base_config().sample
  cfg.update(overrides)
  return cfg


def noise():
  """z (2, T, D) and labels (2,)."""
  return jax.random.normal(jax.random.key(100), (2, T, D)), jnp.array([0, 1], jnp.int32)


def doubled_streams(seed, b=3, s=2, d=5):
  """(log_sigma, b) of a doubled batch, (2b, s, d) each."""
  ks = jax.random.split(jax.random.key(seed), 2)
  return jax.random.normal(ks[0], (2 * b, s, d)) * 0.7, jax.random.normal(ks[1], (2 * b, s, d))


# ---- guidance rules ------------------------------------------------------------------
def test_guidance_rules_known_answers():
  a, b = doubled_streams(seed=0)
  a_c, a_u = np.split(np.asarray(a, np.float64), 2)
  b_c, b_u = np.split(np.asarray(b, np.float64), 2)
  w, pos = 1.7, jnp.arange(2)
  la, lb = G.make_guide("linear", w, "constant", T)(a, b, pos)
  np.testing.assert_allclose(la, a_c + w * (a_c - a_u), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lb, b_c + w * (b_c - b_u), rtol=1e-6, atol=1e-6)
  sa, sb = G.make_guide("linear_shift", w, "constant", T)(a, b, pos)
  np.testing.assert_array_equal(sa, a_c.astype(np.float32))
  np.testing.assert_allclose(sb, lb, rtol=1e-6)
  # Gaussian product N(b_c, s_c^2)^(1+w) / N(b_u, s_u^2)^w by precisions, where s_c < s_u ...
  ga, gb = G.make_guide("gaussian", w, "constant", T)(a, b, pos)
  var_c, var_u = np.exp(2 * a_c), np.exp(2 * a_u)
  prec = (1 + w) / var_c - w / var_u
  mean = ((1 + w) * b_c / var_c - w * b_u / var_u) / prec
  product = a_c < a_u
  assert product.any() and (~product).any()
  np.testing.assert_allclose(np.asarray(ga)[product], -0.5 * np.log(prec[product]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gb)[product], mean[product], rtol=1e-4, atol=1e-5)
  # ... and s clipped to 1 where s_c >= s_u: scale of the conditional, linear CFG on the mean.
  np.testing.assert_allclose(np.asarray(ga)[~product], a_c[~product], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gb)[~product], ((1 + w) * b_c - w * b_u)[~product],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", G.RULES)
@pytest.mark.parametrize("schedule", G.SCHEDULES)
def test_zero_weight_returns_conditional_stream_exactly(rule, schedule):
  a, b = doubled_streams(seed=3)
  ga, gb = G.make_guide(rule, 0.0, schedule, T)(a, b, jnp.arange(5, 7))
  np.testing.assert_array_equal(ga, a[:3])
  np.testing.assert_array_equal(gb, b[:3])


def test_anneal_schedule_values():
  # a_c = 1, a_u = 0, b_c = 2, b_u = 0 at every position: linear guidance gives
  # a = 1 + w_t, b = 2 + 2 w_t with w_t = w (t + 1) / T, per position t of a chunk.
  seq, w = 4, 2.0
  a = jnp.concatenate([jnp.ones((1, seq, 1)), jnp.zeros((1, seq, 1))])
  b = 2.0 * a
  w_t = w * (np.arange(seq) + 1) / seq
  ga, gb = G.make_guide("linear", w, "anneal", seq)(a, b, jnp.arange(seq))
  np.testing.assert_allclose(ga[0, :, 0], 1 + w_t, rtol=1e-6)
  np.testing.assert_allclose(gb[0, :, 0], 2 + 2 * w_t, rtol=1e-6)
  assert float(ga[0, -1, 0]) == pytest.approx(1 + w)  # full weight at the last token
  ga, _ = G.make_guide("linear", w, "constant", seq)(a, b, jnp.arange(seq))
  np.testing.assert_allclose(ga[0, :, 0], 1 + w, rtol=1e-6)


def test_block_guides_selection():
  flow = make_flow(layers=(1, 1, 2))
  assert G.block_guides(flow, 0.0) == (None, None, None)
  assert all(callable(g) for g in G.block_guides(flow, 1.0))
  assert [g is None for g in G.block_guides(flow, 1.0, blocks="deep")] == [True, True, False]
  # Blocks without class conditioning are never guided.
  deep_cond = make_flow(layers=(1, 1, 2), cond_blocks="deep")
  assert [g is None for g in G.block_guides(deep_cond, 1.0)] == [True, True, False]


# ---- every inverse agrees --------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_case():
  """A perturbed two-block flow (both token orders), noise, labels and its exact unguided inverse."""
  flow = make_flow()
  params = perturbed_params(flow)
  z, y = noise()
  exact, _ = jitted_inverse(flow, "dense")(params, z, y)
  assert float(jnp.abs(exact - z).max()) > 1e-2, "perturbed flow should not be the identity"
  return flow, params, z, y, exact


@pytest.mark.parametrize("rule,schedule", [
    (None, "constant"), pytest.param("gaussian", "anneal", marks=pytest.mark.slow),
    pytest.param("linear", "constant", marks=pytest.mark.slow),
    pytest.param("linear_shift", "anneal", marks=pytest.mark.slow)])
def test_cached_dense_jacobi_and_selective_agree(flow_case, rule, schedule):
  flow, params, z, y, exact = flow_case
  guides = None if rule is None else G.block_guides(flow, 1.5, rule, schedule)
  x_dense, _ = jitted_inverse(flow, "dense", guides)(params, z, y)
  if rule is None:
    np.testing.assert_allclose(x_dense, exact, atol=1e-6)
  else:  # guidance changes the result
    assert float(jnp.abs(x_dense - exact).max()) > 1e-3
  x_cached, steps = jitted_inverse(flow, "cached", guides, chunk=5)(params, z, y)
  # float32 rounding of values up to ~10 (guided): relative as well as absolute tolerance
  np.testing.assert_allclose(x_cached, x_dense, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(steps, [[5, 5, 2]] * 2)  # sequential tokens per chunk
  # Uneven chunks (5, 5, 2; the last aligned to the end): each runs its new tokens in
  # iterations at threshold 0 and is exact. Selective: block 1 (deep) cached, block 0 Jacobi.
  for method in ("jacobi", "selective"):
    x, steps = jitted_inverse(flow, method, guides, chunk=5)(params, z, y)
    np.testing.assert_allclose(x, x_cached, atol=1e-4, err_msg=method)
    np.testing.assert_array_equal(steps, [[5, 5, 2]] * 2)


def test_window_bounds():
  assert I.window_bounds(12, 1) == [0, 12]
  assert I.window_bounds(12, 4) == [0, 3, 6, 9, 12]
  assert I.window_bounds(12, 5) == [0, 2, 5, 7, 10, 12]  # near-equal windows
  assert I.window_bounds(12, 100) == list(range(13))      # at most one window per token
  assert I.window_bounds(12, 100, lag=1) == [0, *range(2, 13)]  # the first window fills a slot
  with pytest.raises(AssertionError, match="at least one cache window"):
    I.window_bounds(12, 0)


@pytest.mark.parametrize("shift_side", [pytest.param(s, marks=pytest.mark.slow) for s in ("output", "input")])
def test_cached_inverse_is_the_same_for_any_number_of_cache_windows(shift_side):
  """A token reads the finished prefix and its own window: any split of the token loop
  (one window, uneven windows, one per token) gives the dense inverse, guided or not."""
  flow = F.Flow(seq_len=T, token_dim=D, width=32, layers_per_block=(1, 2), head_dim=16, cond="add",
                num_classes=NCLS, shift_side=shift_side)
  params = perturbed_params(flow, std=0.05)
  z, y = noise()
  guides = G.block_guides(flow, 1.5)
  for g in (None, guides):
    exact, _ = jitted_inverse(flow, "dense", g)(params, z, y)
    assert float(jnp.abs(exact - z).max()) > 1e-2, "perturbed flow should not be the identity"
    for windows in ((1, 5, T) if g is None else (3,)):
      x, _ = jitted_inverse(flow, "cached", g, windows=windows)(params, z, y)
      np.testing.assert_allclose(x, exact, atol=1e-5, err_msg=f"{windows} windows, guided={g is not None}")


@pytest.mark.slow  # four compiles of a 64-token sampler at batch 256
def test_sampler_holds_one_block_cache_at_a_time():
  """XLA's buffers for the whole four-block inverse are about those of one block: each
  block's KV cache reuses the memory of the one before (without the ordering every cache
  was allocated up front: 4x). Shapes only: nothing runs."""
  def temp_mb(blocks, method):
    flow = F.Flow(seq_len=64, token_dim=4, width=64, layers_per_block=(2,) * blocks, head_dim=16,
                  cond="add", num_classes=NCLS)
    params = jax.eval_shape(flow.init, jax.random.key(0), jnp.zeros((1, 64, 4)), jnp.zeros((1,), jnp.int32))
    fn = jax.jit(lambda p, z, y: I.inverse(flow, p, z, y, method, chunk=16)[0])
    compiled = fn.lower(params["params"], jax.ShapeDtypeStruct((256, 64, 4), jnp.float32),
                        jax.ShapeDtypeStruct((256,), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  cache_mb = 2 * 2 * 256 * 64 * 64 * 4 / 2 ** 20  # one block: 2 layers x (k, v), 16 MiB
  for method in ("cached", "jacobi"):
    one, four = temp_mb(1, method), temp_mb(4, method)
    assert cache_mb <= one < 3 * cache_mb, (method, one)
    assert four < one + 0.5 * cache_mb, (method, one, four)


@pytest.mark.slow  # test_flow.py inverts TarFlow's options by every method, unguided
def test_tarflow_options_every_inverse_agrees():
  """TarFlow's options (output-side shift, no final LayerNorm, exact GELU, LayerNorm eps
  1e-5, mean null class, learned prior std; docs/flow.md): the inverters stay exact,
  unguided and guided (the null stream is the mean class embedding)."""
  flow = F.Flow(seq_len=T, token_dim=D, width=32, layers_per_block=(1, 2), head_dim=16, cond="add",
                num_classes=NCLS, shift_side="output", final_norm=False, ln_eps=1e-5, gelu="exact",
                null_class="mean", prior_std=True)
  params = perturbed_params(flow, std=0.03)  # without the final LayerNorm larger ones blow up the inverse
  z, y = noise()
  exact, _ = jitted_inverse(flow, "dense")(params, z, y)
  # The inverse starts from z * prior std and undoes the forward map.
  z_back, _ = F.forward(flow, params, exact, y)
  np.testing.assert_allclose(z_back, z, atol=1e-5)
  assert float(jnp.abs(exact - z).max()) > 1e-2, "perturbed flow should not be the identity"
  guides = G.block_guides(flow, 1.5, "gaussian", "anneal")
  guided, _ = jitted_inverse(flow, "dense", guides)(params, z, y)
  assert float(jnp.abs(guided - exact).max()) > 1e-3
  for reference, g, methods in ((exact, None, ("cached", "jacobi")), (guided, guides, ("cached", "selective"))):
    for method in methods:  # uneven chunks (5, 5, 2), threshold 0
      x, steps = jitted_inverse(flow, method, g, chunk=5)(params, z, y)
      np.testing.assert_allclose(x, reference, atol=1e-5, err_msg=f"{method} guided={g is not None}")
      np.testing.assert_array_equal(steps, [[5, 5, 2]] * 2)


def test_jacobi_whole_sequence_and_iteration_caps(flow_case):
  flow, params, z, y, exact = flow_case
  # chunk 0 = the whole sequence, exact after T iterations.
  x, iters = jitted_inverse(flow, "jacobi")(params, z, y)
  np.testing.assert_array_equal(iters, [[T]] * 2)
  np.testing.assert_allclose(x, exact, atol=1e-4)
  # Too few iterations leave an error; max_iters caps every chunk.
  x2, iters = jitted_inverse(flow, "jacobi", max_iters=2)(params, z, y)
  np.testing.assert_array_equal(iters, [[2]] * 2)
  assert float(jnp.abs(x2 - exact).max()) > 1e-3
  # Larger than the chunk: capped at the chunk length, which is exact.
  x_big, iters = jitted_inverse(flow, "jacobi", max_iters=50)(params, z, y)
  np.testing.assert_array_equal(iters, [[T]] * 2)
  np.testing.assert_allclose(x_big, exact, atol=1e-4)


def test_jacobi_with_threshold_converges_in_fewer_iterations_on_near_identity_flow():
  flow = make_flow()
  params = perturbed_params(flow, std=0.02)
  z, y = noise()
  exact, _ = jitted_inverse(flow)(params, z, y)
  assert float(jnp.abs(exact - z).max()) > 1e-3, "flow should not be exactly the identity"
  x, iters = jitted_inverse(flow, "jacobi", threshold=1e-3)(params, z, y)
  assert iters.shape == (2, 1) and iters.dtype == jnp.int32
  assert np.all(np.asarray(iters) >= 1) and np.all(np.asarray(iters) < T), iters
  np.testing.assert_allclose(x, exact, atol=1e-2)


@pytest.fixture(scope="module")
def trained_flow():
  """A tiny flow trained for 150 Adam steps by maximum likelihood on correlated
  sequences x_t = 0.5 x_{t-1} + noise (so the blocks learn real dependencies)."""
  flow = make_flow(layers=(1, 1, 1))
  params = perturbed_params(flow, std=0.0)
  rng = np.random.default_rng(0)
  eps = rng.standard_normal((256, T, D)).astype(np.float32)
  data = np.zeros_like(eps)
  for t in range(T):
    data[:, t] = (0.5 * data[:, t - 1] if t else 0.0) + 0.5 * eps[:, t]
  labels = jnp.asarray(np.arange(256) % NCLS, jnp.int32)
  opt = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def loss(p):
      z, logdet = F.forward(flow, p, data, labels)
      return jnp.mean(0.5 * jnp.sum(z ** 2, axis=(1, 2)) - logdet)

    def step(carry, _):
      p, s = carry
      value, grad = jax.value_and_grad(loss)(p)
      updates, s = opt.update(grad, s, p)
      return (optax.apply_updates(p, updates), s), value

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=150)
    return params, losses

  params, losses = train(params)
  assert float(losses[-1]) < float(losses[0]) - 5.0, "the tiny flow should learn"
  return flow, params


@pytest.mark.slow  # trains a flow (150 Adam steps) first; exactness at threshold 0 is tested above
def test_selective_matches_sequential_to_its_threshold_on_a_trained_flow(trained_flow):
  flow, params = trained_flow
  z = jax.random.normal(jax.random.key(5), (4, T, D))
  y = jnp.array([0, 1, 2, 0], jnp.int32)
  x_seq, _ = jitted_inverse(flow)(params, z, y)
  scale = float(jnp.abs(x_seq).max())
  for threshold in (1e-2, 1e-4):
    x, iters = jitted_inverse(flow, "selective", chunk=4, threshold=threshold)(params, z, y)
    iters = np.asarray(iters)
    np.testing.assert_array_equal(iters[-1], [4, 4, 4])  # the deep block: sequential
    assert np.all(iters[:-1] >= 1)
    # Each Jacobi chunk stopped when its relative change fell below the threshold; the
    # error it leaves is of that order, amplified at most by the later blocks' Lipschitz
    # constants (a factor of a few on this flow).
    err = float(jnp.abs(x - x_seq).max()) / scale
    assert err < 20 * threshold, (threshold, err, iters)
  # One chunk and a loose threshold: fewer iterations than exact decoding (T per block).
  x, loose = jitted_inverse(flow, "selective", chunk=0, threshold=1e-2)(params, z, y)
  assert np.asarray(loose)[:-1].sum() < T * (flow.num_blocks - 1), loose
  assert float(jnp.abs(x - x_seq).max()) / scale < 20 * 1e-2


# ---- the sampler ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models():
  cfg = base.get_base_config()
  cfg.data.update(image_size=8, channels=1, num_classes=NCLS)
  cfg.vae.update(ch=8, ch_mult=(1, 2), z_channels=D)  # 8 px -> 4x4x4 latents = 16 tokens
  cfg.flow.update(width=32, head_dim=16, layers=(1, 1))
  models = build.build_models(cfg)
  # Sampling needs only the decoder: initialise just it (a shorter compile than the whole VAE).
  latents = jnp.zeros((1, *models.latent_hw, models.latent_channels))
  init_decoder = jax.jit(lambda r: models.vae.init(r, latents, method=models.vae.decode))
  vae = init_decoder(jax.random.key(0, impl="rbg"))
  return models, {"vae": vae["params"], "flow": perturbed_params(models.flow, std=0.05)}


def jitted_sample_tokens(models, cfg):
  return jax.jit(lambda p, y, r: S.sample_tokens(models, p, y, r, cfg))


@pytest.mark.slow
def test_guidance_zero_is_exactly_unguided_and_temperature_scales_noise(tiny_models):
  models, params = tiny_models
  y = jnp.array([0, 2], jnp.int32)
  rng = jax.random.key(7)
  cfg = sample_cfg(guidance=0.0, guidance_rule="gaussian", temperature=0.5)
  tokens, info = jitted_sample_tokens(models, cfg)(params["flow"], y, rng)
  np.testing.assert_array_equal(info["steps"], [[16]] * 2)
  # z ~ N(0, temperature^2 I), inverted with no guide at all. Another compiled program
  # (the noise drawn outside it) may round differently in its last bit: compare to 1e-6.
  z = 0.5 * jax.random.normal(rng, (2, *models.token_shape))
  np.testing.assert_allclose(tokens, jitted_inverse(models.flow)(params["flow"], z, y)[0], atol=1e-6)
  # A w = 0 guide through the doubled batch gives the same numbers.
  guide = G.make_guide("gaussian", 0.0, "constant", models.flow.seq_len)
  np.testing.assert_allclose(jitted_inverse(models.flow, "cached", (guide, guide))(params["flow"], z, y)[0],
                             tokens, atol=1e-5)


def test_sample_images_seeds_decode_and_jacobi(tiny_models):
  models, params = tiny_models
  cfg = sample_cfg(guidance=1.0)
  fn = S.make_sample_fn(models, cfg)
  y = jnp.array([0, 1, 2], jnp.int32)
  a = fn(params, y, jax.random.key(1))
  assert a.shape == (3, 8, 8, 1) and a.dtype == jnp.float32
  assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(fn(params, y, jax.random.key(1)), a)  # one program: bit-identical
  assert float(jnp.abs(fn(params, y, jax.random.key(2)) - a).max()) > 1e-3
  # The images are the VAE decoding of the sampled tokens.
  tokens, _ = jitted_sample_tokens(models, cfg)(params["flow"], y, jax.random.key(1))
  decode = jax.jit(lambda p, lat: models.vae.apply({"params": p}, lat, method=models.vae.decode))
  np.testing.assert_allclose(a, jnp.clip(decode(params["vae"], models.to_latents(tokens)), -1, 1), atol=1e-5)
  # Jacobi and selective sampling report their iterations and match the cached sampler when exact.
  for method in ("jacobi", "selective"):
    jac_cfg = sample_cfg(guidance=1.0, inverse=method, jacobi_threshold=0.0, jacobi_chunk=8)
    jac_tokens, info = jitted_sample_tokens(models, jac_cfg)(params["flow"], y, jax.random.key(1))
    np.testing.assert_array_equal(info["steps"], [[8, 8]] * 2)
    np.testing.assert_allclose(jac_tokens, tokens, atol=1e-4)


def test_bad_class_ids_raise(tiny_models):
  models, params = tiny_models
  with pytest.raises(ValueError, match=r"\[-1, 3\]"):
    S.check_labels(np.array([0, 3, -1, 2]), NCLS)
  with pytest.raises(ValueError, match="1-D integer"):
    S.check_labels(np.array([0.0, 1.0]), NCLS)
  S.check_labels(np.array([0, 1, 2]), NCLS)
  fn = S.make_sample_fn(models, sample_cfg())
  with pytest.raises(ValueError, match=r"\[5\]"):
    fn(params, jnp.array([0, 5], jnp.int32), jax.random.key(0))

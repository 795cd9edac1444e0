"""Tests of the sampler (sample.py): guidance rules, Jacobi decoding, seeds."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from simflow_jax import sample as S
from simflow_jax.models import build
from simflow_jax.models import flow as F

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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _inverse(flow, method, guides, params, z, labels):
  return F.inverse(flow, params, z, labels, method, guides)


def jitted_inverse(flow, method="cached", guides=None):
  """fn(params, z, labels) -> x: flow.inverse, compiled once per (flow, method, guides)."""
  return functools.partial(_inverse, flow, method, guides)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jacobi(flow, chunk, guides, params, z, labels, threshold, max_iters):
  cfg = types.SimpleNamespace(jacobi_chunk=chunk, jacobi_threshold=threshold, jacobi_max_iters=max_iters)
  return S.inverse_jacobi(flow, params, z, labels, cfg, guides)


def jitted_jacobi(flow, cfg, guides=None):
  """fn(params, z, labels) -> (x, iters): inverse_jacobi, compiled once per (flow, chunk, guides);
  the threshold and iteration cap are traced."""
  return lambda p, z, y: _jacobi(flow, cfg.jacobi_chunk, guides, p, z, y, cfg.jacobi_threshold,
                                 cfg.jacobi_max_iters)


def sample_cfg(**overrides):
  cfg = base.get_base_config().sample
  cfg.update(overrides)
  return cfg


def noise():
  """z (2, T, D) and labels (2,)."""
  return jax.random.normal(jax.random.key(100), (2, T, D)), jnp.array([0, 1], jnp.int32)


def doubled_streams(seed, b=3, d=5):
  ks = jax.random.split(jax.random.key(seed), 2)
  return jax.random.normal(ks[0], (2 * b, d)) * 0.7, jax.random.normal(ks[1], (2 * b, d))


# ---- guidance rules ------------------------------------------------------------------
def test_guidance_rules_known_answers():
  a, b = doubled_streams(seed=0)
  a_c, a_u = np.split(np.asarray(a, np.float64), 2)
  b_c, b_u = np.split(np.asarray(b, np.float64), 2)
  w = 1.7
  la, lb = S.make_guide("linear", w, "constant", T)(a, b, 0)
  np.testing.assert_allclose(la, a_c + w * (a_c - a_u), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lb, b_c + w * (b_c - b_u), rtol=1e-6, atol=1e-6)
  sa, sb = S.make_guide("linear_shift", w, "constant", T)(a, b, 0)
  np.testing.assert_array_equal(sa, a_c.astype(np.float32))
  np.testing.assert_allclose(sb, lb, rtol=1e-6)
  # Gaussian product N(b_c, s_c^2)^(1+w) / N(b_u, s_u^2)^w by precisions, where s_c < s_u ...
  ga, gb = S.make_guide("gaussian", w, "constant", T)(a, b, 0)
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


@pytest.mark.parametrize("rule", S.GUIDANCE_RULES)
@pytest.mark.parametrize("schedule", S.GUIDANCE_SCHEDULES)
def test_zero_weight_returns_conditional_stream_exactly(rule, schedule):
  a, b = doubled_streams(seed=3)
  ga, gb = S.make_guide(rule, 0.0, schedule, T)(a, b, jnp.int32(5))
  np.testing.assert_array_equal(ga, a[:3])
  np.testing.assert_array_equal(gb, b[:3])


def test_anneal_schedule_values():
  # a_c = 1, a_u = 0, b_c = 2, b_u = 0: linear guidance gives a = 1 + w_t, b = 2 + 2 w_t.
  a = jnp.array([[1.0], [0.0]])
  b = jnp.array([[2.0], [0.0]])
  w, seq = 2.0, 4
  anneal = S.make_guide("linear", w, "anneal", seq)
  const = S.make_guide("linear", w, "constant", seq)
  for t in range(seq):
    w_t = w * (t + 1) / seq
    ga, gb = anneal(a, b, jnp.int32(t))
    np.testing.assert_allclose(ga, [[1 + w_t]], rtol=1e-6)
    np.testing.assert_allclose(gb, [[2 + 2 * w_t]], rtol=1e-6)
    np.testing.assert_allclose(const(a, b, jnp.int32(t))[0], [[1 + w]], rtol=1e-6)
  np.testing.assert_allclose(anneal(a, b, jnp.int32(seq - 1))[0], [[1 + w]], rtol=1e-6)  # full weight last


def test_guide_for_block_selection_and_errors():
  flow = make_flow(layers=(1, 1, 2))
  assert all(S.guide_for_block(flow, sample_cfg(guidance=0.0))(k) is None for k in range(3))
  every = S.guide_for_block(flow, sample_cfg(guidance=1.0))
  assert all(callable(every(k)) for k in range(3))
  deep = S.guide_for_block(flow, sample_cfg(guidance=1.0, guidance_blocks="deep"))
  assert [deep(k) is None for k in range(3)] == [True, True, False]
  # Blocks without class conditioning are never guided.
  deep_cond = make_flow(layers=(1, 1, 2), cond_blocks="deep")
  deep_cond_guides = S.guide_for_block(deep_cond, sample_cfg(guidance=1.0))
  assert [deep_cond_guides(k) is None for k in range(3)] == [True, True, False]
  with pytest.raises(ValueError, match="guidance_rule"):
    S.guide_for_block(flow, sample_cfg(guidance=1.0, guidance_rule="cubic"))
  with pytest.raises(ValueError, match="guidance_blocks"):
    S.guide_for_block(flow, sample_cfg(guidance=1.0, guidance_blocks="shallow"))
  with pytest.raises(ValueError, match="class-conditional"):
    S.guide_for_block(flow.clone(cond="none"), sample_cfg(guidance=1.0))


# ---- the three inverses agree -----------------------------------------------------------
@pytest.fixture(scope="module")
def flow_case():
  """A perturbed two-block flow (both token orders), noise, labels and its exact unguided inverse."""
  flow = make_flow()
  params = perturbed_params(flow)
  z, y = noise()
  exact = jitted_inverse(flow)(params, z, y)
  assert float(jnp.abs(exact - z).max()) > 1e-2, "perturbed flow should not be the identity"
  return flow, params, z, y, exact


@pytest.mark.parametrize("rule,schedule,check_dense", [
    (None, "constant", True), ("linear", "constant", False), ("linear_shift", "anneal", False),
    ("gaussian", "anneal", True)])
def test_cached_dense_and_exact_jacobi_agree(flow_case, rule, schedule, check_dense):
  flow, params, z, y, exact = flow_case
  cfg = sample_cfg(guidance=0.0 if rule is None else 1.5, guidance_rule=rule or "linear",
                   guidance_schedule=schedule, jacobi_threshold=0.0, jacobi_chunk=5)
  guides = S.guide_for_block(flow, cfg)
  x_cached = exact if rule is None else jitted_inverse(flow, "cached", guides)(params, z, y)
  if check_dense:
    np.testing.assert_allclose(jitted_inverse(flow, "dense", guides)(params, z, y), x_cached, atol=1e-5)
  # Uneven chunks (5, 5, 2): each chunk runs its length in iterations and is exact.
  x_jac, iters = jitted_jacobi(flow, cfg, guides)(params, z, y)
  np.testing.assert_allclose(x_jac, x_cached, atol=1e-4)
  np.testing.assert_array_equal(iters, [[5, 5, 2]] * flow.num_blocks)
  if rule is not None:  # guidance changes the result
    assert float(jnp.abs(x_cached - exact).max()) > 1e-3


def test_jacobi_whole_sequence_and_iteration_caps(flow_case):
  flow, params, z, y, exact = flow_case
  # chunk 0 = the whole sequence, exact after T iterations.
  x, iters = jitted_jacobi(flow, sample_cfg(jacobi_threshold=0.0))(params, z, y)
  np.testing.assert_array_equal(iters, [[T]] * 2)
  np.testing.assert_allclose(x, exact, atol=1e-4)
  # Too few iterations leave an error; max_iters caps every chunk.
  x2, iters = jitted_jacobi(flow, sample_cfg(jacobi_threshold=0.0, jacobi_max_iters=2))(params, z, y)
  np.testing.assert_array_equal(iters, [[2]] * 2)
  assert float(jnp.abs(x2 - exact).max()) > 1e-3
  # Larger than the chunk: capped at the chunk length, which is exact.
  x_big, iters = jitted_jacobi(flow, sample_cfg(jacobi_threshold=0.0, jacobi_max_iters=50))(params, z, y)
  np.testing.assert_array_equal(iters, [[T]] * 2)
  np.testing.assert_allclose(x_big, exact, atol=1e-4)


def test_jacobi_with_threshold_converges_in_fewer_iterations_on_near_identity_flow():
  flow = make_flow()
  params = perturbed_params(flow, std=0.02)
  z, y = noise()
  exact = jitted_inverse(flow)(params, z, y)
  assert float(jnp.abs(exact - z).max()) > 1e-3, "flow should not be exactly the identity"
  x, iters = jitted_jacobi(flow, sample_cfg(jacobi_threshold=1e-3))(params, z, y)
  assert iters.shape == (2, 1) and iters.dtype == jnp.int32
  assert np.all(np.asarray(iters) >= 1) and np.all(np.asarray(iters) < T), iters
  np.testing.assert_allclose(x, exact, atol=1e-2)


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


def test_guidance_zero_is_exactly_unguided_and_temperature_scales_noise(tiny_models):
  models, params = tiny_models
  y = jnp.array([0, 2], jnp.int32)
  rng = jax.random.key(7)
  cfg = sample_cfg(guidance=0.0, guidance_rule="gaussian", temperature=0.5)
  tokens, info = jitted_sample_tokens(models, cfg)(params["flow"], y, rng)
  assert info == {}
  # z ~ N(0, temperature^2 I), inverted with no guide at all (scaling by 0.5 is exact).
  z = 0.5 * jax.random.normal(rng, (2, *models.token_shape))
  np.testing.assert_array_equal(tokens, jitted_inverse(models.flow)(params["flow"], z, y))
  # A w = 0 guide through the doubled batch gives the same numbers.
  guide = S.make_guide("gaussian", 0.0, "constant", models.flow.seq_len)
  np.testing.assert_allclose(jitted_inverse(models.flow, "cached", lambda k: guide)(params["flow"], z, y),
                             tokens, atol=1e-5)


def test_sample_images_seeds_decode_and_jacobi(tiny_models):
  models, params = tiny_models
  cfg = sample_cfg(guidance=1.0)
  fn = S.make_sample_fn(models, cfg)
  y = jnp.array([0, 1, 2], jnp.int32)
  a = fn(params, y, jax.random.key(1))
  assert a.shape == (3, 8, 8, 1) and a.dtype == jnp.float32
  assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(fn(params, y, jax.random.key(1)), a)
  assert float(jnp.abs(fn(params, y, jax.random.key(2)) - a).max()) > 1e-3
  # The images are the VAE decoding of the sampled tokens.
  tokens, _ = jitted_sample_tokens(models, cfg)(params["flow"], y, jax.random.key(1))
  decode = jax.jit(lambda p, lat: models.vae.apply({"params": p}, lat, method=models.vae.decode))
  np.testing.assert_allclose(a, jnp.clip(decode(params["vae"], models.to_latents(tokens)), -1, 1), atol=1e-5)
  # Jacobi sampling reports its iterations and matches the cached sampler when exact.
  jac_cfg = sample_cfg(guidance=1.0, jacobi=True, jacobi_threshold=0.0, jacobi_chunk=8)
  jac_tokens, info = jitted_sample_tokens(models, jac_cfg)(params["flow"], y, jax.random.key(1))
  np.testing.assert_array_equal(info["jacobi_iters"], [[8, 8]] * 2)
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
  with pytest.raises(ValueError, match="temperature"):
    S.make_sample_fn(models, sample_cfg(temperature=0.0))

"""A converted TarFlow (simflow_jax/pretrained/tarflow.py) computes TarFlow: our Flow's
forward (z, log-det) and inverse against an independent numpy reference of TarFlow's
equations (tests/tarflow_reference.py), on random ml-tarflow-named weights, float32."""
import importlib.util
import pathlib

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from simflow_jax.models import build
from simflow_jax.models import flow as F
from simflow_jax.models import inverse as I
from simflow_jax.pretrained import tarflow

_HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tarflow_reference", _HERE / "tarflow_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

K, L, C, HEAD_DIM = 2, 2, 32, 16   # blocks, layers per block, width, head size (2 heads)
N, P, CH, NCLS = 8, 2, 3, 5        # image side, patch, image channels, classes: T = 16, D = 12
T, D = (N // P) ** 2, P * P * CH


def tarflow_patchify(images):
  """(B, N, N, c) -> (B, T, c*p*p): torch unfold's feature order (c, p1, p2)."""
  return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (c p1 p2)", p1=P, p2=P)


def make_case(num_classes):
  sd = ref.random_state_dict(np.random.default_rng(num_classes), K, L, D, C, T, num_classes)
  sd = {"module." + k: v for k, v in sd.items()}  # a DDP checkpoint's names
  params, settings = tarflow.convert_state_dict(sd, head_dim=HEAD_DIM, patch_size=P)
  config = base.get_base_config()
  config.flow.update(settings["flow"])
  config.data.update(image_size=N, channels=CH, num_classes=max(num_classes, 1))
  build.validate_config(config)
  flow = F.Flow.from_config(config.flow, (N, N), CH, max(num_classes, 1))
  sd = tarflow.strip_prefixes(sd)
  return sd, flow, jax.tree.map(jnp.asarray, params), settings


@pytest.fixture(scope="module", params=[NCLS, 0], ids=["conditional", "unconditional"])
def case(request):
  return make_case(request.param)


@pytest.fixture(scope="module")
def compiled(case):
  """Jitted forward and inverses of the case's flow, compiled once for both label kinds."""
  _, flow, _, _ = case
  inverse = lambda method, chunk: jax.jit(lambda p, z, y: I.inverse(flow, p, z, y, method, chunk=chunk,
                                                                    threshold=0.0)[0])
  return {"forward": jax.jit(lambda p, x, y: F.forward(flow, p, x, y)),
          "cached": inverse("cached", 0), "jacobi chunk 5": inverse("jacobi", 5)}


def test_settings_and_token_layout(case):
  sd, flow, params, settings = case
  assert settings["image_size"] == N and settings["channels"] == CH and settings["flow"]["patch_size"] == P
  assert flow.seq_len == T and flow.token_dim == D and flow.layers_per_block == (L,) * K
  assert flow.shift_side == "output" and not flow.final_norm and flow.prior_std
  # Our patchify is TarFlow's with the features permuted, and the helpers invert each other.
  images = np.random.default_rng(0).standard_normal((2, N, N, CH)).astype(np.float32)
  ours, theirs = np.asarray(F.patchify(jnp.asarray(images), P)), tarflow_patchify(images)
  np.testing.assert_array_equal(tarflow.tarflow_tokens_to_ours(theirs, P, CH), ours)
  np.testing.assert_array_equal(tarflow.ours_to_tarflow_tokens(ours, P, CH), theirs)
  shapes = jax.eval_shape(flow.init, jax.random.key(0), jnp.zeros((1, T, D)), jnp.zeros((1,), jnp.int32))
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)
  jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, p.shape), shapes["params"], params)


def _labels(sd, null: bool):
  """(reference labels or None, our labels (B,))."""
  if "blocks.0.class_embed" not in sd:
    return None, None
  if null:
    return None, jnp.full((2,), NCLS, jnp.int32)
  y = np.random.default_rng(1).integers(0, NCLS, 2)
  return y, jnp.asarray(y, jnp.int32)


# An unconditional flow has no null class: that pairing is not generated.
@pytest.mark.parametrize("case,null", [(NCLS, False), (NCLS, True),
                                       pytest.param(0, False, marks=pytest.mark.slow)], indirect=["case"],
                         ids=["conditional-labels", "conditional-null_class", "unconditional"])
def test_forward_and_inverse_match_reference(case, compiled, null):
  sd, _, params, _ = case
  y_ref, y = _labels(sd, null)
  images = np.random.default_rng(2).standard_normal((2, N, N, CH))
  x_ref = tarflow_patchify(images)                                  # (B, T, D) TarFlow order
  z_ref, logdet_ref = ref.forward(sd, x_ref, y_ref, K, L, HEAD_DIM)
  # Our flow also divides by the prior std sqrt(var): z = z_ref / sqrt(var), and its
  # log-det counts -sum(log var) / 2; together the same likelihood as TarFlow's N(0, var).
  var = sd["var"]
  z_expect = tarflow.tarflow_tokens_to_ours(z_ref / np.sqrt(var), P, CH)
  logdet_expect = logdet_ref - 0.5 * np.log(var).sum()
  x = F.patchify(jnp.asarray(images, jnp.float32), P)              # (B, T, D) our order
  z, logdet = compiled["forward"](params, x, y)
  assert np.abs(z_ref - x_ref).max() > 1e-2, "the random TarFlow should not be the identity"
  np.testing.assert_allclose(z, z_expect, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logdet, logdet_expect, rtol=1e-5, atol=0)
  # Inverse from a standard-normal draw: TarFlow starts from eps * sqrt(var).
  eps = np.random.default_rng(3).standard_normal((2, T, D))       # our order
  x_expect = ref.reverse(sd, tarflow.ours_to_tarflow_tokens(eps, P, CH) * np.sqrt(var), y_ref, K, L, HEAD_DIM)
  x_expect = tarflow.tarflow_tokens_to_ours(x_expect, P, CH)
  for method in ("cached", "jacobi chunk 5"):  # Jacobi at threshold 0, chunks (5, 5, 5, 1)
    x_inv = compiled[method](params, jnp.asarray(eps, jnp.float32), y)
    np.testing.assert_allclose(x_inv, x_expect, atol=1e-5, rtol=0, err_msg=method)


@pytest.mark.torch
def test_convert_script_reads_a_torch_checkpoint(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from flax import serialization
  spec = importlib.util.spec_from_file_location("convert_tarflow", _HERE.parent / "scripts" / "convert_tarflow.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  sd = ref.random_state_dict(np.random.default_rng(7), K, L, D, C, T, NCLS)
  pth = tmp_path / "model.pth"
  torch.save({"_orig_mod." + k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}, pth)
  out = tmp_path / "flow.msgpack"
  args = ["--pth", str(pth), "--out", str(out), "--head_dim", str(HEAD_DIM), "--patch_size", str(P)]
  script.main(args + ["--blocks", str(K), "--num_classes", str(NCLS)])
  printed = capsys.readouterr().out
  assert "--config.flow.shift_side=output" in printed and f"--config.data.image_size={N}" in printed
  with open(out, "rb") as fh:
    params = serialization.msgpack_restore(fh.read())
  expected, _ = tarflow.convert_state_dict({k: v.astype(np.float32) for k, v in sd.items()}, head_dim=HEAD_DIM,
                                          patch_size=P)
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  # A flag that disagrees with the checkpoint is a clear error.
  with pytest.raises(SystemExit, match="--channels"):
    script.main(args + ["--channels", str(C + 1)])


def test_converter_refuses_to_guess_the_layout():
  """D = 12 features fit 3x(2x2) and 12x(1x1): without flags the converter stops and names both
  and the flags; either flag alone picks one; a D with one layout (here 6 = 6x(1x1)) is inferred."""
  sd = ref.random_state_dict(np.random.default_rng(3), K, L, D, C, T, NCLS)
  with pytest.raises(ValueError) as info:
    tarflow.convert_state_dict(sd, head_dim=HEAD_DIM)
  message = str(info.value)
  for needle in ("12 features", "3x(2x2)", "12x(1x1)", "--patch_size", "--in_channels"):
    assert needle in message, message
  for kwargs in ({"patch_size": P}, {"in_channels": CH}, {"patch_size": P, "in_channels": CH}):
    _, settings = tarflow.convert_state_dict(sd, head_dim=HEAD_DIM, **kwargs)
    assert (settings["flow"]["patch_size"], settings["channels"], settings["image_size"]) == (P, CH, N)
  _, settings = tarflow.convert_state_dict(sd, head_dim=HEAD_DIM, in_channels=12)
  assert (settings["flow"]["patch_size"], settings["image_size"]) == (1, N // P)
  with pytest.raises(ValueError, match="--patch_size=3"):
    tarflow.convert_state_dict(sd, head_dim=HEAD_DIM, patch_size=3)
  assert tarflow.token_layouts(16) == [(1, 4), (4, 2), (16, 1)]
  assert tarflow.token_layouts(6) == [(6, 1)]
  sd6 = ref.random_state_dict(np.random.default_rng(4), K, L, 6, C, T, NCLS)
  _, settings = tarflow.convert_state_dict(sd6, head_dim=HEAD_DIM)
  assert (settings["flow"]["patch_size"], settings["channels"]) == (1, 6)


def test_volume_preserving_checkpoint():
  """ml-tarflow --no-nvp: proj_out gives b only. Converted, it equals the nvp conversion of the
  same weights with a = 0 (TarFlow's vp mode: scale 1, log-det 0); `var` maps to the prior."""
  sd = ref.random_state_dict(np.random.default_rng(5), K, L, D, C, T, NCLS)
  sd["var"] = np.random.default_rng(6).uniform(0.5, 2.0, (T, D))
  vp = dict(sd)
  for k in range(K):
    for leaf in ("weight", "bias"):
      name = f"blocks.{k}.proj_out.{leaf}"
      vp[name] = sd[name][D:]                                   # b rows only
      sd[name] = np.concatenate([np.zeros_like(sd[name][:D]), sd[name][D:]])  # a = 0
  got, settings = tarflow.convert_state_dict(vp, head_dim=HEAD_DIM, patch_size=P)
  want, want_settings = tarflow.convert_state_dict(sd, head_dim=HEAD_DIM, patch_size=P)
  assert settings["nvp"] is False and want_settings["nvp"] is True
  jax.tree.map(np.testing.assert_array_equal, got, want)
  np.testing.assert_allclose(np.exp(2 * got["prior_log_std"]),
                             tarflow.tarflow_tokens_to_ours(sd["var"], P, CH), rtol=1e-6)
  vp["blocks.0.proj_out.weight"] = vp["blocks.0.proj_out.weight"][:5]
  with pytest.raises(ValueError, match="proj_out has 5 outputs"):
    tarflow.convert_state_dict(vp, head_dim=HEAD_DIM, patch_size=P)

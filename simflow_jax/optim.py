"""The optimiser: AdamW per parameter subtree, learning-rate schedules, freezing, EMA.

One parameter tree {vae, flow[, disc][, repa_proj]}; each subtree gets its own
AdamW with its own learning rate (optim.lr_vae / lr_flow / lr_disc; the REPA
projector uses lr_flow), linear warmup then cosine decay or constant, and its own
gradient clipping by global norm (so the discriminator's gradients never scale the
generator's). The parts train.freeze names (the VAE, its encoder, or the flow) get
no update and no optimiser state. The EMA covers every subtree but the discriminator.
"""
import jax
import optax

FROZEN = "frozen"


def make_schedule(lr: float, optim_cfg, num_steps: int):
  warmup = max(int(optim_cfg.warmup_steps), 0)
  if optim_cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _subtree_lrs(optim_cfg) -> dict:
  return {"vae": optim_cfg.lr_vae, "flow": optim_cfg.lr_flow, "disc": optim_cfg.lr_disc,
          "repa_proj": optim_cfg.lr_flow}


def param_labels(params, freeze: str):
  """Label every leaf with its subtree name, or FROZEN (train.freeze: none|vae|encoder|flow)."""
  def label(path, _):
    top = path[0].key
    if top == freeze or (freeze == "encoder" and top == "vae" and path[1].key == "encoder"):
      return FROZEN
    return top
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params) -> optax.GradientTransformation:
  o = config.optim
  transforms = {FROZEN: optax.set_to_zero()}
  for name, lr in _subtree_lrs(o).items():
    if name in params:
      transforms[name] = optax.chain(
          optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
          optax.adamw(make_schedule(lr, o, config.train.num_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay))
  return optax.multi_transform(transforms, param_labels(params, config.train.freeze))


def learning_rates(config, step) -> dict:
  return {f"lr_{name}": make_schedule(lr, config.optim, config.train.num_steps)(step)
          for name, lr in _subtree_lrs(config.optim).items() if name != "repa_proj"}


def generator(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != "disc"}


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)

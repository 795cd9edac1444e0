"""A seconds-long smoke preset (tests and `--mode` checks): 4 steps on digits, tiny models."""
from configs import base, variants


def get_config(arg: str = ""):
  c = base.get_base_config()
  c.data.source, c.data.image_size, c.data.channels, c.data.num_classes = "mnist5k", 32, 1, 10
  c.data.batch_size = 8
  c.vae.ch, c.vae.ch_mult, c.vae.num_res_blocks, c.vae.attn_mid, c.vae.z_channels = 8, (1, 2, 2), 1, False, 4
  c.flow.width, c.flow.layers, c.flow.head_dim = 32, (1, 1), 16
  c.disc.ch, c.disc.n_layers = 8, 2
  c.optim.warmup_steps = 2
  c.optim.ema_decay = 0.9
  c.train.num_steps, c.train.log_every, c.train.ckpt_every = 4, 2, 2
  c.train.async_ckpt = False
  c.train.grid_per_class = 2
  c.sample.batch_size = 8
  c.evals.generation.num_samples = 16
  c.eval.classifier_steps = 20
  return base.lock(variants.apply_variant(c, arg))

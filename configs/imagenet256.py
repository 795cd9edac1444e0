"""Paper scale: SimFlow on ImageNet 256x256, class-conditional (SimFlow, arXiv 2512.04084).

Launch (a v5p-64 slice, data built with scripts/build_array_record.py into a bucket):
  python main.py --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/simflow \
      --config.data.path=gs://BUCKET/tfds
  (launch/README.md starts it on every TPU worker and restarts it after preemption.)
Variants: configs/imagenet256.py:learned_variance (and the others in configs/variants.py).
Price it first: python main.py --config=configs/imagenet256.py --mode=dry_run --config.dry_run.devices=64

Expected (paper, 50k samples vs the ADM reference batch): gFID 2.15 (SimFlow),
1.91 with REPA-E (configs/imagenet256_repae.py); STARFlow 2.40.
INFERRED from the authors' run names: VAE f16d64, flow width 1152 with blocks
[2, 2, 2, 2, 2, 46], adaLN, sigma_bar 0.5 (--fixed_std=0.5). OPEN in the paper:
loss weights, learning rates, schedule, EMA, CFG rule (REPA-E defaults are used).
"""
from configs import base, variants


def get_config(arg: str = ""):
  c = base.get_base_config()
  c.data.source, c.data.tfds_name = "tfds", "imagenet2012"
  c.data.image_size, c.data.channels, c.data.num_classes = 256, 3, 1000
  c.data.random_flip = True
  c.data.num_val = 0
  c.data.worker_count = 8
  c.data.batch_size = 256

  c.vae.ch, c.vae.ch_mult, c.vae.num_res_blocks, c.vae.attn_mid = 128, (1, 1, 2, 2, 4), 2, True
  c.vae.z_channels, c.vae.sigma_bar, c.vae.dtype = 64, 0.5, "bfloat16"

  c.flow.patch_size, c.flow.width, c.flow.head_dim = 1, 1152, 64
  c.flow.layers = (2, 2, 2, 2, 2, 46)
  c.flow.cond, c.flow.cond_blocks = "adaln", "all"
  c.flow.dtype, c.flow.remat, c.flow.scan_layers = "bfloat16", True, True

  # REPA-E's VAE loss weights (SimFlow's own are OPEN).
  c.loss.w_l1, c.loss.w_lpips, c.loss.w_kl, c.loss.w_gan, c.loss.w_nf = 1.0, 1.0, 1e-6, 0.1, 1.0
  c.loss.label_dropout = 0.1
  c.disc.ch, c.disc.n_layers = 64, 3

  c.optim.lr_vae = c.optim.lr_flow = c.optim.lr_disc = 1e-4
  c.optim.b1, c.optim.b2, c.optim.weight_decay = 0.9, 0.999, 0.0
  c.optim.warmup_steps, c.optim.schedule, c.optim.grad_clip = 1000, "constant", 1.0
  c.optim.ema_decay = 0.9999

  c.mesh.fsdp = 1
  c.train.num_steps = 400_000
  c.train.log_every, c.train.ckpt_every, c.train.sample_every = 100, 5000, 20000
  c.train.keep_ckpts = 3

  c.sample.guidance, c.sample.guidance_rule = 2.0, "linear"
  c.sample.batch_size, c.sample.num_samples = 256, 50_000
  c.sample.classes = (88, 207, 279, 360, 387, 417, 812, 980)
  c.evals.generation.num_samples = 50_000
  return base.lock(variants.apply_variant(c, arg))

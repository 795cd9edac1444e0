"""The variant study on the embedded digits (simflow_jax/commands/study/; docs/study.md).

  python main.py --config=configs/study_digits.py --mode=study --workdir=DIR
  python main.py --config=configs/study_digits.py:simflow,end_to_end_noise ...   (some rows)
  --config.study.quick=True                                                      (the short version)

The demo's VAE (configs/demo.py: 32x32 digits -> 8x8x4 latents) and a narrower two-block
flow over 16 tokens, at a step budget of 400 per row (docs/study.md: its run time). Every row
uses these settings; only its preset (configs/variants.py) differs. Each row-seed is measured
by the evaluators below: generation twice (the config's guidance, and none), reconstruction,
likelihood, latent statistics and the PSNR robustness curve (Fig. 3a).
"""
import ml_collections

from configs import base, demo


def get_config(arg: str = ""):
  c = demo.get_config()
  c.study.rows = tuple(r for r in arg.split(",") if r) if arg else ()
  c.study.seeds = (0, 1, 2)
  c.study.workers = 2              # two single-threaded jax processes keep both cores busy
  c.study.steps = 400
  c.flow.width, c.flow.head_dim = 64, 32
  c.study.stage1_fraction = 0.5
  c.study.num_eval_examples = 500
  c.train.log_every = 100
  c.train.grid_per_class = 10      # the end-of-training grid has the evaluation's sample batch
  c.sample.batch_size = 100
  c.train.async_ckpt = False
  c.train.keep_ckpts = 1
  with c.unlocked():  # the table and Fig. 3a use PSNR; VGG16 LPIPS would double the evaluation time
    c.evals = ml_collections.ConfigDict({
        "generation": base.evaluator("generation", num_samples=500),
        "generation_unguided": base.evaluator("generation", num_samples=500, guidance=0.0),
        "reconstruction": base.evaluator("reconstruction"),
        "likelihood": base.evaluator("likelihood"),
        "latent_stats": base.evaluator("latent_stats"),
        "robustness": base.evaluator("robustness", noise_sweep=(0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
                                     lpips=False),
    })
  return base.lock(c)

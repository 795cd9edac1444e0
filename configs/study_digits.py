"""The variant study on the embedded digits (simflow_jax/commands/study/; docs/study.md).

  python main.py --config=configs/study_digits.py --mode=study --workdir=DIR
  python main.py --config=configs/study_digits.py:simflow,end_to_end_noise ...   (some rows)
  --config.study.quick=True                                                      (the short version)

The demo's models (configs/demo.py: 32x32 digits -> 8x8x4 latents; the two-block width-128
flow over 16 tokens, which reaches guided class accuracy 0.96 in 1,200 end-to-end steps), so
SimFlow is trained: every row's flow gets study.steps = 1,200 steps with the demo's warmup
(100) and EMA (0.99); a two-stage row's VAE is a stage-1 VAE trained alone beforehand for
study.stage1_steps = 1,500 (once per preset, shared by every row and seed that freezes it).
Only a row's preset (configs/variants.py) differs. Each job is measured by the evaluators
below: generation twice (the config's guidance, and none), reconstruction on clean latents and
on the flow's (noisy) input, likelihood, latent statistics and the PSNR robustness curve
(Fig. 3a); a stage-1 VAE by the last four of these.

Budget (study.workers=2; a demo-size step runs at about 3-4 steps/s over both cores):
  rows x seeds (variants.ROWS): simflow 4 + end_to_end_noise 4 + four frozen rows x 2
  + end_to_end_learned 1 + three sigma_bar rows x 1 = 20 row-seeds x 1,200 = 24,000 flow steps;
  3 stage-1 VAEs x 1,500 = 4,500 VAE-only steps (no flow pass: about half a step's cost,
  ~2,250 step-equivalents). 26,250 / 3.5 per s = 2.1 h (2.4 h at 3 per s).
  Evaluation: 23 jobs x ~60 s (2 x 500 samples, 500 eval digits) / 2 workers ~ 0.2 h; compiles
  23 x ~40 s / 2 ~ 0.13 h (fewer with the compilation cache); classifier and floors ~1 min.
  Total ~2.4-2.75 h (target <= 3 h); measured: 2 h 31 min (docs/study.md).
  study.quick=True: 3 rows (frozen_vae_fixed, end_to_end_noise, simflow) x 2 seeds x 100 steps
  + 1 stage-1 VAE x 100, 200 samples: compiling dominates (each kind's first job 3-5 min, a
  second seed 1.5-2 min); measured: 13 min 28 s idle (target <= 15 min; docs/study.md). Its
  flows are too short to reach the pilot's target, so quick's pilot only prints its line
  (study.quick_pilot_min_class_acc = 0).
"""
import ml_collections

from configs import base, demo


def get_config(arg: str = ""):
  c = demo.get_config()
  c.study.rows = tuple(r for r in arg.split(",") if r) if arg else ()
  c.study.seeds = (0, 1, 2, 3)     # each row runs its first variants.ROWS[row].seeds of these
  c.study.workers = 2              # two single-threaded jax processes keep both cores busy
  c.study.steps = 1200             # the demo's: SimFlow reaches guided class accuracy >= 0.9
  c.study.stage1_steps = 1500
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
        "reconstruction_noisy": base.evaluator("reconstruction", noisy=True),
        "likelihood": base.evaluator("likelihood"),
        "latent_stats": base.evaluator("latent_stats"),
        "robustness": base.evaluator("robustness", noise_sweep=(0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
                                     lpips=False),
    })
  return base.lock(c)

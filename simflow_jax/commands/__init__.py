"""The entry points of main.py: one module per --mode (train, sample, evaluate, likelihood,
dry_run, study), each with `run(config, workdir)`.

A command validates the config once (models/build.validate_config) and calls the library;
no module outside simflow_jax/commands imports this package, and no command imports another.
"""

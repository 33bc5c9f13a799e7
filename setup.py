"""jaxlcd: reward-guided latent consistency distillation (RG-LCD) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="jaxlcd",
    version="0.1.0",
    description="JAX/Flax, TPU-first trainer for reward-guided latent consistency distillation",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["jaxlcd", "jaxlcd.*"]),
    package_data={"jaxlcd": ["assets/*", "assets/demo/*/*", "assets/demo/*/*/*",  # + the demo world's models
                            "configs/*.py", "configs/demo/*.py"]},  # configs usable from any directory
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.90,<0.2",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "safetensors>=0.5,<0.9",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",       # matrix square root of the demo FID
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",   # jaxlcd.eval's plots and grids
        "grain>=0.2.10,<0.3",
        "array-record>=0.7,<0.9",
        "tensorflow-datasets>=4.9.8,<4.10",   # builders + array_record data source; TensorFlow not needed
        "tensorboardX>=2.6,<3",
        "transformers>=5,<6",   # CLIPTokenizer (the text encoder itself is our Flax port)
        "huggingface-hub>=1.0,<3",   # hub ids of teachers and reward models (jaxlcd.paths)
        "etils[epath]>=1.7,<2",      # one path API for local and gs:// workdirs (jaxlcd.storage); orbax uses it too
        "gcsfs>=2024.6,<2027.0",     # epath's gs:// backend (without TensorFlow)
        "braceexpand>=0.1.7,<0.2",   # webdataset shard patterns /data/{00000..00099}.tar (jaxlcd.data.shards)
    ],
    extras_require={
        # PyTorch reference stack for parity tests; install torch first as the CPU build
        # (`pip install torch==2.13.0`), see README. open-clip-torch is installed with --no-deps
        # by .ci/run because its torchvision requirement pulls a CUDA torch; so is torch-fidelity (the FID
        # reference, tests/fidelity_ref.py).
        "test": [
            "torch>=2.5,<2.15",
            "diffusers>=0.40,<0.43",
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",  # pytest.ini runs two workers
            "ftfy>=6,<7",
            "regex",
            "gcp-storage-emulator>=2024.8,<2027.0",  # a local GCS API for the gs:// workdir test
            "torchmetrics>=1.6,<2",  # the CLIPScore reference (tests/test_scores.py)
            "peft>=0.17,<0.22",      # LoRA reference: diffusers' load_lora_weights / save_lora_weights (tests/test_lora.py)
        ],
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        "gpu": ["jax[cuda12]>=0.10,<0.13"],
    },
)

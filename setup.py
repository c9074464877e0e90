"""jaxforget: machine unlearning for JAX image classifiers, judged against retraining."""
import setuptools

setuptools.setup(
    name="jaxforget",
    version="0.2.0",
    description="Forget chosen training samples from JAX/Flax classifiers and measure it against retraining.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["jaxforget", "jaxforget.*"]),
    package_data={"jaxforget": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        # tfds is read through tfds.data_source (array_record): TensorFlow is never needed.
        "tensorflow-datasets>=4.9.7",
        # tfds imports importlib_resources without declaring it.
        "importlib_resources>=6.0",
        "array-record>=0.7.0",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "scikit-learn>=1.4",
        # Sets the host BLAS thread count while XLA computes on the same cores (compat.host_blas_threads).
        "threadpoolctl>=3.1",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "chex>=0.1.87",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "ruff>=0.5",
        ],
        "cuda": ["jax[cuda12]>=0.7.0"],
    },
)

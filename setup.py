from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="dinov2_repro",
    version="0.1.0",
    description="DINO/DINOv2 self-supervised pretraining, reimplemented and carried to brain-MRI classification",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["dinov2_repro", "dinov2_repro.*"]),
    package_data={"dinov2_repro": ["configs/*.yaml", "configs/*/*.yaml"]},  # presets ship with the package
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pyyaml",
        "omegaconf>=2.3",
        "fvcore",
        "submitit",
        "wandb",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "pillow",
        "nibabel",  # NIfTI volumes (data.kind=nifti)
        "pydicom",  # DICOM series (data.kind=dicom)
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "transformers", "safetensors", "scikit-image", "faiss-cpu",
                "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                "openslide-python", "openslide-bin", "tiffslide"],
        # whole-slide images (dinov2-repro wsi, data.kind=wsi_tiles): openslide with its own library, tiffslide
        "wsi": ["openslide-python", "openslide-bin", "tiffslide", "scikit-image"],
        "dicom": ["pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"],  # compressed DICOM (JPEG, JPEG 2000)
        "benchmarks": ["scikit-image"],  # benchmarks/learning.py's real-image sets
        "xformers": ["xformers"],
        "faiss": ["faiss-cpu"],  # data curation (dinov2-repro curate) and the k-NN faiss backend
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["dinov2-repro=dinov2_repro.cli:main"]},
)

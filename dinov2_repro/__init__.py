"""dinov2_repro: DINO/DINOv2 self-supervised pretraining, reimplemented and carried to brain-MRI classification.

Architecture, bottom up: data -> models (layers, ViT, heads) -> losses -> train (meta-arch, engine)
-> distributed -> eval, with a thin CLI (`dinov2-repro`) on top. Importing the package is cheap: heavy and
optional dependencies are imported where they are used.
"""

__version__ = "0.1.0"

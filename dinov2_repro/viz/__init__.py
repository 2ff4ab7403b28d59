"""Interpretability views of a backbone: CLS attention maps and the PCA of patch features.

Modules:
- `attention`: the attention weights of one block, computed explicitly (training keeps SDPA, which returns none),
  CLS-to-patch maps per head, and DINO-style masks holding a share of the attention mass;
- `pca`: patch tokens -> first principal components as RGB, background removed on the first component;
- `inputs`: the images to show (files, folders, NIfTI/DICOM volumes: a few kept slices) and their preprocessing;
- `plots`: overlays and PNG grids (matplotlib, Agg canvas, imported lazily);
- `views`: backbones + images -> the grids and a JSON summary (`visualize`, also ``dinov2_repro.visualize``);
- `panel`: the attention panel of an evaluation report; `cli`: ``dinov2-repro viz attention|pca``.

Whole-slide images are not handled yet (no slide reader in the project). Nothing heavy is imported here.
"""

"""Evaluation of a backbone on labelled images: linear probe, k-NN and full fine-tuning, with metrics and reports.

Modules:
- `backbone_spec`: turn a SPEC (run dir, checkpoint, hub file, Hugging Face folder, ``random:...``) into a model;
- `data`: train / val / test splits of a labelled dataset (the validation split is always held out of train);
- `features`: frozen-feature extraction with an on-disk cache;
- `linear`, `knn`, `finetune`: the three protocols; `metrics`, `report`: what they write;
- `config`: the typed evaluation config; `cli`: ``dinov2-repro eval linear|knn|finetune``;
- `mil`: gated attention-MIL (slide = bag of tile embeddings), not yet wired into a command.

Nothing heavy is imported here.
"""

"""Data curation as in DINOv2 (Oquab et al. 2023, section 3) and Vo et al. 2024: embeddings, copy detection,
test-set decontamination, hierarchical k-means and balanced sampling. Faiss is imported only when a step needs it.

Python API::

    from dinov2_repro.curation import embed_dataset, load_embeddings, run_dedup
    embed_dataset("data/", "emb/", "random:vit_small/14")
    run_dedup("emb/", "dedup/")                       # dedup/kept.csv is a manifest for train (data.kind=csv)
    run_decontaminate("emb/", "test_data/", "clean/")  # clean/kept.csv: no copy of a test image left
"""

from .decontaminate import contaminated, run_decontaminate
from .dedup import DEFAULT_THRESHOLD, deduplicate, run_dedup
from .embed import Embeddings, embed_dataset, load_embeddings

__all__ = ["DEFAULT_THRESHOLD", "Embeddings", "contaminated", "deduplicate", "embed_dataset", "load_embeddings",
           "run_decontaminate", "run_dedup"]

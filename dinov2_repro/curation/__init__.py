"""Data curation as in DINOv2 (Oquab et al. 2023, section 3) and Vo et al. 2024: embeddings, copy detection,
test-set decontamination, hierarchical k-means and balanced sampling. Faiss is imported only when a step needs it.

Python API::

    from dinov2_repro.curation import embed_dataset, load_embeddings, run_dedup
    embed_dataset("data/", "emb/", "random:vit_small/14")
    run_dedup("emb/", "dedup/")                       # dedup/kept.csv is a manifest for train (data.kind=csv)
    aligned_ncc(image_a, image_b)                     # the pixel check dedup runs on each candidate pair
    run_decontaminate("emb/", "test_data/", "clean/")  # clean/kept.csv: no copy of a test image left
    run_cluster("emb/", "clusters/", ks=(100, 10), subset="clean/kept.csv")
    run_sample("clusters/", "sample/", size=5000)      # sample/sampled.csv: balanced manifest for train
    run_retrieve("emb_seed/", "emb/", "retrieved/", k=4)  # pool images near a curated seed set
"""

from .cluster import balanced_sample, hierarchical_kmeans, run_sample
from .decontaminate import contaminated, run_decontaminate
from .dedup import DEFAULT_THRESHOLD, deduplicate, run_dedup
from .embed import Embeddings, embed_dataset, load_embeddings
from .kmeans_dist import run_cluster
from .retrieve import retrieve_clusters, retrieve_knn, run_retrieve
from .verify import aligned_ncc, verify_pairs

__all__ = ["DEFAULT_THRESHOLD", "Embeddings", "aligned_ncc", "balanced_sample", "contaminated", "deduplicate",
           "embed_dataset", "hierarchical_kmeans", "load_embeddings", "retrieve_clusters", "retrieve_knn",
           "run_cluster", "run_decontaminate", "run_dedup", "run_retrieve", "run_sample", "verify_pairs"]

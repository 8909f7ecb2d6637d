"""Trained quantization by weight sharing (Deep Compression, Han et al. 2016, arXiv:1510.00149).

    from lowbit.cluster import ClusterConfig, cluster_, shared_weights, strip_sharing_
    cluster_(model, ClusterConfig(types={"Linear": 5, "Conv2d": 8}, init="linear"))

``kmeans``: 1-D k-means over the surviving weights with the paper's linear / density / random
initializations. ``sharing``: the verb that makes each layer's weight ``where(kept, C[I], 0)`` with
trainable centroids ``C``, and the way back (``strip_sharing_``) and out (``shared_weights``).
"""

from lowbit.cluster.kmeans import INITS, Init, KMeansResult, cluster_weight, init_centroids, kmeans_1d
from lowbit.cluster.sharing import (
    LAYER_TYPES,
    ClusterConfig,
    SharedLayer,
    SharedWeight,
    cluster_,
    is_shared,
    kept_mask,
    shared_weights,
    strip_sharing_,
)

__all__ = [
    "INITS", "Init", "KMeansResult", "cluster_weight", "init_centroids", "kmeans_1d",
    "LAYER_TYPES", "ClusterConfig", "SharedLayer", "SharedWeight", "cluster_", "is_shared", "kept_mask",
    "shared_weights", "strip_sharing_",
]

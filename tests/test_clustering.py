import numpy as np
import pytest

from settlements.clustering import KMeansClusterer
from settlements.errors import ClusteringError


def blobs(n_per: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0]], dtype=np.float32)
    sizes = [n_per * 3, n_per * 2, n_per]
    x = np.concatenate([c + rng.normal(size=(s, 4)).astype(np.float32) for c, s in zip(centres, sizes, strict=True)])
    y = np.repeat([0, 1, 2], sizes)
    return x, y


def test_recovers_clusters_ordered_by_size() -> None:
    x, y = blobs()
    km = KMeansClusterer(k=3, seed=1, sample_size=len(x)).fit(x)
    labels, dist = km.predict(x)
    assert (labels == y).mean() > 0.99  # id 0 is the largest blob
    assert (dist >= 0).all()


def test_training_sample_is_explicit_and_seeded() -> None:
    x, _ = blobs(2000)
    a = KMeansClusterer(k=3, seed=7, sample_size=500).fit(x)
    b = KMeansClusterer(k=3, seed=7, sample_size=500).fit(x)
    assert a.n_train_ == 500  # not FAISS's silent 256 points per centroid
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    big = KMeansClusterer(k=3, seed=7, sample_size=5000).fit(x)
    assert big.n_train_ == 5000 > 256 * 3


def test_pca_and_l2_and_save_load(tmp_path) -> None:
    x, _ = blobs()
    km = KMeansClusterer(k=3, seed=0, sample_size=len(x), pca_dim=2, l2_normalize=True).fit(x)
    km.save(tmp_path / "c.npz")
    again = KMeansClusterer.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(km.predict(x)[0], again.predict(x)[0])
    assert again.cluster_centers_.shape == (3, 2)


def test_k_larger_than_the_tiles() -> None:
    with pytest.raises(ClusteringError, match=r"clustering\.k: k=10 exceeds the number of valid tiles \(4\)"):
        KMeansClusterer(k=10).fit(np.zeros((4, 3), np.float32))


def test_faiss_blas_runs_kernels_for_this_cpu() -> None:
    """faiss-cpu's bundled OpenBLAS falls back to generic kernels on CPUs newer than itself unless told."""
    import threadpoolctl

    import settlements

    if settlements._openblas_coretype() is None:
        pytest.skip("a CPU without AVX2: OpenBLAS's own choice stands")
    import faiss  # noqa: F401  (loads its OpenBLAS)

    archs = [i.get("architecture") for i in threadpoolctl.threadpool_info()
             if i["user_api"] == "blas" and "faiss" in i["filepath"]]
    assert archs and "Prescott" not in archs


def test_restarts_keep_faiss_best_fit_and_record_their_agreement() -> None:
    """nredo restarts run one by one give FAISS's own nredo fit, and how much the restarts agree (ARI)."""
    import math

    import faiss

    from settlements.clustering import RESTART_AGREEMENT, restart_warning

    rng = np.random.default_rng(0)
    noise = rng.normal(size=(1500, 16)).astype(np.float32)
    km = KMeansClusterer(k=8, seed=3, sample_size=len(noise), nredo=6).fit(noise)

    def faiss_fit(nredo: int) -> np.ndarray:
        ref = faiss.Kmeans(16, 8, niter=25, nredo=nredo, seed=3, max_points_per_centroid=math.ceil(1500 / 8) + 1,
                           min_points_per_centroid=1)
        ref.train(noise)
        return ref.centroids

    def same_centroids(a: np.ndarray, b: np.ndarray) -> bool:  # equal up to the order of the clusters
        d = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sorted(d.argmin(1)) == list(range(len(b))) and bool(d.min(1).max() < 1e-8)

    # the restart kept is FAISS's nredo=6 fit, which is not its first restart (so the seeds really matter)
    redo6 = faiss_fit(6)
    assert same_centroids(km.cluster_centers_, redo6) and not same_centroids(faiss_fit(1), redo6)
    agreement = km.restart_agreement_
    assert agreement["restarts"] == 6 and 0 <= agreement["min"] <= agreement["mean"] < RESTART_AGREEMENT
    assert restart_warning(agreement).startswith("clusters: the 6 k-means restarts agree little (mean ARI ")
    x, _ = blobs()
    clear = KMeansClusterer(k=3, seed=0, sample_size=len(x), nredo=4).fit(x).restart_agreement_
    assert clear == {"restarts": 4, "min": 1.0, "mean": 1.0} and restart_warning(clear) is None
    assert KMeansClusterer(k=3, seed=0, nredo=1).fit(x).restart_agreement_ is None

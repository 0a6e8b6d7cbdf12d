"""The fidelity gate: may another engine's or precision's embeddings stand in for torch fp32's?

On a sample of the run's own tiles both are computed from the same model inputs; the candidate passes
where the cosine of its embedding to the fp32 one is at least :data:`~settlements.config.GATE_COSINE`
for :data:`~settlements.config.GATE_TILE_SHARE` of the tiles (the 1st percentile of the cosines, for
99 %), and k-means with the pipeline's clustering settings, fitted on each, labels the tiles alike
(adjusted Rand index >= :data:`~settlements.config.GATE_ARI`). The sample is compared batch by batch, and a
candidate is refused as soon as more tiles miss the cosine than the whole sample may. Speed without this
check is a trap:
torch's bf16 autocast ran MobileNetV2 1.6x faster here with cosines near 0.9 on some tiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..config import GATE_ARI, GATE_COSINE, GATE_TILE_SHARE, Clustering


@dataclass(frozen=True)
class GateReport:
    """What the gate measured for one engine and precision on ``tiles`` tiles, and its verdict."""

    engine: str
    precision: str
    tiles: int
    cosine_p01: float  # the cosine that (1 - GATE_TILE_SHARE) of the tiles fall below
    cosine_min: float
    cosine_share: float  # share of tiles at or above GATE_COSINE
    ari: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateReport:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def figures(self) -> str:
        ari = f"k-means ARI {self.ari:.3f}" if self.ari == self.ari else "k-means not compared"
        return (f"cosine to torch fp32 >= {GATE_COSINE} for {self.cosine_share:.1%} of {self.tiles} tiles "
                f"(1st percentile {self.cosine_p01:.5f}, min {self.cosine_min:.5f}), {ari}")


def allowed_misses(n: int) -> int:
    """Tiles of ``n`` that may fall below :data:`GATE_COSINE` and still pass."""
    return int(np.floor((1 - GATE_TILE_SHARE) * n + 1e-9))


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity, in float64 (a zero vector against a zero vector counts as 1)."""
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-300)
    cos[both_zero] = 1.0
    return np.where(np.isfinite(cos), cos, -1.0)  # NaN or inf in the candidate: as wrong as it gets


def kmeans_labels(x: np.ndarray, clustering: Clustering) -> np.ndarray:
    """The pipeline's k-means (its k, seed, restarts, normalisation; no PCA) fitted on ``x``: each row's
    cluster. k is lowered to a tenth of the rows where the sample is small."""
    from ..clustering import KMeansClusterer

    k = max(2, min(clustering.k, len(x) // 10))
    model = KMeansClusterer(k=k, seed=clustering.seed, sample_size=len(x), niter=clustering.niter,
                            nredo=clustering.nredo, l2_normalize=clustering.l2_normalize, use_gpu=False)
    return model.fit(np.ascontiguousarray(x, dtype=np.float32)).predict(np.ascontiguousarray(x, np.float32))[0]


def refused_early(engine: str, precision: str, reference: np.ndarray, candidate: np.ndarray) -> GateReport:
    """The verdict on the first tiles of the sample where more of them than the whole sample may miss
    already fall below :data:`GATE_COSINE`: refused, whatever the other tiles give (k-means not compared)."""
    cos = cosines(reference, candidate)
    return GateReport(engine, precision, len(cos), float(np.percentile(cos, 100 * (1 - GATE_TILE_SHARE))),
                      float(cos.min()), float((cos >= GATE_COSINE).mean()), float("nan"), False)


def judge(engine: str, precision: str, reference: np.ndarray, candidate: np.ndarray,
          clustering: Clustering) -> GateReport:
    """The gate's verdict on ``candidate`` embeddings of the tiles whose fp32 ones are ``reference``."""
    from sklearn.metrics import adjusted_rand_score

    cos = cosines(reference, candidate)
    finite = bool(np.isfinite(candidate).all())
    p01 = float(np.percentile(cos, 100 * (1 - GATE_TILE_SHARE)))
    share = float((cos >= GATE_COSINE).mean())
    ari = float(adjusted_rand_score(kmeans_labels(reference, clustering), kmeans_labels(candidate, clustering))) \
        if finite and len(cos) >= 20 else (1.0 if finite else 0.0)
    passed = finite and share >= GATE_TILE_SHARE and ari >= GATE_ARI
    return GateReport(engine, precision, len(cos), p01, float(cos.min()), share, ari, passed)

"""Retrieval features in the spirit of OmniRouter: each model's accuracy on the past (training) queries of
the same task most similar to this one, by cosine similarity of the TF-IDF/SVD text embeddings.

Two modes. ``exact``: the k nearest training queries (brute force, top-k by argpartition: cost grows with
queries x training queries). ``cluster`` (default, for throughput): training queries of each task are
grouped by spherical k-means into clusters of ~``cluster_size``; a query's neighbours are the members of
its ``probes`` most similar clusters (k ~ probes x cluster_size), so the cost is queries x clusters.

Training queries get their features out-of-fold: their neighbours are drawn only from the other folds'
training queries (in cluster mode, the fold's outcomes are subtracted from the cluster sums). Leave-one-out
is not enough: within a cluster a leave-one-out mean moves by exactly the row's own label, which a model
downstream learns to read (the target-encoding leak).
Accuracies are smoothed toward the model's prior on the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK = 4096


@dataclass
class Retriever:
    emb: np.ndarray  # (n_train, d) float32, unit norm
    task: np.ndarray  # (n_train,) int32 task code
    ysum: np.ndarray  # (n_train, n_models) float32: 1 where correct
    ycnt: np.ndarray  # (n_train, n_models) float32: 1 where the model answered
    k: int = 20
    alpha: float = 2.0  # pseudo-count toward the prior
    mode: str = "exact"
    probes: int = 2
    centroids: np.ndarray | None = None  # (C, d) cluster mode
    centroid_task: np.ndarray | None = None  # (C,)
    csum: np.ndarray | None = None  # (C, n_models)
    ccnt: np.ndarray | None = None  # (C, n_models)
    assign: np.ndarray | None = None  # (n_train,) cluster of each training query

    @classmethod
    def build(
        cls,
        emb: np.ndarray,
        task: np.ndarray,
        ysum: np.ndarray,
        ycnt: np.ndarray,
        *,
        mode: str = "cluster",
        k: int = 20,
        cluster_size: int = 20,
        probes: int = 2,
        seed: int = 0,
    ) -> Retriever:
        retriever = cls(emb=emb, task=task, ysum=ysum, ycnt=ycnt, k=k, mode=mode, probes=probes)
        if mode == "cluster":
            retriever._fit_clusters(cluster_size, seed)
        return retriever

    def _fit_clusters(self, cluster_size: int, seed: int, iters: int = 15) -> None:
        rng = np.random.default_rng(seed)
        cents, ctask, assign = [], [], np.zeros(self.emb.shape[0], dtype=np.int64)
        offset = 0
        for t in np.unique(self.task):
            rows = np.flatnonzero(self.task == t)
            x = self.emb[rows]
            n_c = int(max(1, min(len(rows), round(len(rows) / cluster_size))))
            c = x[rng.choice(len(rows), n_c, replace=False)].copy()
            for _ in range(iters):
                a = np.argmax(x @ c.T, axis=1)
                for j in range(n_c):
                    members = x[a == j]
                    if len(members):
                        v = members.sum(axis=0)
                        c[j] = v / max(float(np.linalg.norm(v)), 1e-12)
            a = np.argmax(x @ c.T, axis=1)
            assign[rows] = a + offset
            cents.append(c)
            ctask.extend([t] * n_c)
            offset += n_c
        self.centroids = np.vstack(cents).astype(np.float32) if cents else np.zeros((0, self.emb.shape[1]), np.float32)
        self.centroid_task = np.asarray(ctask, dtype=np.int32)
        self.assign = assign
        n_models = self.ysum.shape[1]
        self.csum = np.zeros((offset, n_models), dtype=np.float32)
        self.ccnt = np.zeros((offset, n_models), dtype=np.float32)
        np.add.at(self.csum, assign, self.ysum)
        np.add.at(self.ccnt, assign, self.ycnt)

    def query(
        self,
        emb: np.ndarray,
        task: np.ndarray,
        prior: np.ndarray,
        query_fold: np.ndarray | None = None,
        train_fold: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy per model (n, n_models) float32, mean similarity of the neighbours (n,) float32).

        ``task``: task code per query (-1 = unknown: search every training query); ``prior``: (n, n_models)
        fallback accuracies; ``query_fold``/``train_fold``: fold of each query and of each training query
        (training only: a query never sees neighbours from its own fold), or None at prediction time.
        """
        n, n_models = emb.shape[0], self.ysum.shape[1]
        num = np.zeros((n, n_models), dtype=np.float32)
        den = np.zeros((n, n_models), dtype=np.float32)
        sim_mean = np.zeros(n, dtype=np.float32)
        if self.emb.shape[0] == 0 or emb.shape[1] == 0:
            return prior.astype(np.float32), sim_mean
        if self.mode == "cluster":
            return self._query_clusters(emb, task, prior, query_fold, train_fold)
        for t in np.unique(task):
            rows = np.flatnonzero(task == t)
            cand = np.flatnonzero(self.task == t) if t >= 0 else np.arange(self.emb.shape[0])
            if len(cand) < 2:
                cand = np.arange(self.emb.shape[0])
            k = min(self.k, len(cand) - 1)
            cemb, csum, ccnt = self.emb[cand], self.ysum[cand], self.ycnt[cand]
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                sims = emb[chunk] @ cemb.T
                if query_fold is not None and train_fold is not None:
                    sims[train_fold[cand][None, :] == query_fold[chunk][:, None]] = -np.inf
                top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
                top_sims = np.take_along_axis(sims, top, axis=1)
                sim_mean[chunk] = top_sims.mean(axis=1)
                num[chunk] = csum[top].sum(axis=1)
                den[chunk] = ccnt[top].sum(axis=1)
        return _smoothed(num, den, prior, self.alpha), sim_mean

    def _clusters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if (
            self.centroids is None
            or self.centroid_task is None
            or self.csum is None
            or self.ccnt is None
            or self.assign is None
        ):
            raise RuntimeError("cluster retrieval used before the clusters were fitted")
        return self.centroids, self.centroid_task, self.csum, self.ccnt, self.assign

    def _query_clusters(
        self,
        emb: np.ndarray,
        task: np.ndarray,
        prior: np.ndarray,
        query_fold: np.ndarray | None,
        train_fold: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        centroids, centroid_task, csum_all, ccnt_all, assign = self._clusters()
        n, n_models = emb.shape[0], self.ysum.shape[1]
        num = np.zeros((n, n_models), dtype=np.float32)
        den = np.zeros((n, n_models), dtype=np.float32)
        sim_mean = np.zeros(n, dtype=np.float32)
        for t in np.unique(task):
            rows = np.flatnonzero(task == t)
            cand = np.flatnonzero(centroid_task == t) if t >= 0 else np.arange(len(centroid_task))
            if len(cand) == 0:
                cand = np.arange(len(centroid_task))
            probes = min(self.probes, len(cand))
            sims = emb[rows] @ centroids[cand].T
            top, sim_mean[rows] = _top_probes(sims, probes)
            chosen = cand[top]  # (r, probes) global cluster ids
            if query_fold is None or train_fold is None:
                num[rows] = csum_all[chosen].sum(axis=1)
                den[rows] = ccnt_all[chosen].sum(axis=1)
                continue
            for f in np.unique(query_fold[rows]):
                in_f = train_fold == f
                csum = csum_all.copy()
                ccnt = ccnt_all.copy()
                np.subtract.at(csum, assign[in_f], self.ysum[in_f])
                np.subtract.at(ccnt, assign[in_f], self.ycnt[in_f])
                sel = query_fold[rows] == f
                num[rows[sel]] = csum[chosen[sel]].sum(axis=1)
                den[rows[sel]] = ccnt[chosen[sel]].sum(axis=1)
        return _smoothed(num, den, prior, self.alpha), sim_mean

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"knn_emb": self.emb, "knn_task": self.task, "knn_ysum": self.ysum, "knn_ycnt": self.ycnt}
        if self.mode == "cluster":
            centroids, centroid_task, csum, ccnt, assign = self._clusters()
            arrays.update(
                knn_centroids=centroids,
                knn_centroid_task=centroid_task,
                knn_csum=csum,
                knn_ccnt=ccnt,
                knn_assign=assign,
            )
        return {"k": self.k, "alpha": self.alpha, "mode": self.mode, "probes": self.probes}, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Retriever:
        return cls(
            emb=arrays["knn_emb"],
            task=arrays["knn_task"],
            ysum=arrays["knn_ysum"],
            ycnt=arrays["knn_ycnt"],
            k=int(meta["k"]),
            alpha=float(meta["alpha"]),
            mode=str(meta.get("mode", "exact")),
            probes=int(meta.get("probes", 2)),
            centroids=arrays.get("knn_centroids"),
            centroid_task=arrays.get("knn_centroid_task"),
            csum=arrays.get("knn_csum"),
            ccnt=arrays.get("knn_ccnt"),
            assign=arrays.get("knn_assign"),
        )


def _smoothed(num: np.ndarray, den: np.ndarray, prior: np.ndarray, alpha: float) -> np.ndarray:
    """float32 of (num + alpha * prior) / (den + alpha), the same operations with fewer temporaries."""
    acc = alpha * np.asarray(prior)
    acc += num
    acc /= den + alpha
    return acc.astype(np.float32)


def _top_probes(sims: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of each row's ``probes`` largest similarities, their mean), exactly as
    ``np.argpartition(-sims, probes - 1)[:, :probes]`` and the float32 mean of those values in that order.

    ``probes`` argmax passes find the same set whenever it is unique (the probes-th largest value is above
    the next one; cluster sums over the set do not depend on order). The float32 mean of 3 values depends on
    the order they are added in: argpartition (numpy's small-kth selection) returns them in descending
    order, which is checked on a sample of the rows where the order matters; rows with a non-unique set, or
    all of them if the check fails, go to argpartition. ``sims`` is modified during the call and restored."""
    n, width = sims.shape
    if probes >= width:
        top = np.tile(np.arange(width), (n, 1))
        return top, np.take_along_axis(sims, top, axis=1).mean(axis=1)
    if probes != 3 or sims.dtype != np.float32 or n < 256 or width > 256:
        # (up to 256 columns numpy's selection for kth < 3 is a selection sort, or with AVX-512 a sorting
        # network: descending either way; wider rows may come back in another order)
        return _argpartition_top(sims, probes)
    rows = np.arange(n)
    idx = np.empty((n, 4), dtype=np.int64)
    val = np.empty((n, 4), dtype=np.float32)
    for j in range(4):  # each row's maximum, masked out in place, 4 times; then the values are put back
        idx[:, j] = np.argmax(sims, axis=1)
        val[:, j] = sims[rows, idx[:, j]]
        sims[rows, idx[:, j]] = -np.inf
    for j in range(4):
        sims[rows, idx[:, j]] = val[:, j]
    a, b, c = val[:, 0], val[:, 1], val[:, 2]
    mean = (a + b) + c
    unique = (c > val[:, 3]) & np.isfinite(mean)
    order_matters = np.flatnonzero(unique & ((mean != (a + c) + b) | (mean != (b + c) + a)))
    mean /= np.float32(3)
    top = idx[:, :3].copy()
    sample = order_matters[:: max(1, len(order_matters) // 64)]
    if len(sample):
        _, sample_mean = _argpartition_top(sims[sample], probes)
        if not np.array_equal(sample_mean.view(np.uint32), mean[sample].view(np.uint32)):
            unique[order_matters] = False
    slow = np.flatnonzero(~unique)
    if len(slow):
        top[slow], mean[slow] = _argpartition_top(sims[slow], probes)
    return top, mean


def _argpartition_top(sims: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    top = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
    return top, np.take_along_axis(sims, top, axis=1).mean(axis=1)

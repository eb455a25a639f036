"""Datasets for the traffic simulator, split into the four roles of the benchmark protocol.

``load(name, seed)`` returns a :class:`Dataset` whose rows are split, stratified by class,
into:

=============  ========  ===========================================================
role           fraction  used for
=============  ========  ===========================================================
victim train   40 %      training the victim model (never queried as such)
benign pool    25 %      the natural data benign clients draw from
attacker pool  15 %      the attacker's own natural data (JbDA seeds, HSJ starts, ...)
test           20 %      measuring the fidelity of an attacker's substitute
=============  ========  ===========================================================

"digits", "breast_cancer" and "wine" ship with scikit-learn (no download; scikit-learn
is the optional ``bench`` extra). "synthetic" is :class:`exporter.demo.DigitsLike` and
needs only numpy, so the simulator and its tests run without scikit-learn.

The *feature box* (per-feature min and max over the whole dataset) is what Tramèr's
uniform attack samples from and what every synthetic attack point is clipped to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

NAMES = ("digits", "breast_cancer", "wine", "synthetic")
IMAGE_DATASETS = ("digits", "synthetic")  # 8x8 images: off-distribution data by image transforms
FRACTIONS = {"victim": 0.40, "benign": 0.25, "attacker": 0.15, "test": 0.20}
SYNTHETIC_ROWS = 2000
SMOTE_NEIGHBOURS = 5
MAX_DECIMALS = 6


class DatasetUnavailable(RuntimeError):
    """The dataset needs scikit-learn, which is not installed (``pip install 'monitaur-exporter[bench]'``)."""


def sklearn_available() -> bool:
    """Whether scikit-learn can be imported (the sklearn datasets and the benchmark need it)."""
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def default_dataset() -> str:
    """``digits`` when scikit-learn is importable, else ``synthetic``."""
    return "digits" if sklearn_available() else "synthetic"


@dataclass
class Dataset:
    """One dataset, split by role, with its feature box and natural precision."""

    name: str
    X_victim: np.ndarray
    y_victim: np.ndarray
    X_benign: np.ndarray
    y_benign: np.ndarray
    X_attacker: np.ndarray
    y_attacker: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    lo: np.ndarray  # (d,) feature box: per-feature minimum over the whole dataset
    hi: np.ndarray  # (d,) per-feature maximum
    data_decimals: np.ndarray  # (d,) decimals the natural data is recorded with (0 = integers)
    num_classes: int
    other: np.ndarray | None = None  # natural rows of *another* dataset (tabular Knockoff pools)
    # A generator of fresh natural rows (rng, classes) -> X, when the distribution is known
    # (synthetic); otherwise natural rows are interpolated from the pools.
    generator: Callable[[np.random.Generator, np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    _knn: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.lo.shape[0])

    @property
    def span(self) -> np.ndarray:
        """(d,) ``hi - lo``; 0 for constant features (those get no synthetic perturbation)."""
        return self.hi - self.lo

    @property
    def is_image(self) -> bool:
        return self.name in IMAGE_DATASETS

    @property
    def decimals(self) -> np.ndarray:
        """(d,) decimals for inputs written to the log: the data's own precision, and at
        least 4 significant digits of the feature's range so that tiny attack
        perturbations survive rounding."""
        rng = np.where(self.span > 0, self.span, 1.0)
        sig = np.ceil(4 - np.log10(rng)).astype(int)
        return np.clip(np.maximum(self.data_decimals, sig), 0, MAX_DECIMALS)

    def clip(self, X: np.ndarray) -> np.ndarray:
        """Clip points into the feature box."""
        return np.clip(X, self.lo, self.hi)

    def round(self, X: np.ndarray) -> np.ndarray:
        """Round inputs the way they are written to the log (and seen by the API)."""
        return round_columns(X, self.decimals)

    def round_natural(self, X: np.ndarray) -> np.ndarray:
        """Round to the precision of the natural data (integers for digits)."""
        return round_columns(X, self.data_decimals)

    # -- natural samplers ---------------------------------------------------
    def natural(self, rng: np.random.Generator, n: int, role: str = "benign", classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``n`` natural-looking inputs from a pool (``benign`` or ``attacker``), and their classes.

        Pools are small (wine's benign pool has ~44 rows), and real clients rarely send
        the very same record twice, so samples are SMOTE-style interpolations between a
        pool row and one of its 5 nearest same-class neighbours, rounded to the data's
        own precision: in-distribution, class-consistent and rarely identical. The
        synthetic dataset samples its known generator instead (its rows are so close to
        one another that interpolation and rounding would repeat them).
        ``classes`` (length ``n``) fixes the class of each sample.
        """
        X, y = (self.X_benign, self.y_benign) if role == "benign" else (self.X_attacker, self.y_attacker)
        if self.generator is not None:
            cls = rng.integers(0, self.num_classes, n) if classes is None else np.asarray(classes)
            return self.clip(self.generator(rng, cls)), cls
        knn = self._neighbours(X, y, role)
        if classes is None:
            idx = rng.integers(0, len(X), n)
        else:
            idx = np.empty(n, dtype=np.int64)
            for c in np.unique(classes):
                members = np.flatnonzero(y == c)
                if members.size == 0:  # class absent from this pool: any row
                    members = np.arange(len(X))
                where = np.flatnonzero(classes == c)
                idx[where] = members[rng.integers(0, members.size, where.size)]
        nb = knn[idx, rng.integers(0, knn.shape[1], n)]
        u = rng.random((n, 1))
        out = X[idx] + u * (X[nb] - X[idx])
        return self.clip(self.round_natural(out)), y[idx]

    def _neighbours(self, X: np.ndarray, y: np.ndarray, role: str) -> np.ndarray:
        key = 0 if role == "benign" else 1
        if key not in self._knn:
            k = SMOTE_NEIGHBOURS
            scale = np.where(self.span > 0, self.span, 1.0)
            Z = X / scale
            knn = np.zeros((len(X), k), dtype=np.int64)
            for c in np.unique(y):
                members = np.flatnonzero(y == c)
                d = ((Z[members, None, :] - Z[None, members, :]) ** 2).sum(-1)
                np.fill_diagonal(d, np.inf)
                kk = min(k, max(members.size - 1, 1))
                order = np.argsort(d, axis=1)[:, :kk]
                knn[members] = members[order][:, np.arange(k) % kk]
            self._knn[key] = knn
        return self._knn[key]

    def off_distribution(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` natural inputs from *another* distribution (Knockoff Nets, ActiveThief pools).

        * images (digits, synthetic): attacker-pool images under the 8 flips/rotations of
          the square, optionally inverted (``max - x``): real strokes, wrong geometry;
          the identity without inversion is excluded so no row is in-distribution;
        * tabular: half are rows of another scikit-learn dataset (digits for
          breast_cancer, breast_cancer for wine; features taken cyclically) rescaled
          feature-wise into this box; half are attacker-pool rows whose features are
          drawn independently from their marginals (a column-wise permutation: natural
          values, broken correlations).

        Drawn without replacement while the candidate set lasts.
        """
        if self.is_image:
            return self._transformed_images(rng, n)
        half = n // 2
        parts = [self._other_rescaled(rng, half), self._column_shuffled(rng, n - half)]
        out = np.concatenate(parts)
        return out[rng.permutation(n)]

    def _transformed_images(self, rng: np.random.Generator, n: int) -> np.ndarray:
        side = int(round(np.sqrt(self.dim)))
        pool = self.X_attacker.reshape(-1, side, side)
        top = float(self.hi.max())
        ops: list[Callable[[np.ndarray], np.ndarray]] = []
        for k in range(4):
            for flip in (False, True):
                for inv in (False, True):
                    if k == 0 and not flip and not inv:
                        continue
                    ops.append(lambda im, k=k, flip=flip, inv=inv: _image_op(im, k, flip, inv, top))
        combos = len(pool) * len(ops)
        picks = rng.permutation(combos)[:n] if n <= combos else rng.integers(0, combos, n)
        rows, which = np.divmod(picks, len(ops))
        out = np.empty((n, self.dim))
        for j, op in enumerate(ops):
            sel = np.flatnonzero(which == j)
            if sel.size:
                out[sel] = op(pool[rows[sel]]).reshape(sel.size, -1)
        return self.clip(out)

    def _other_rescaled(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.other is None:
            return self._column_shuffled(rng, n)
        src = self.other[:, np.arange(self.dim) % self.other.shape[1]]
        smin, smax = src.min(0), src.max(0)
        unit = (src - smin) / np.where(smax > smin, smax - smin, 1.0)
        rescaled = self.clip(self.round_natural(self.lo + unit * self.span))
        picks = rng.permutation(len(src))[:n] if n <= len(src) else rng.integers(0, len(src), n)
        return rescaled[picks]

    def _column_shuffled(self, rng: np.random.Generator, n: int) -> np.ndarray:
        pool = self.X_attacker
        return pool[rng.integers(0, len(pool), (n, self.dim)), np.arange(self.dim)]


def _image_op(im: np.ndarray, k: int, flip: bool, invert: bool, top: float) -> np.ndarray:
    out = np.rot90(im, k, axes=(1, 2))
    if flip:
        out = out[:, :, ::-1]
    if invert:
        out = top - out
    return out


def round_columns(X: np.ndarray, decimals: np.ndarray) -> np.ndarray:
    """Round each column of ``X`` to its own number of decimals (vectorized)."""
    scale = 10.0 ** decimals.astype(np.float64)
    return np.round(X * scale) / scale


def _data_decimals(X: np.ndarray) -> np.ndarray:
    """Per feature, the fewest decimals that 99 % of the values are written with (wine has
    one 9.899999 among two-decimal values: an artefact, not the feature's precision)."""
    out = np.full(X.shape[1], MAX_DECIMALS, dtype=int)
    for dec in range(MAX_DECIMALS, -1, -1):
        ok = np.mean(np.abs(X - np.round(X, dec)) < 1e-9, axis=0) >= 0.99
        out[ok] = dec
    return out


def _stratified_split(rng: np.random.Generator, y: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices per role; every class is split by :data:`FRACTIONS`."""
    parts: dict[str, list[np.ndarray]] = {r: [] for r in FRACTIONS}
    bounds = np.cumsum([FRACTIONS[r] for r in FRACTIONS])
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.rint(bounds * idx.size).astype(int)
        start = 0
        for role, end in zip(FRACTIONS, cuts):
            parts[role].append(idx[start:end])
            start = end
    return {r: rng.permutation(np.concatenate(v)) for r, v in parts.items()}


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    if not sklearn_available():
        raise DatasetUnavailable(f"dataset {name!r} needs scikit-learn (pip install 'monitaur-exporter[bench]'); use 'synthetic' without it")
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}[name]
    bunch = loader()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load(name: str, seed: int = 0) -> Dataset:
    """Load dataset ``name`` and split it by role with a seeded, stratified shuffle."""
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    rng = np.random.default_rng([seed, 7])
    other = None
    generator = None
    if name == "synthetic":
        from exporter.demo import CLASSES, DigitsLike

        world = DigitsLike(seed)
        y = np.arange(SYNTHETIC_ROWS) % CLASSES
        X = world.sample(rng, SYNTHETIC_ROWS, classes=y)
        generator = lambda g, classes: world.sample(g, len(classes), classes=classes)  # noqa: E731
    else:
        X, y = _sklearn(name)
        other_name = {"digits": None, "breast_cancer": "digits", "wine": "breast_cancer"}[name]
        if other_name is not None:
            other = _sklearn(other_name)[0]
    split = _stratified_split(rng, y)
    return Dataset(
        name=name,
        X_victim=X[split["victim"]], y_victim=y[split["victim"]],
        X_benign=X[split["benign"]], y_benign=y[split["benign"]],
        X_attacker=X[split["attacker"]], y_attacker=y[split["attacker"]],
        X_test=X[split["test"]], y_test=y[split["test"]],
        lo=X.min(axis=0), hi=X.max(axis=0),
        data_decimals=_data_decimals(X),
        num_classes=int(y.max()) + 1,
        other=other,
        generator=generator,
    )

"""The victim model, and the small softmax regression attackers use as a substitute.

Both are plain numpy so the simulator runs without scikit-learn. The victim is a
one-hidden-layer MLP (tanh, 32 units) trained full-batch with Adam and weight decay on
standardized features, then *temperature-scaled* on a held-out fifth of its training
data, so its probabilities have realistic, calibrated confidence: mostly high on
natural inputs, visibly lower near class boundaries and off the data.
"""

from __future__ import annotations

import numpy as np

from exporter.sim.datasets import Dataset


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Adam:
    """Minimal Adam optimizer over a list of arrays (updated in place)."""

    def __init__(self, params: list[np.ndarray], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= self.lr * (m / (1 - b1**self.t)) / (np.sqrt(v / (1 - b2**self.t)) + 1e-8)


class Victim:
    """One-hidden-layer MLP with temperature scaling: ``predict_proba(X) -> (n, K)``."""

    def __init__(self, dataset: Dataset, seed: int = 0, hidden: int = 32, epochs: int = 300, weight_decay: float = 1e-3) -> None:
        rng = np.random.default_rng([seed, 11])
        X, y = dataset.X_victim, dataset.y_victim
        K = dataset.num_classes
        self.num_classes = K
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.std = np.where(std > 1e-12, std, 1.0)
        order = rng.permutation(len(X))
        cut = max(int(0.8 * len(X)), len(X) - max(len(X) // 5, K))
        tr, val = order[:cut], order[cut:]
        Z, Y = self._standardize(X[tr]), np.eye(K)[y[tr]]
        d = X.shape[1]
        self.W1 = rng.normal(0, 1 / np.sqrt(d), (d, hidden))
        self.b1 = np.zeros(hidden)
        self.W2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, K))
        self.b2 = np.zeros(K)
        self.temperature = 1.0
        opt = _Adam([self.W1, self.b1, self.W2, self.b2], lr=0.01)
        n = len(Z)
        for _ in range(epochs):
            H = np.tanh(Z @ self.W1 + self.b1)
            P = softmax(H @ self.W2 + self.b2)
            G = (P - Y) / n
            gW2 = H.T @ G + weight_decay * self.W2
            gH = (G @ self.W2.T) * (1 - H * H)
            gW1 = Z.T @ gH + weight_decay * self.W1
            opt.step([gW1, gH.sum(0), gW2, G.sum(0)])
        self.temperature = self._fit_temperature(X[val], y[val])

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.std

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Untempered logits of a (n, d) batch."""
        H = np.tanh(self._standardize(np.atleast_2d(X)) @ self.W1 + self.b1)
        return H @ self.W2 + self.b2

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, (n, K)."""
        return softmax(self.logits(X) / self.temperature)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Arg-max class, (n,)."""
        return self.logits(X).argmax(axis=1)

    def _fit_temperature(self, X: np.ndarray, y: np.ndarray) -> float:
        """The temperature (>= 1) minimizing held-out negative log-likelihood (grid search).

        Only softening is allowed: on small, easy validation sets the NLL optimum is a
        near-zero temperature that would make every answer 1.0, which no real API shows.
        """
        z = self.logits(X)
        best, best_nll = 1.0, np.inf
        for t in np.geomspace(1.0, 8.0, 31):
            p = softmax(z / t)
            nll = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
            if nll < best_nll:
                best, best_nll = float(t), nll
        return best


class SoftmaxRegression:
    """Multinomial logistic regression on box-scaled features: the attackers' substitute.

    Papernot's JbDA and ActiveThief retrain a local model every round; a softmax
    regression, trained from scratch by full-batch gradient descent, is enough to give
    the Jacobian signs and the uncertainty those attacks need, and costs milliseconds.
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray, num_classes: int, l2: float = 1e-3, iters: int = 150, lr: float = 0.5) -> None:
        self.lo = lo
        self.scale = np.where(hi > lo, hi - lo, 1.0)
        self.K = num_classes
        self.l2, self.iters, self.lr = l2, iters, lr
        self.W = np.zeros((lo.shape[0], num_classes))
        self.b = np.zeros(num_classes)

    def _z(self, X: np.ndarray) -> np.ndarray:
        return (X - self.lo) / self.scale

    def fit(self, X: np.ndarray, y: np.ndarray, warm: bool = False, iters: int | None = None) -> "SoftmaxRegression":
        """Train on ``(X, y)`` with labels in ``0..K-1``: from scratch, or from the current
        weights when ``warm`` (rounds of active learning only add a few rows)."""
        Z, Y = self._z(X), np.eye(self.K)[y]
        if not warm:
            self.W = np.zeros((Z.shape[1], self.K))
            self.b = np.zeros(self.K)
        opt = _Adam([self.W, self.b], lr=0.05)
        n = len(Z)
        for _ in range(self.iters if iters is None else iters):
            G = (softmax(Z @ self.W + self.b) - Y) / n
            opt.step([Z.T @ G + self.l2 * self.W, G.sum(0)])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self._z(X) @ self.W + self.b)

    def grad_class_prob(self, X: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """(n, d) gradient of ``p[cls_i]`` with respect to each input ``x_i``."""
        P = self.predict_proba(X)
        pc = P[np.arange(len(X)), cls][:, None]
        g = pc * (self.W[:, cls].T - P @ self.W.T)
        return g / self.scale

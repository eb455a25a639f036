"""Attacks: model extraction and query-based adversarial search, run closed-loop.

Every attack is a function ``attack(ctx)`` that queries the victim only through
``ctx.oracle`` (a callable: inputs -> probabilities, exactly what the API answers).
The oracle records each query in order and raises :class:`BudgetExhausted` once the
attacker's budget is spent, so the recorded sequence *is* the attacker's traffic,
answers included, by construction. Attacks know the feature box (Tramèr's assumption),
the number of classes and their own attacker pool; nothing else about the victim.

Constants follow the papers where they give them (λ = 0.1 of the range for JbDA,
ε = 0.2 of the range for SimBA), scaled per feature by the box. ``run_attack``'s
``params`` change them (the attack sweep of bench/detection); without params every
attack is exactly as described here.

=============  ===========================================================================
uniform        Tramèr et al. 2016: uniform random points in the feature box
linesearch     Tramèr's line search: two attacker-pool points of different predicted
               classes, then 12 bisection steps, each query the midpoint of the current
               segment; sequences converge on the decision boundary
jbda           Papernot et al. 2017: 10 seeds per class from the attacker pool; each round a
               softmax-regression substitute is retrained on the victim's labels and every
               point x of the set spawns x + λ·sign(∇ₓ p_{O(x)}), λ = 0.1·range (sign
               flipped every τ = 3 rounds), clipped to the box; the set doubles per round
trnd           PRADA's T-RND (Juuti et al. 2019): as jbda, but each step goes toward a
               random target class t ≠ O(x): x + λ·sign(∇ₓ p_t)
knockoff       Knockoff Nets 2019: natural data from another distribution (see
               :meth:`Dataset.off_distribution`), sent in random order
activethief    ActiveThief 2020: from an off-distribution natural pool, a random 10 % first,
               then rounds picking the pool samples of highest substitute entropy
hopskipjump    HopSkipJump-like: from a start point, bisect toward a point of another class
               to reach the boundary, then rounds of 25-100 tiny random perturbations
               around the boundary point (gradient-direction estimate), a step, and a
               new bisection; a new start point every 10 rounds
simba          SimBA (Guo et al. 2019): add ±ε (0.2·range) along random coordinate
               directions of one input, keep a step when the victim's probability of the
               original class drops; next input once misclassified or out of directions
interleaved    jbda, with a natural attacker-pool query after every attack query (1:1;
               ``params["interleave"]`` sets 1:k, for any attack)
sybil          one jbda run spread round-robin over 10 client ids (one group)
slow           jbda at a low rate: one query every ~5 minutes, spanning days of event time
=============  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from exporter.sim.datasets import Dataset
from exporter.sim.victim import SoftmaxRegression

Answer = Callable[[np.ndarray], np.ndarray]
NewPoints = Callable[[SoftmaxRegression, np.ndarray, np.ndarray, int], np.ndarray]  # (substitute, set, its labels, round) -> new points


class BudgetExhausted(Exception):
    """The attacker has spent its query budget; raised by :class:`Oracle`."""


class Oracle:
    """The prediction API as an attacker sees it: records queries, enforces the budget."""

    def __init__(self, answer: Answer, budget: int) -> None:
        self.answer = answer
        self.budget = int(budget)
        self._parts: list[np.ndarray] = []
        self.used = 0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        room = self.budget - self.used
        if room <= 0:
            raise BudgetExhausted
        sent = X[:room]
        self._parts.append(sent.copy())
        self.used += len(sent)
        probs = self.answer(sent)
        if len(sent) < len(X):
            raise BudgetExhausted
        return probs

    @property
    def queries(self) -> np.ndarray:
        """Every query sent so far, in order, (used, d)."""
        return np.concatenate(self._parts) if self._parts else np.zeros((0, 0))


class Interleave:
    """An oracle wrapper that follows each attack query with ``ratio`` natural queries (1:ratio)."""

    def __init__(self, inner: Oracle, natural: Callable[[int], np.ndarray], ratio: int = 1) -> None:
        if ratio < 1:
            raise ValueError("the interleave ratio must be >= 1")
        self.inner = inner
        self.natural = natural
        self.ratio = int(ratio)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        step = self.ratio + 1
        mixed = np.empty((step * len(X), X.shape[1]))
        attack = np.zeros(len(mixed), dtype=bool)
        attack[0::step] = True
        mixed[attack] = X
        mixed[~attack] = self.natural(self.ratio * len(X))
        return self.inner(mixed)[0::step]


@dataclass
class AttackContext:
    """What an attack may use: its oracle, its randomness and what it knows of the data."""

    oracle: Callable[[np.ndarray], np.ndarray]
    rng: np.random.Generator
    dataset: Dataset
    budget: int
    params: dict[str, float] = field(default_factory=dict)


# -- helpers ------------------------------------------------------------------------
def _seeds(ctx: AttackContext, per_class: int = 10) -> np.ndarray:
    """Up to ``per_class`` attacker-pool rows of each (true) class: Papernot's seed set.

    With ``params["natural_seeds"]``, ``per_class`` natural samples of each class drawn from
    the attacker pool instead (:meth:`Dataset.natural`): every attacker then has seeds of
    its own, as independent attackers with their own data do (the pools of the small
    datasets hold fewer rows than two attackers would pick)."""
    ds, rng = ctx.dataset, ctx.rng
    if ctx.params.get("natural_seeds"):
        classes = np.repeat(np.arange(ds.num_classes), per_class)
        X, _ = ds.natural(rng, classes.size, role="attacker", classes=classes)
        return ds.round(X[rng.permutation(classes.size)])
    rows = []
    for c in range(ds.num_classes):
        members = np.flatnonzero(ds.y_attacker == c)
        rows.append(rng.permutation(members)[:per_class])
    idx = rng.permutation(np.concatenate(rows))
    return ds.X_attacker[idx]


def _substitute(ds: Dataset) -> SoftmaxRegression:
    return SoftmaxRegression(ds.lo, ds.hi, ds.num_classes)


def _jacobian_augmentation(ctx: AttackContext, targeted: bool) -> None:
    """JbDA (``targeted=False``) and T-RND (``targeted=True``) share the round structure.

    ``ctx.params`` (the attack sweep of bench/detection): ``step`` λ as a fraction of each
    feature's range (0.1), ``seeds`` per class (10), ``rounds`` before the attack starts
    over from fresh seeds (0: never), ``targets`` (T-RND only: new points per point and
    round, each toward its own random class; 1) and ``tau`` (JbDA's sign period, 3).
    """
    ds, rng = ctx.dataset, ctx.rng
    lam = float(ctx.params.get("step", 0.1)) * ds.span
    tau = int(ctx.params.get("tau", 3))
    targets = int(ctx.params.get("targets", 1))

    def new_points(sub: SoftmaxRegression, S: np.ndarray, labels: np.ndarray, rho: int) -> np.ndarray:
        if targeted:
            src = S if targets == 1 else np.repeat(S, targets, axis=0)
            src_labels = labels if targets == 1 else np.repeat(labels, targets)
            target = (src_labels + rng.integers(1, ds.num_classes, len(src))) % ds.num_classes
            return ds.clip(src + lam * np.sign(sub.grad_class_prob(src, target)))
        sign = -1.0 if (rho // tau) % 2 else 1.0
        return ds.clip(S + sign * lam * np.sign(sub.grad_class_prob(S, labels)))

    _augmentation_rounds(ctx, _seeds(ctx, int(ctx.params.get("seeds", 10))), new_points, int(ctx.params.get("rounds", 0)))


def _augmentation_rounds(ctx: AttackContext, S: np.ndarray, new_points: NewPoints, rounds: int = 0) -> None:
    """The round loop of the augmentation attacks: ask the seeds ``S``, then each round fit a
    substitute to every answer so far, make new points from it and ask them; the set grows by
    what each round made. Ends after ``rounds`` rounds (0: at the budget)."""
    labels = ctx.oracle(S).argmax(axis=1)
    rho = 0
    while not rounds or rho < rounds:
        new = new_points(_substitute(ctx.dataset).fit(S, labels), S, labels, rho)
        S = np.concatenate([S, new])
        labels = np.concatenate([labels, ctx.oracle(new).argmax(axis=1)])
        rho += 1


def augmentation_parents(n: int, seeds: int) -> np.ndarray:
    """The query each of the first ``n`` queries of an augmentation run was made from (-1: a seed).

    :func:`_augmentation_rounds` asks its ``seeds`` first, then each round one new point per
    point of the set, in the set's order; so query ``q`` of the round that starts at set size
    ``s`` (``s <= q < 2s``) was made from query ``q - s``. This holds for JbDA, for T-RND with
    one target per point, and for :func:`coordinated_augmentation`. The group benchmark uses it
    to tell whether a split's members make points from each other's
    (``bench/detection/parents.py``)."""
    if seeds < 1:
        raise ValueError("an augmentation run starts from at least one seed")
    q = np.arange(n, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    s = seeds
    while s < n:
        rnd = slice(s, min(2 * s, n))
        parent[rnd] = q[rnd] - s
        s *= 2
    return parent


# -- attacks --------------------------------------------------------------------------
def uniform(ctx: AttackContext) -> None:
    ds = ctx.dataset
    while True:
        ctx.oracle(ctx.rng.uniform(ds.lo, ds.hi, (100, ds.dim)))


def linesearch(ctx: AttackContext) -> None:
    ds, rng = ctx.dataset, ctx.rng
    steps = int(ctx.params.get("steps", 12))
    while True:
        i = int(rng.integers(0, len(ds.X_attacker)))
        others = np.flatnonzero(ds.y_attacker != ds.y_attacker[i])
        j = int(others[rng.integers(0, others.size)]) if others.size else int(rng.integers(0, len(ds.X_attacker)))
        a, b = ds.X_attacker[i].copy(), ds.X_attacker[j].copy()
        ca, cb = ctx.oracle(np.stack([a, b])).argmax(axis=1)
        if ca == cb:
            continue
        for _ in range(steps):
            m = (a + b) / 2
            if ctx.oracle(m)[0].argmax() == ca:
                a = m
            else:
                b = m


def jbda(ctx: AttackContext) -> None:
    _jacobian_augmentation(ctx, targeted=False)


def trnd(ctx: AttackContext) -> None:
    _jacobian_augmentation(ctx, targeted=True)


def knockoff(ctx: AttackContext) -> None:
    while True:
        ctx.oracle(ctx.dataset.off_distribution(ctx.rng, ctx.budget))


def activethief(ctx: AttackContext) -> None:
    ds, rng = ctx.dataset, ctx.rng
    pool = ds.off_distribution(rng, max(2 * ctx.budget, 2000))
    k = max(25, ctx.budget // 10)
    order = rng.permutation(len(pool))
    picked = order[:k]
    X = pool[picked]
    labels = ctx.oracle(X).argmax(axis=1)
    left = np.ones(len(pool), dtype=bool)
    left[picked] = False
    sub = _substitute(ds).fit(X, labels)
    while left.any():
        cand = np.flatnonzero(left)
        P = sub.predict_proba(pool[cand])
        entropy = -(P * np.log(P + 1e-12)).sum(axis=1)
        top = cand[np.argsort(-entropy, kind="stable")[:k]]
        left[top] = False
        X = np.concatenate([X, pool[top]])
        labels = np.concatenate([labels, ctx.oracle(pool[top]).argmax(axis=1)])
        sub.fit(X, labels, warm=True, iters=50)
    raise BudgetExhausted  # pool used up: the attack ends early (never with the default pool size)


def _bisect(ctx: AttackContext, inside: np.ndarray, outside: np.ndarray, cls: int, steps: int) -> np.ndarray:
    """Bisect the segment from ``inside`` (class ``cls``) to ``outside``; returns the outside end."""
    for _ in range(steps):
        m = (inside + outside) / 2
        if ctx.oracle(m)[0].argmax() == cls:
            inside = m
        else:
            outside = m
    return outside


def hopskipjump(ctx: AttackContext) -> None:
    """Geometry is done in box-normalized units (each feature's range = 1), as HSJ works on
    [0, 1] images; probes are isotropic there, so no feature's scale dominates."""
    ds, rng = ctx.dataset, ctx.rng
    live = ds.span > 0
    scale = np.where(live, ds.span, 0.0)
    rounds = int(ctx.params.get("rounds", 10))
    d_live = max(int(live.sum()), 1)
    while True:
        x0 = ds.X_attacker[int(rng.integers(0, len(ds.X_attacker)))]
        c = int(ctx.oracle(x0)[0].argmax())
        start = None
        for j in rng.permutation(len(ds.X_attacker))[:10]:
            if ds.y_attacker[j] != c and int(ctx.oracle(ds.X_attacker[j])[0].argmax()) != c:
                start = ds.X_attacker[j]
                break
        if start is None:
            continue
        xb = _bisect(ctx, x0, start, c, 10)
        for t in range(1, rounds + 1):
            dist = float(np.linalg.norm((xb - x0)[live] / ds.span[live]))  # in unit-box coordinates
            B = int(min(25 * np.sqrt(t), 100))
            delta = rng.normal(0.0, 1.0, (B, ds.dim)) * live
            delta /= np.linalg.norm(delta, axis=1, keepdims=True) + 1e-12
            radius = max(dist / d_live, 1e-3)
            probes = ds.clip(xb + radius * delta * scale)
            phi = np.where(ctx.oracle(probes).argmax(axis=1) != c, 1.0, -1.0)
            if abs(phi.mean()) < 1:
                g = ((phi - phi.mean())[:, None] * delta).mean(axis=0)
            else:
                g = phi.mean() * delta.mean(axis=0)
            norm = float(np.linalg.norm(g))
            if norm == 0.0:
                break
            u = g / norm * scale  # back to input units
            step = dist / np.sqrt(t)
            cand = ds.clip(xb + step * u)
            for _ in range(10):
                if int(ctx.oracle(cand)[0].argmax()) != c:
                    break
                step /= 2
                cand = ds.clip(xb + step * u)
            else:
                break
            xb = _bisect(ctx, x0, cand, c, 8)


def simba(ctx: AttackContext) -> None:
    ds, rng = ctx.dataset, ctx.rng
    eps = float(ctx.params.get("epsilon", 0.2)) * ds.span
    live = np.flatnonzero(ds.span > 0)
    while True:
        x = ds.X_attacker[int(rng.integers(0, len(ds.X_attacker)))].copy()
        p = ctx.oracle(x)[0]
        c = int(p.argmax())
        for q in rng.permutation(live):
            for s in (-1.0, 1.0):
                cand = x.copy()
                cand[q] = np.clip(cand[q] + s * eps[q], ds.lo[q], ds.hi[q])
                if cand[q] == x[q]:
                    continue  # clipped back onto the input: nothing to ask
                pc = ctx.oracle(cand)[0]
                if pc[c] < p[c]:
                    x, p = cand, pc
                    break
            if int(p.argmax()) != c:
                break


@dataclass(frozen=True)
class AttackSpec:
    """A named attack: its function, how its queries are paced, and how they are split."""

    name: str
    run: Callable[[AttackContext], None]
    summary: str
    timing: str = "scripted"  # "scripted": ~1 query/s; "slow": one every ~5 minutes
    sybil: int = 0  # > 0: the queries are spread round-robin over this many client ids
    interleave: bool = False  # 1:1 natural queries from the attacker pool


ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in (
        AttackSpec("uniform", uniform, "Tramèr: uniform random points in the feature box"),
        AttackSpec("linesearch", linesearch, "Tramèr line search: bisection between points of different classes"),
        AttackSpec("jbda", jbda, "Papernot JbDA: x + λ·sign(∇ substitute), set doubles per round"),
        AttackSpec("trnd", trnd, "PRADA T-RND: targeted steps toward random classes from seeds"),
        AttackSpec("knockoff", knockoff, "Knockoff Nets: natural off-distribution data"),
        AttackSpec("activethief", activethief, "ActiveThief: most-uncertain off-distribution samples, in rounds"),
        AttackSpec("hopskipjump", hopskipjump, "HopSkipJump-like boundary search with many tiny perturbations"),
        AttackSpec("simba", simba, "SimBA: ±ε along random coordinates of one input while p(true class) drops"),
        AttackSpec("interleaved", jbda, "JbDA interleaved 1:1 with natural attacker-pool queries", interleave=True),
        AttackSpec("sybil", jbda, "one JbDA run spread round-robin over 10 client ids (a group)", sybil=10),
        AttackSpec("slow", jbda, "JbDA at one query every ~5 minutes, over days", timing="slow"),
    )
}


def coordinated_augmentation(dataset: Dataset, answer: Answer, budget: int, rng: np.random.Generator, kinds: list[str],
                             params: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One augmentation set grown by several clients, each with its own rule: a Sybil group mixing attack types.

    As :func:`_jacobian_augmentation`, but the new points of each round are dealt
    round-robin to the ``len(kinds)`` members (seeds included), and each point is made by
    its member's rule: ``"jbda"`` (a step along the sign of the gradient of the point's own
    class, its sign flipped every τ rounds) or ``"trnd"`` (toward a random other class). The
    members share one substitute trained on every answer. Returns the queries in order and
    the member that sent each.
    """
    params = dict(params or {})
    oracle = Oracle(answer, budget)
    ctx = AttackContext(oracle, rng, dataset, budget, params)
    ds = dataset
    lam = float(params.get("step", 0.1)) * ds.span
    tau = int(params.get("tau", 3))
    size = len(kinds)
    owners: list[np.ndarray] = []
    sent = 0

    def deal(n: int) -> np.ndarray:
        nonlocal sent
        out = (sent + np.arange(n)) % size
        sent += n
        return out

    def new_points(sub: SoftmaxRegression, S: np.ndarray, labels: np.ndarray, rho: int) -> np.ndarray:
        who = deal(len(S))
        owners.append(who)
        trnd = np.array([kinds[w] == "trnd" for w in who])
        sign = -1.0 if (rho // tau) % 2 else 1.0
        target = np.where(trnd, (labels + rng.integers(1, ds.num_classes, len(S))) % ds.num_classes, labels)
        grad = np.sign(sub.grad_class_prob(S, target))
        return ds.clip(S + np.where(trnd[:, None], 1.0, sign) * lam * grad)

    try:
        S = _seeds(ctx, int(params.get("seeds", 10)))
        owners.append(deal(len(S)))
        _augmentation_rounds(ctx, S, new_points)
    except BudgetExhausted:
        pass
    X = oracle.queries
    return X, np.concatenate(owners)[: len(X)]


def run_attack(name: str, dataset: Dataset, answer: Answer, budget: int, rng: np.random.Generator, params: dict[str, float] | None = None) -> np.ndarray:
    """Run attack ``name`` against ``answer`` until ``budget`` queries; returns them in order.

    ``params`` tune the attack (see each attack; JbDA and T-RND in
    :func:`_jacobian_augmentation`); ``interleave`` (any attack) follows each attack query
    with that many natural attacker-pool queries (``interleaved``: 1 by default), which
    count toward the budget."""
    spec = ATTACKS[name]
    oracle = Oracle(answer, budget)
    query: Callable[[np.ndarray], np.ndarray] = oracle
    ratio = int((params or {}).get("interleave", 1 if spec.interleave else 0))  # natural queries per attack query
    if ratio > 0:
        query = Interleave(oracle, lambda m: dataset.natural(rng, m, role="attacker")[0], ratio)
    ctx = AttackContext(query, rng, dataset, budget, dict(params or {}))
    stalls = 0
    while oracle.used < budget:
        before = oracle.used
        try:
            spec.run(ctx)
        except BudgetExhausted:
            break
        stalls = stalls + 1 if oracle.used == before else 0
        if stalls > 3:
            raise RuntimeError(f"attack {name} makes no progress")
    return oracle.queries

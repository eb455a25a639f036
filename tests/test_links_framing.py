"""``links``: framing honest clients with a step designed from public data alone.

On integer features, many features are predictable: digits' border pixels are nearly
always 0, and the most spread pixels are mostly 0 or 16. An attacker who knows only the
distribution of a public dataset can plant pairs (Q, P = Q + S) whose step S moves just
those features, by sizes that take P to their common values. A natural record R then
"continues" P's step on every feature the two move, and the features only R moves were
not looked at: honest clients that send such records were linked to the attacker,
without it knowing which records they send or when, and joined its group once its own
queries continued theirs. A change now continues a step only if it moves mostly the
features the step moved (``overlap``).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn import datasets  # noqa: E402

from exporter.detectors.base import Batch, Block, ModelContext, Reference  # noqa: E402
from exporter.detectors.fingerprint import client_key  # noqa: E402
from exporter.detectors.kit import Scaling  # noqa: E402
from exporter.detectors.links import LinksDetector, LinksParams  # noqa: E402
from exporter.events import Event  # noqa: E402
from exporter.groups import GroupBook  # noqa: E402
from tests.synthetic import savez_roundtrip  # noqa: E402


def _design(public: np.ndarray, det: LinksDetector, features: int = 27) -> tuple[np.ndarray, np.ndarray]:
    """(P, S) on the features where a public record most often lies a step S from P (|r - P| = S:
    the two most common values, or the most common one), the probe features included."""
    floor_px = float(det._floor[0] / det._inv[0])
    P, S, cover = np.zeros(public.shape[1]), np.zeros(public.shape[1]), np.zeros(public.shape[1])
    for f in det._cols.tolist():
        values, counts = np.unique(public[:, f], return_counts=True)
        order = np.argsort(-counts)
        share = counts[order] / public.shape[0]
        v1 = values[order[0]]
        P[f], S[f], cover[f] = v1 - 2 * floor_px, 2 * floor_px, share[0]
        if len(order) > 1 and abs(values[order[1]] - v1) >= 2 * floor_px and share[0] + share[1] > cover[f]:
            v2 = values[order[1]]
            P[f], S[f], cover[f] = (v1 + v2) / 2, abs(v2 - v1) / 2, share[0] + share[1]
    probes = det._cols[: det._probe]
    rest = [f for f in np.argsort(-cover).tolist() if f not in set(probes.tolist())]
    design = np.zeros(public.shape[1], dtype=bool)
    design[probes] = True
    design[rest[: features - probes.size]] = True
    return np.where(design, P, 0.0), np.where(design, S, 0.0)


def _frame(overlap: float) -> tuple[int, dict[str, set[str]]]:
    """Mallory plants 200 pairs, then, every tenth block of the honest client's, sends each P with the
    step's features stepped on once more (which continues whatever record continued P). The
    honest client sends 300 records of the other half of digits, in random order, among
    background clients. Returns the honest client's queries linked to mallory, and the groups."""
    x = datasets.load_digits().data.astype(float)
    perm = np.random.default_rng(0).permutation(len(x))
    public, private = x[perm[:900]], x[perm[900:]]
    scaling = Scaling.fit(public)
    det = LinksDetector(LinksParams(overlap=overlap), ModelContext("m", "tabular", 64, 10, scaling, ("links",)))
    det.load_reference(savez_roundtrip(det.fit(Reference(public, None, scaling))))
    P0, S0 = _design(public, det)
    design = S0 != 0
    rng = np.random.default_rng(1)
    states: dict[str, dict] = {}
    queries: dict[str, int] = {}
    book = GroupBook(queries=lambda c, m: queries.get(c, 0))
    groups = book.model("m", det.params)
    framed = 0

    def block(events: list[Event]) -> None:
        nonlocal framed
        b = Block("m", events)
        det.prepare(b)
        for c in sorted({e.client for e in events}):
            rows = np.array([i for i, e in enumerate(events) if e.client == c])
            queries[c] = queries.get(c, 0) + rows.size
            det.update(states.setdefault(c, det.init_state()), Batch(c, "m", [events[i] for i in rows], b, rows))
        linked, parents = b.prepared["links"][1], b.prepared["links"][2]
        framed += sum(int(e.client == "honest" and ok and client_key("mallory") in p) for e, ok, p in zip(events, linked, parents))
        groups.observe(b, np.zeros(len(events), dtype=bool))

    def background(t: float, n: int) -> list[Event]:
        return [Event(f"bg-{rng.integers(500)}", "m", t + 0.001 * i, "tabular", vector=v) for i, v in enumerate(public[rng.integers(0, 900, n)])]

    P = np.where(design, P0, public[rng.integers(0, 900, 200)])  # the other features: public records
    t = 1000.0
    block([Event("mallory", "m", t + 0.001 * i, "tabular", vector=v) for i, v in enumerate(np.concatenate([P - S0, P]))])
    block(background(t + 10, 256))  # completes the chunks: the planted steps become usable
    t += 20
    edge = design.copy()
    edge[det._cols[: det._probe]] = False
    order = rng.permutation(len(private))[:300]
    for j in range(0, 300, 10):
        block([Event("honest", "m", t + 0.01 * i, "tabular", vector=v) for i, v in enumerate(private[order[j : j + 10]])] + background(t + 0.005, 30))
        t += 10
        if j % 100 == 90:
            y = np.where(edge, -P0, P)
            y[np.arange(len(y)), rng.integers(0, 64, len(y))] += 0.25 * (j // 100 + 1)  # new points each time
            block([Event("mallory", "m", t + 0.001 * i, "tabular", vector=v) for i, v in enumerate(y)])
            block(background(t + 5, 256))
            t += 10
    book.summaries()
    return framed, {gid: {groups.clients[k].name for k in g.joined} for gid, g in groups.groups.items()}


def test_a_step_designed_from_public_data_frames_no_honest_client() -> None:
    framed, groups = _frame(overlap=LinksParams().overlap)
    assert framed == 0 and not any("honest" in members for members in groups.values())


def test_without_the_overlap_rule_the_designed_step_frames_the_honest_client() -> None:
    """The attack of the test above, with the rule off: the honest client is linked to mallory
    and joins its group (the test above can fail)."""
    framed, groups = _frame(overlap=0.0)
    assert framed >= 20 and any({"honest", "mallory"} <= members for members in groups.values())

"""Measure what one large group costs the groups' bookkeeping (exporter.groups), as it grows and as it leaves.

Clients control how many keys they use, and each key needs only ``group_min_links``
linked queries to join a group. This feeds one model's groups the links of ``N`` keys,
each joining through links with an earlier key (a star around the first key, or a chain):
``group_min_links`` made by the new key's queries (which make it a possible member), and
one by the earlier key's, since an edge joins two clients only when each made one of its
links. One event per block, as in live ingestion. In a star, the first key's links back to
every other key push its edges out of its ``max_peers`` (space-saving), and each such push
marks the group for a re-split. It times:

* the joins, per linked event;
* one read of every group (what ``/metrics`` and the groups API do);
* the eviction of one member (its group is re-split at the read that follows);
* members evicted at every block, by new client ids once the tracked clients are full
  (µs per block; a chain of ``N`` keys);
* the expiry of the whole group (one periodic sweep);
* and, apart from any group, the steady state of a long run: ``--tracked`` clients whose
  edges age out one after another, so that expired edges are always due; µs per block;
* with ``--memory``, the memory of one model's group records when every one of
  ``max_tracked_clients`` (10,000) clients holds ``max_peers`` edges: what ``max_peers``
  costs at most (tracemalloc, MiB).

All of it runs under the pipeline's lock, so a cost that grows with ``N`` per event is a
stall of ingestion and of ``/metrics``. Compare the per-event figures across ``N``:
they should stay flat.

    python3 bench/group_cost.py [--sizes 250,500,1000,2000] [--shape star|chain] [--tracked 10000] [--memory 8,16]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's exporter first, also where the venv installed another
from exporter.detectors.base import Block  # noqa: E402
from exporter.detectors.fingerprint import client_key  # noqa: E402
from exporter.detectors.links import LinksParams  # noqa: E402
from exporter.events import Event  # noqa: E402
from exporter.groups import GroupBook, ModelGroups  # noqa: E402


def link(groups: ModelGroups, queries: dict[str, int], child: str, parent: str, ts: float) -> None:
    """One event of ``child``, linked to ``parent``, as a block of its own."""
    queries[child] = queries.get(child, 0) + 1
    block = Block("m", [Event(child, "m", ts, "tabular", vector=np.zeros(2))])
    keys = np.zeros((1, 2), dtype=np.uint64)
    keys[0, 0] = client_key(parent)
    block.prepared["links"] = (np.ones(1, dtype=bool), np.ones(1, dtype=bool), keys)
    groups.observe(block, np.zeros(1, dtype=bool))


def grow(groups: ModelGroups, queries: dict[str, int], n: int, shape: str) -> float:
    """Make one group of ``n`` keys, k0 to k(n-1); returns the event time of its last link."""
    ts = 0.0
    need = groups.params.group_min_links
    for i in range(1, n):  # key i joins through key k0 (star) or k(i-1) (chain)
        parent = "k0" if shape == "star" else f"k{i - 1}"
        for child, to in [(f"k{i}", parent)] * need + [(parent, f"k{i}")]:  # (need own links make it a possible member)
            link(groups, queries, child, to, ts)
            ts += 0.01
    return ts


def measure(n: int, shape: str) -> dict[str, float]:
    params = LinksParams()
    queries: dict[str, int] = {}
    book = GroupBook(queries=lambda c, m: queries.get(c, 0))
    groups = book.model("m", params)
    started = time.perf_counter()
    ts = grow(groups, queries, n, shape)
    grow_s = time.perf_counter() - started
    events = sum(queries.values())
    sizes = sorted((len(g.joined) for g in groups.groups.values()), reverse=True)
    t = time.perf_counter()
    book.summaries()
    read = time.perf_counter() - t
    t = time.perf_counter()
    book.forget(f"k{n // 2}")
    book.summaries()
    evict = time.perf_counter() - t
    t = time.perf_counter()
    book.expire(ts + params.ttl_seconds + 1.0)
    expire = time.perf_counter() - t
    return {"members": float(sizes[0] if sizes else 0), "events": float(events), "grow_us_per_event": 1e6 * grow_s / events,
            "read_ms": 1e3 * read, "evict_ms": 1e3 * evict, "expire_ms": 1e3 * expire, "groups_left": float(len(groups.groups)),
            "churn_us_per_block": churn(n)}


def churn(n: int, blocks: int = 200) -> float:
    """µs per one-event block while every block evicts members of a chain of ``n`` keys: the
    tracked clients are full (``max_tracked_clients`` = n), and each block links two new
    client ids, which push the two least recently linked keys out. A chain stays one group
    when its oldest keys leave, so every block leaves a large group to re-split."""
    params = LinksParams(max_tracked_clients=n)
    queries: dict[str, int] = {}
    groups = GroupBook(queries=lambda c, m: queries.get(c, 0)).model("m", params)
    ts = grow(groups, queries, n, "chain")
    started = time.perf_counter()
    for j in range(blocks):
        ts += 0.01
        link(groups, queries, f"x{j}", f"y{j}", ts)
    return 1e6 * (time.perf_counter() - started) / blocks


def steady(tracked: int, blocks: int = 2000) -> float:
    """µs per one-event block once edges age out continuously: each of ``tracked`` clients linked
    once, one link per TTL / ``tracked`` of event time."""
    params = LinksParams(max_tracked_clients=tracked)
    queries: dict[str, int] = {}
    groups = GroupBook(queries=lambda c, m: queries.get(c, 0)).model("m", params)
    step = params.ttl_seconds / tracked
    for i in range(tracked):
        link(groups, queries, f"c{i}", f"c{(i + 1) % tracked}", i * step)
    started = time.perf_counter()
    for i in range(blocks):
        link(groups, queries, f"c{i}", f"c{(i + 7) % tracked}", (tracked + i) * step)
    return 1e6 * (time.perf_counter() - started) / blocks


def full_tables(peers: int) -> tuple[float, float]:
    """MiB that one model's group records take once each of ``max_tracked_clients`` clients
    holds ``peers`` edges (its links to the next ``peers / 2`` clients, and theirs back: each
    edge has a view at both ends), and the edges held per client. No group forms: every edge
    has one link."""
    params = LinksParams(max_peers=peers)
    n, half = params.max_tracked_clients, max(1, peers // 2)
    queries = {f"c{i}": half for i in range(n)}  # (the feed's own counts, allocated before tracing)
    tracemalloc.start()
    groups = GroupBook(queries=lambda c, m: queries.get(c, 0)).model("m", params)
    for i in range(n):
        for j in range(1, half + 1):
            link(groups, queries, f"c{i}", f"c{(i + j) % n}", float(i))
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return used / 2**20, sum(len(c.peers) for c in groups.clients.values()) / max(len(groups.clients), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250,500,1000,2000", help="keys in the group, comma-separated")
    ap.add_argument("--shape", choices=["star", "chain"], default="star", help="each key continues the first key's queries, or the previous key's")
    ap.add_argument("--tracked", type=int, default=10000, help="tracked clients of the steady-state measure (0: skip it)")
    ap.add_argument("--memory", default="", help="max_peers values (comma-separated) to measure full group records at (default: none)")
    args = ap.parse_args()
    print(f"`bench/group_cost.py --sizes {args.sizes} --shape {args.shape} --tracked {args.tracked} --memory {args.memory}`\n")
    print("| keys | largest group | linked events | µs per linked event, growing | one read, ms | evict one member + read, ms | expire all, ms "
          "| µs per block, evicting members (chain) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n, args.shape)
        print(f"| {n:,} | {int(r['members']):,} | {int(r['events']):,} | {r['grow_us_per_event']:.0f} | {r['read_ms']:.1f} | {r['evict_ms']:.1f} "
              f"| {r['expire_ms']:.1f} | {r['churn_us_per_block']:.0f} |")
    if args.tracked:
        print(f"\nSteady state, {args.tracked:,} tracked clients whose edges age out one after another: {steady(args.tracked):.0f} µs per one-event block")
    if args.memory:
        print("\n| `max_peers` | edges per client | group records of one model, MiB |\n|---:|---:|---:|")
        for peers in (int(s) for s in args.memory.split(",")):
            mib, held = full_tables(peers)
            print(f"| {peers} | {held:.1f} | {mib:.1f} |")


if __name__ == "__main__":
    main()

"""Groups: clients linked by coordinated exploration, named as one attacker (a Sybil split).

The ``links`` detector (:mod:`exporter.detectors.links`) finds, query by query, the other
clients whose exploration a query continues (it repeats the step of another client's
query) or follows (it makes, sign for sign, the step another client made recently). This
stage, run after the detectors on each block in time order, turns those directed links
into groups:

* **Edges.** Every link adds one to the edge between the two clients (either direction),
  stamped with its event time (the latest, if events come late). Each client keeps its
  ``max_peers`` heaviest edges (a space-saving count: an edge that takes a lighter one's
  place carries on its count, so the two clients' views of an edge can differ, and the
  larger is the edge's count), and at most ``max_tracked_clients`` clients are remembered
  per model (least recently linked forgotten first).
* **Who can be a member.** Only a client whose *own* queries were linked: the ``links``
  detector flagged it (the share of its recent queries linked to other clients reached the
  detector's calibrated threshold), or at least ``group_min_links`` of its queries were
  linked within ``ttl_seconds``. The evidence is directed (the client whose query continued
  or followed another's is the explorer), so an attacker who copies or steps away from an
  honest client's queries makes links of its own, never of the honest client, who cannot join.
* **Groups.** Two flagged clients with at least ``group_min_links`` links between them, each
  having made at least one of them, are in one group, and groups are the connected
  components of such edges. An edge whose links were all made by one client is that client
  exploring from the other's queries: an honest client that chance links elsewhere made a
  possible member does not join the group of attackers that step away from its queries.
  A group is named ``g<n>`` when it forms; it keeps its id while it has members; when two groups merge, the
  older keeps its id; when expiry splits a group, the part with the earliest member keeps
  it. A group with fewer than two members is dissolved and its id never reused.
* **Expiry.** An edge expires ``ttl_seconds`` (the detector's, event time) after its last
  link, a client's flag as long after the last link that found it flagged; a member
  without either leaves its group, and a group that lost an edge (expired, or pushed out of
  both views by space-saving) is re-split. Blocks check expiry at most ``SCANS_PER_TTL`` (64) times
  per TTL of event time, the periodic sweep every time; when a tracked client is evicted
  from the exporter's state it leaves its group at once.
* **Score and verdict.** A group's score is the share of its members' queries that were
  linked to another member (links inside the group / the members' queries on the model);
  the group is *flagged* while the score is at least the group threshold. A group can be
  flagged while none of its members is (the members' own verdicts are per client).
  ``monitaur-exporter calibrate`` sets the threshold from the groups that form by chance
  among benign calibration clients (:func:`group_threshold`), and says so in the profile.

Cost. Per link, O(``max_peers``) work, and a group's members' query count moves with a
cursor over the block's rows. A join or a merge counts only the links that cross into the
group, and a client that becomes a possible member looks for joins once; they read each
client's edges both ways: its own ``max_peers``, and the clients whose edges hold it, which
have no bound of their own (a merge walks the smaller group's members). Per block, O(block)
for that cursor, and the scores of the groups whose members sent queries. Members that
leave (expiry, eviction, release) mark their group for a re-split, which runs at the end
of a block (at most once per group and ``ttl_seconds / SCANS_PER_TTL`` of event time), at
the periodic sweep, or before a read, in O(members × ``max_peers``): so that no client, and
no number of clients, can make one event cost a search over all pairs of members, or a
walk over a large group at every block.
Memory per model: ``max_tracked_clients`` records of at most ``max_peers`` edges, the other
view of those edges, and the groups over them.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.detectors.fingerprint import client_key
from exporter.group_numbers import BLOCK, MAX_GROUP_NUMBER
from exporter.names import is_valid_name

if TYPE_CHECKING:
    from exporter.detectors.base import Batch, Block, Signals
    from exporter.detectors.links import LinksParams
    from exporter.group_numbers import NumberReservations
    from exporter.profile import Profile

log = logging.getLogger("monitaur.groups")

SOURCE = "links"  # the detector whose links make groups
HISTORY = 10_000  # dissolved groups' maxima kept for calibration, per model
# Blocks look for expired edges and flags at most this many times per TTL of event time (the
# periodic sweep always does): once edges age out one after another, every block would find
# one, and a scan visits every tracked client.
SCANS_PER_TTL = 64


@dataclass(frozen=True, slots=True)
class MemberSummary:
    """A member of a group, with its link strength."""

    client: str
    links: int  # links between this client and the other members (either way)
    queries: int  # the client's queries on the model
    strength: float  # links / queries (at most 1): how much of its traffic ties it to the group
    joined: float  # event time at which the client joined the group (or a group merged into it)


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """What the view, the report and the metrics show of a group."""

    group: str
    model: str
    members: tuple[MemberSummary, ...]  # strongest first
    score: float
    flagged: bool
    threshold: float
    links: int  # links between members
    created: float  # event time the group formed
    first_flagged: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "members": {m.client: {"links": m.links, "queries": m.queries, "strength": round(m.strength, 6), "joined": m.joined} for m in self.members},
            "score": round(self.score, 6),
            "flagged": self.flagged,
            "threshold": round(self.threshold, 6),
            "links": self.links,
            "created": self.created,
            "first_flagged": self.first_flagged,
        }


@dataclass(slots=True)
class _Edge:
    links: int
    last: float
    made: int = 0  # of ``links``, those made by the queries of the client that holds this view of the edge
    got: int = 0  # and those made by the peer's (the rest of ``links`` a space-saving replacement passed on)


@dataclass(slots=True)
class _Client:
    name: str | None  # None: known only by key, as another client's peer, until it sends a query of its own
    flagged_at: float | None = None  # event time of the last link that made or kept the client a possible member
    peers: dict[int, _Edge] = field(default_factory=dict)
    own: list[float] = field(default_factory=list)  # event times of its last ``group_min_links`` own links (as the explorer), oldest first


@dataclass(slots=True)
class _Group:
    gid: str
    number: int
    created: float
    joined: dict[int, float]  # member key -> event time it joined
    links: int = 0  # links between members, counted as they happen (a join or merge adds those that cross)
    queries: int = 0  # the members' queries up to the block cursor (ModelGroups._advance), during a block
    score: float = 0.0
    max_score: float = 0.0
    flagged: bool = False
    first_flagged: float | None = None
    next_split: float = -math.inf  # event time before which a block's end does not re-split it (ModelGroups.settle)


class ModelGroups:
    """The groups of one model (see the module docstring)."""

    def __init__(self, model: str, params: "LinksParams", threshold: float, new_number: Callable[[], int],
                 queries: Callable[[str], int]) -> None:
        self.model = model
        self.params = params
        self.threshold = threshold
        self._new_number = new_number
        self.clients: OrderedDict[int, _Client] = OrderedDict()  # LRU: least recently linked first
        self.groups: dict[str, _Group] = {}
        self.member_of: dict[int, str] = {}
        self.maxima: list[float] = []  # the maximum score of every dissolved group (calibration)
        self._queries = queries  # a client's queries on the model so far (a block's included once it is being observed)
        self._block_counts: dict[int, tuple[int, np.ndarray]] = {}  # key -> (queries before the block, its rows)
        self._names: dict[int, str] = {}  # key -> client id, for the clients of the block being processed
        self._row_keys: list[int] = []  # the block's client key per row
        self._cursor = -1  # rows of the block up to here are counted in every group's ``queries``
        self._touched: set[str] = set()  # groups whose members sent queries in the block so far
        self._listers: dict[int, set[int]] = {}  # key -> the clients whose peers hold it (the other view of each edge)
        self._dirty: set[str] = set()  # groups that lost members or edges since their last split (settle)
        self._oldest = math.inf  # no edge or flag is older than this (event time): expiry has nothing to do before
        self._next_scan = -math.inf  # event time before which a block does not scan for expired edges (_drop_stale)

    # -- per block ----------------------------------------------------------------------
    def observe(self, block: "Block", flagged: np.ndarray) -> None:
        """Fold the block's links (``block.prepared``) into edges and groups, in time order.

        ``flagged``: per event of the block, whether the links detector flagged its client
        right after it. The clients' query counts already include the block.
        """
        found = block.prepared.get(SOURCE)  # None when the detector failed on the block: its queries still count
        rows = np.flatnonzero(found[1]) if found is not None else np.zeros(0, dtype=np.int64)
        parents = found[2] if found is not None else None
        self._block_counts, self._touched, self._cursor = {}, set(), -1
        if rows.size or self.groups:
            self._count_block(block)
            for i in rows.tolist():
                ts = float(block.events[i].ts)
                child = client_key(block.events[i].client)
                self._link(child, block.events[i].client, [int(k) for k in parents[i] if k], ts, bool(flagged[i]), i)  # type: ignore[index]
            self._advance(len(block) - 1)
        if len(block):
            last = float(block.events[-1].ts)
            if last >= self._next_scan:  # a scan visits every tracked client: at most every SCANS_PER_TTL-th of the TTL
                self._next_scan = last + self.params.ttl_seconds / SCANS_PER_TTL
                self._drop_stale(last)
            self.settle(last)
            self._refresh(self._touched, last)  # the groups whose members sent queries (their scores moved)
        self._block_counts, self._names, self._row_keys, self._touched, self._cursor = {}, {}, [], set(), -1

    def _count_block(self, block: "Block") -> None:
        """Each tracked (or linking) client's queries before the block, its rows in the block, and each row's client."""
        keys = np.zeros(len(block), dtype=np.uint64)
        for name, rows in block.rows_by_client.items():
            key = client_key(name)
            self._names[key] = name
            self._block_counts[key] = (self._queries(name) - rows.size, rows)
            keys[rows] = key
        self._row_keys = keys.tolist()

    def _name(self, key: int) -> str | None:
        c = self.clients.get(key)
        return c.name if c is not None else None

    def _count(self, key: int, name: str | None, upto: int | None) -> int:
        """The client's queries up to block row ``upto`` (None: all so far)."""
        at = self._block_counts.get(key)
        if at is None or upto is None:
            return self._queries(name) if name is not None else 0
        before, rows = at
        return before + int(np.searchsorted(rows, upto, side="right"))

    def _advance(self, row: int) -> None:
        """Move the cursor to block row ``row``: each row passed adds one query to its client's group."""
        if row <= self._cursor:
            return
        if self.groups:
            member_of, groups, touched = self.member_of, self.groups, self._touched
            for k in self._row_keys[self._cursor + 1 : row + 1]:
                gid = member_of.get(k)
                if gid is not None:
                    groups[gid].queries += 1
                    touched.add(gid)
        self._cursor = row

    def _link(self, child: int, name: str, parents: list[int], ts: float, flagged: bool, row: int) -> None:
        self._advance(row)
        self._oldest = min(self._oldest, ts)
        me = self._client(child, name)
        own, need = me.own, self.params.group_min_links
        own.append(ts)
        del own[:-need]
        # Links of its own within one TTL: chance links spread over weeks never add up (other
        # clients' links to it keep its record alive however long).
        if flagged or (len(own) >= need and own[0] >= ts - self.params.ttl_seconds):
            first = me.flagged_at is None
            me.flagged_at = ts if first else max(me.flagged_at, ts)  # (a late event does not bring expiry forward)
        else:
            first = False
        for parent in parents:
            if parent == child:
                continue
            other = self.clients.get(parent)
            if other is None:
                other = self._client(parent, self._names.get(parent))
            g1, g2 = self.member_of.get(child), self.member_of.get(parent)
            before = self._weight(child, parent) if g1 is not None and g1 == g2 else 0
            for a, (ka, b), made in ((me, (child, parent), 1), (other, (parent, child), 0)):
                edge = a.peers.get(b)
                if edge is not None:
                    edge.links += 1
                    edge.last = max(edge.last, ts)
                    edge.made += made
                    edge.got += 1 - made
                    continue
                count = 1
                if len(a.peers) >= self.params.max_peers:  # space-saving: the newcomer takes the lightest edge's place and count
                    lightest = min(a.peers, key=lambda k: a.peers[k].links)
                    count += a.peers.pop(lightest).links
                    self._unlist(lightest, ka)
                    if (gid := self.member_of.get(ka)) is not None:  # the edge may have held its group together
                        self._dirty.add(gid)
                a.peers[b] = _Edge(count, ts, made, 1 - made)  # (only the total inherits the lightest's)
                self._listers.setdefault(b, set()).add(ka)
            if g1 is not None and g1 == g2:
                self.groups[g1].links += self._weight(child, parent) - before  # 1, unless a view was made anew
            elif self._joinable(child, parent):
                self._union(child, parent, ts)
        if first:  # newly flagged: its existing strong edges to flagged clients count now (in either client's view)
            for peer in self._neighbours(child):
                if self._joinable(child, peer):
                    self._union(child, peer, ts)
        self._refresh({g for k in (child, *parents) if (g := self.member_of.get(k)) is not None}, ts)

    def _unlist(self, key: int, lister: int) -> None:
        found = self._listers.get(key)
        if found is not None:
            found.discard(lister)
            if not found:
                del self._listers[key]

    def _neighbours(self, key: int) -> set[int]:
        """The clients with an edge to ``key``, in either view."""
        c = self.clients.get(key)
        return set(c.peers if c is not None else ()) | self._listers.get(key, set())

    def _client(self, key: int, name: str | None) -> _Client:
        c = self.clients.get(key)
        if c is None:
            c = self.clients[key] = _Client(name)
            while len(self.clients) > self.params.max_tracked_clients:
                old, _ = next(iter(self.clients.items()))
                self._drop(old)
        else:
            self.clients.move_to_end(key)
            if name is not None:
                c.name = name
        return c

    def _joinable(self, a: int, b: int) -> bool:
        """Whether the edge between ``a`` and ``b`` puts them in one group: both possible members,
        ``group_min_links`` links between them, and each made at least one of them. The last
        condition keeps a client out of a group that only links *to* it: an attacker whose
        queries continue an honest client's makes every link of their edge, and the honest
        client does not join through it, even when chance links of its own elsewhere made it a
        possible member."""
        ca, cb = self.clients.get(a), self.clients.get(b)
        if ca is None or cb is None or ca.flagged_at is None or cb.flagged_at is None:
            return False
        return self._weight(a, b) >= self.params.group_min_links and self._made(a, b) and self._made(b, a)

    def _weight(self, a: int, b: int) -> int:
        """The links between ``a`` and ``b``: the larger total of the two views of their edge (0 without
        one). Each view counts every link since it was made; a view made by a space-saving
        replacement also carries the count of the edge it replaced, so the two can differ."""
        ca, cb = self.clients.get(a), self.clients.get(b)
        mine = ca.peers.get(b) if ca is not None else None
        theirs = cb.peers.get(a) if cb is not None else None
        return max(mine.links if mine is not None else 0, theirs.links if theirs is not None else 0)

    def _made(self, a: int, b: int) -> bool:
        """Whether client ``a`` made at least one link on its edge with ``b``: in its own view of the
        edge, or in ``b``'s. Both counts are exact: a space-saving replacement passes on only the total."""
        ca, cb = self.clients.get(a), self.clients.get(b)
        mine = ca.peers.get(b) if ca is not None else None
        theirs = cb.peers.get(a) if cb is not None else None
        return (mine is not None and mine.made > 0) or (theirs is not None and theirs.got > 0)

    def _union(self, a: int, b: int, ts: float) -> None:
        ga, gb = self.member_of.get(a), self.member_of.get(b)
        if ga is None and gb is None:
            number = self._new_number()
            g = _Group(f"g{number}", number, ts, {a: ts})
            g.queries = self._count(a, self._name(a), self._cursor)
            self.groups[g.gid] = g
            self.member_of[a] = g.gid
            self._join(g, b, ts)
        elif ga is None or gb is None:
            gid = ga or gb
            assert gid is not None
            self._join(self.groups[gid], a if ga is None else b, ts)
        elif ga != gb:
            # The older id keeps the group: the one issued first (a part split off another group gets
            # a new number, though its members, and its ``created``, may be older than the other's).
            keep, gone = sorted((self.groups[ga], self.groups[gb]), key=lambda g: g.number)
            small, large = sorted((gone, keep), key=lambda g: len(g.joined))
            cross = sum(self._weight(k, q) for k in small.joined for q in self._neighbours(k) if q in large.joined)
            for k in gone.joined:  # they join the kept group now (the merge's time, as the scorers read it)
                keep.joined[k] = ts
                self.member_of[k] = keep.gid
            keep.links += gone.links + cross
            keep.queries += gone.queries
            keep.first_flagged = min((t for t in (keep.first_flagged, gone.first_flagged) if t is not None), default=None)
            keep.max_score = max(keep.max_score, gone.max_score)
            if gone.gid in self._dirty:
                self._dirty.discard(gone.gid)
                self._dirty.add(keep.gid)
            del self.groups[gone.gid]

    def _join(self, g: _Group, joiner: int, ts: float) -> None:
        """``joiner`` joins ``g``: with the links between it and the members, and its queries so far."""
        g.links += sum(self._weight(m, joiner) for m in self._neighbours(joiner) if m in g.joined)
        g.queries += self._count(joiner, self._name(joiner), self._cursor)
        g.joined[joiner] = ts
        self.member_of[joiner] = g.gid

    def _recount(self, gid: str) -> None:
        """The links between a group's members, from their edges (each pair once)."""
        g = self.groups[gid]
        pairs = {(k, q) if k < q else (q, k) for k in g.joined for q in self.clients[k].peers if q in g.joined}  # own edges: see _split
        g.links = sum(self._weight(k, q) for k, q in pairs)

    def _members_queries(self, g: _Group) -> int:
        return sum(self._count(k, self._name(k), self._cursor) for k in g.joined)

    def _refresh(self, gids: set[str] | None, ts: float | None = None) -> None:
        """Recompute the scores (and flags) of the groups ``gids`` (None: all, recounting their
        members' queries from the clients'), from their links and members' queries at the cursor."""
        for gid in (self.groups if gids is None else gids):
            g = self.groups.get(gid)
            if g is None:
                continue
            if gids is None:
                g.queries = self._members_queries(g)
            g.score = min(1.0, g.links / max(g.queries, 1))
            g.max_score = max(g.max_score, g.score)
            g.flagged = len(g.joined) >= 2 and g.score >= self.threshold
            if g.flagged and g.first_flagged is None:
                # A re-split by a read or the sweep has no event time: the latest link between the
                # members is the moment the evidence that flags it was complete.
                g.first_flagged = ts if ts is not None else self._latest_link(g)

    def _latest_link(self, g: _Group) -> float:
        """The event time of the latest link between two members of ``g`` (their edges' ``last``)."""
        return max((e.last for k in g.joined if (c := self.clients.get(k)) is not None for p, e in c.peers.items() if p in g.joined),
                   default=max(g.joined.values()))

    # -- expiry and eviction -------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Drop edges and flags older than the TTL, members without them leave (module docstring);
        then recompute every group's score, since its members' query counts have moved on."""
        self._drop_stale(now)
        self.settle()
        self._refresh(None)

    def _drop_stale(self, now: float) -> None:
        limit = now - self.params.ttl_seconds
        if self._oldest >= limit:
            return
        touched: set[str] = set()
        for key in list(self.clients):
            c = self.clients[key]
            for peer in [p for p, e in c.peers.items() if e.last < limit]:
                del c.peers[peer]
                self._unlist(peer, key)
                if (g := self.member_of.get(key)) is not None:
                    touched.add(g)
            if c.flagged_at is not None and c.flagged_at < limit:
                c.flagged_at = None
                c.own.clear()
                if (g := self.member_of.get(key)) is not None:
                    touched.add(g)
            if not c.peers and c.flagged_at is None:
                self._drop(key)
        self._dirty |= touched
        self._oldest = min((t for c in self.clients.values() for t in (*(e.last for e in c.peers.values()), c.flagged_at) if t is not None), default=math.inf)

    def forget(self, key: int) -> None:
        """A client evicted from the exporter's state, or released, leaves everything (its group is
        re-split at the next settle: a block's end, the sweep or a read)."""
        if key in self.clients:
            self._drop(key)

    def _drop(self, key: int) -> None:
        c = self.clients.pop(key, None)
        if c is not None:
            for peer in c.peers:
                self._unlist(peer, key)
        for other in self._listers.pop(key, ()):  # and the other clients' edges to it: its links are forgotten
            oc = self.clients.get(other)
            if oc is not None and oc.peers.pop(key, None) is not None and (g := self.member_of.get(other)) is not None:
                self._dirty.add(g)
        gid = self.member_of.pop(key, None)
        if gid is not None:
            g = self.groups[gid]
            g.joined.pop(key, None)
            g.queries -= self._count(key, c.name if c is not None else None, self._cursor)
            self._dirty.add(gid)

    def settle(self, ts: float | None = None) -> None:
        """Re-split the groups that lost members or edges (once each), so that reads see connected groups.

        At a block's end (``ts``, its last event time) a group re-splits at most once per
        ``ttl_seconds / SCANS_PER_TTL`` of event time, and stays due until then or until a read
        (``ts`` None), which re-splits every group due: a re-split walks the whole group, and
        evicting one member per block (new client ids push the least recent out) would
        otherwise make one event cost a walk over thousands of members, block after block.
        """
        if ts is None:
            due, self._dirty = self._dirty, set()
        else:
            due = {gid for gid in self._dirty if gid not in self.groups or self.groups[gid].next_split <= ts}
            self._dirty -= due
        left: set[str] = set()
        for gid in sorted(due, key=lambda gid: self.groups[gid].number if gid in self.groups else 0):
            left.update(self._split(gid, ts))
        self._refresh(left, ts)

    def _split(self, gid: str, ts: float | None = None) -> list[str]:
        """Recompute a group's components after members or edges left; the part with the earliest member keeps the id.
        Returns the ids of the groups it left (none if it dissolved).

        O(members × max_peers): a union of the members joined by a strong edge, read from each
        member's own edges only. Every edge is held by at least one of its two clients, so
        that finds them all, without the other view (``_listers``), which has no bound: a
        client that thousands of others linked to would make every split of its group walk them.
        An edge held by both counts when either holds it with ``group_min_links`` links.
        """
        g = self.groups.get(gid)
        if g is None:
            return []
        for k in [k for k in g.joined if k not in self.clients or self.clients[k].flagged_at is None]:
            g.joined.pop(k)
            self.member_of.pop(k, None)
        root = {k: k for k in g.joined}

        def find(k: int) -> int:
            while root[k] != k:
                root[k] = root[root[k]]
                k = root[k]
            return k

        for k in g.joined:
            for p in self.clients[k].peers:
                if p in root and self._joinable(k, p) and (a := find(k)) != (b := find(p)):
                    root[b] = a
        by_root: dict[int, list[int]] = {}
        for k in sorted(g.joined, key=lambda k: (g.joined[k], k)):  # so parts come in the order of their earliest member
            by_root.setdefault(find(k), []).append(k)
        parts = [p for p in by_root.values() if len(p) >= 2]
        if not parts:
            self._dissolve(g)
            return []
        keep = set(parts[0])
        joined = dict(g.joined)
        for k in list(g.joined):
            if k not in keep:
                g.joined.pop(k)
                self.member_of.pop(k, None)
        if ts is not None:  # (a read's re-split leaves the pause as it was)
            g.next_split = ts + self.params.ttl_seconds / SCANS_PER_TTL
        for part in parts[1:]:
            number = self._new_number()
            new = _Group(f"g{number}", number, min(joined[k] for k in part), {k: joined[k] for k in part})  # members keep their times
            new.next_split = g.next_split  # the parts of a group pause as it does
            self.groups[new.gid] = new
            for k in part:
                self.member_of[k] = new.gid
            self._recount(new.gid)
            new.queries = self._members_queries(new)
        self._recount(gid)
        g.queries = self._members_queries(g)
        return [gid, *(self.member_of[part[0]] for part in parts[1:])]

    def _dissolve(self, g: _Group) -> None:
        for k in g.joined:
            self.member_of.pop(k, None)
        self.maxima.append(g.max_score)
        del self.maxima[:-HISTORY]
        del self.groups[g.gid]

    # -- reading --------------------------------------------------------------------------
    def summary(self, gid: str) -> GroupSummary:
        g = self.groups[gid]
        with_members: dict[int, int] = dict.fromkeys(g.joined, 0)  # each member's links with the others, each edge once
        for k in g.joined:
            for p in self.clients[k].peers:
                if p in g.joined and not (k > p and k in self.clients[p].peers):  # (an edge both hold: counted from the lower key)
                    w = self._weight(k, p)
                    with_members[k] += w
                    with_members[p] += w
        members = []
        for k, joined in g.joined.items():
            c = self.clients[k]
            if c.name is None:  # never: a member joined through a query of its own, which named it (load checks it)
                continue
            links = with_members[k]
            q = self._queries(c.name)
            members.append(MemberSummary(c.name, links, q, min(1.0, links / max(q, 1)), joined))
        members.sort(key=lambda m: (-m.strength, m.client))
        return GroupSummary(gid, self.model, tuple(members), g.score, g.flagged, self.threshold, g.links, g.created, g.first_flagged)

    def all_maxima(self) -> list[tuple[float, tuple[str, ...]]]:
        """The maximum score of every group that formed, with the members of those still standing
        (calibration; a dissolved group keeps no members: ``()``)."""
        self.settle()
        standing = [(g.max_score, tuple(sorted(str(self.clients[k].name) for k in g.joined))) for g in self.groups.values()]
        return [(m, ()) for m in self.maxima] + standing

    # -- snapshots -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The model's groups for a snapshot, settled first (as a read would see them): a group that
        lost members and waits for its re-split can hold one member, or one without a flag, which
        :meth:`load` refuses."""
        self.settle()
        return {
            "clients": [
                {"key": k, "name": c.name, "flagged_at": c.flagged_at, "own": list(c.own), "peers": [[p, e.links, e.last, e.made, e.got] for p, e in c.peers.items()]}
                for k, c in self.clients.items()
            ],
            "groups": [
                {"gid": g.gid, "number": g.number, "created": g.created, "joined": [[k, t] for k, t in g.joined.items()], "links": g.links,
                 "score": g.score, "max_score": g.max_score, "flagged": g.flagged, "first_flagged": g.first_flagged}
                for g in self.groups.values()
            ],
            "maxima": list(self.maxima),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore a snapshot's :meth:`state`, all or nothing: state that does not hold together
        (a malformed record, an edge or time that is not a finite number, a member in two
        groups or without a record, a group of fewer than two members) raises ``ValueError``
        and leaves this model's groups as they were. A client's record must carry the key of its
        name, once, and a client that can be a member (flagged) must have a name: every read
        names the members."""
        p = self.params
        if not isinstance(state, dict):
            raise ValueError("a model's groups are not a record")
        clients: OrderedDict[int, _Client] = OrderedDict()
        for c in _records(state, "clients")[-p.max_tracked_clients :]:
            name, key = c["name"], _key(c["key"])
            if name is not None and (not is_valid_name(name) or client_key(name) != key):
                raise ValueError("a client's name is not a valid client id, or not the one its key was made from")
            peers = {_key(e[0]): _edge_of(e) for e in c["peers"]}
            if len(peers) > p.max_peers:
                raise ValueError("a client has more edges than max_peers")
            flagged_at = None if c["flagged_at"] is None else _time(c["flagged_at"])
            if key in clients or (flagged_at is not None and name is None):
                raise ValueError("a client has two records, or can be a member without a name")
            clients[key] = _Client(name, flagged_at, peers, _own_times(c.get("own", []), p.group_min_links))
        groups: dict[str, _Group] = {}
        member_of: dict[int, str] = {}
        for g in _records(state, "groups"):
            joined = {_key(k): _time(t) for k, t in g["joined"]}
            gid, number = str(g["gid"]), _count_of(g["number"], high=MAX_GROUP_NUMBER - 1)
            if gid != f"g{number}" or gid in groups or len(joined) < 2:
                raise ValueError("a group's id, number or members do not hold together")
            for k in joined:
                c = clients.get(k)
                if k in member_of or c is None or c.name is None or c.flagged_at is None:
                    raise ValueError("a group's member is in another group, or has no record of its own")
                member_of[k] = gid
            first = None if g["first_flagged"] is None else _time(g["first_flagged"])
            groups[gid] = _Group(gid, number, _time(g["created"]), joined, _count_of(g["links"], low=0), 0, _share(g["score"]),
                                 _share(g["max_score"]), bool(g["flagged"]), first)
        maxima = [_share(v) for v in state.get("maxima", [])][-HISTORY:]
        self.clients, self.groups, self.member_of, self.maxima = clients, groups, member_of, maxima
        self._listers = {}
        for k, c in clients.items():
            for peer in c.peers:
                self._listers.setdefault(peer, set()).add(k)
        for g in groups.values():  # the clients are restored first: their counts are the ones the scores were taken over
            g.queries = self._members_queries(g)
        self._dirty = set(groups)  # a split may have been due when the snapshot was taken: each group is re-split once
        self._oldest = self._next_scan = -math.inf  # the next block's expiry check looks at everything restored


def _records(state: dict[str, Any], part: str) -> list[dict[str, Any]]:
    found = state.get(part, [])
    if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
        raise ValueError(f"the {part} of a model's groups are not a list of records")
    return found


def _edge_of(saved: Any) -> _Edge:
    """One saved view of an edge: ``[peer, links, last, made, got]``. Snapshots before who made the
    links was kept hold ``[peer, links, last]``: such an edge counts as made by both clients, so
    that the groups it held restore as they were (until it expires, a TTL later)."""
    if not isinstance(saved, list) or len(saved) not in (3, 5):
        raise ValueError("an edge is not [peer, links, last, made, got]")
    links, last = _count_of(saved[1]), _time(saved[2])
    if len(saved) == 3:
        return _Edge(links, last, 1, 1)
    made, got = _count_of(saved[3], low=0), _count_of(saved[4], low=0)
    if made + got > links:
        raise ValueError("an edge's links made by its two clients are more than its links")
    return _Edge(links, last, made, got)


def _own_times(value: Any, keep: int) -> list[float]:
    """A client's own-link times as saved: the last ``keep`` of a list of times. A count (snapshots
    before the times were kept) restores none: the count had no times, and the client's flag, saved
    apart, keeps it a possible member for its TTL."""
    if isinstance(value, int) and not isinstance(value, bool):
        _count_of(value, low=0)
        return []
    if not isinstance(value, list):
        raise ValueError("a client's own links are not a list of times")
    return sorted(_time(t) for t in value)[-keep:]


def _key(value: Any) -> int:
    k = int(value)
    if not 0 <= k < 2**64:
        raise ValueError("a client key is out of range")
    return k


def _count_of(value: Any, low: int = 1, high: float = math.inf) -> int:
    if isinstance(value, bool) or int(value) != value or not low <= value <= high:
        raise ValueError("a count is not a whole number in range")
    return int(value)


def _time(value: Any) -> float:
    t = float(value)
    if not math.isfinite(t):
        raise ValueError("an event time is not finite")
    return t


def _share(value: Any) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError("a score is not within 0 and 1")
    return v


class GroupBook:
    """The groups of every model of a pipeline, and the one sequence their ids come from."""

    def __init__(self, queries: Callable[[str, str], int], profile: "Profile | None" = None) -> None:
        """``queries(client, model)``: the client's queries on the model so far (the pipeline's
        store), which the groups' scores and the members' strengths are taken over. Required:
        a book that counted none scored every group 1 (restored groups did, until this source)."""
        self.profile = profile
        self._client_queries = queries
        self.by_model: dict[str, ModelGroups] = {}
        self._next = 1
        self._reserve: Callable[[int], None] | None = None  # records that numbers below its argument may be in use
        self._reserved = 0  # numbers below this are recorded so

    def keep_numbers(self, reservations: "NumberReservations") -> None:
        """Keep group numbers unique across restarts and crashes (:mod:`exporter.group_numbers`):
        go on after every number reserved before, and reserve numbers before using them."""
        self._next = max(self._next, reservations.load())
        self._reserve = reservations.reserve

    def _number(self) -> int:
        n = self._next
        if self._reserve is not None and n >= self._reserved:
            self._reserved = n + BLOCK
            self._reserve(self._reserved)
        self._next += 1
        return n

    def model(self, model: str, params: "LinksParams") -> ModelGroups:
        """The model's groups, made on first use with the calibrated threshold when the profile has one
        (calibrated under the same links parameters)."""
        mg = self.by_model.get(model)
        if mg is None:
            from exporter.profile import params_digest

            threshold = float(params.group_threshold)
            mp = self.profile.models.get(model) if self.profile is not None else None
            if mp is not None and "threshold" in (mp.groups or {}) and mp.params.get(SOURCE) == params_digest(params, "threshold"):
                threshold = float(mp.groups["threshold"])
            mg = self.by_model[model] = ModelGroups(model, params, threshold, self._number, lambda c: self._client_queries(c, model))
        return mg

    # -- fed by the pipeline -----------------------------------------------------------------
    def note(self, batch: "Batch", signals: dict[str, "Signals"]) -> None:
        """Keep the links detector's per-event flags of one client's batch in its block, for :meth:`process`."""
        found = signals.get(SOURCE)
        block = batch.block
        if found is None or block is None:
            return
        if SOURCE not in block.flagged:
            block.flagged[SOURCE] = np.zeros(len(block), dtype=bool)
        block.flagged[SOURCE][batch.rows] = found.flagged

    def process(self, model: str, params: "LinksParams | None", block: "Block") -> None:
        """Fold a judged block into the model's groups."""
        flags = block.flagged.get(SOURCE)
        if params is None:
            return
        self.model(model, params).observe(block, flags if flags is not None else np.zeros(len(block), dtype=bool))

    def forget(self, client: str) -> None:
        key = client_key(client)
        for mg in self.by_model.values():
            mg.forget(key)

    def expire(self, now: float) -> None:
        for mg in self.by_model.values():
            mg.expire(now)

    # -- reading -------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The models whose groups are kept (those ``links`` judged a block of)."""
        return list(self.by_model)

    def summaries(self, only: str | None = None) -> list[GroupSummary]:
        """Every group, flagged first, then the most members, then by score; or only the group ``only``, if it exists.

        Members before score: series are cut at ``max_group_series`` in this order, and a pair of
        keys that links only each other reaches a score of 1 cheaply; pairs by the dozen would push
        a Sybil group of ten keys, whose score is a few hundredths, out of /metrics and its alert.
        Every member costs a client with linked queries of its own."""
        for mg in self.by_model.values():
            mg.settle()
        out = [mg.summary(gid) for mg in self.by_model.values()
               for gid in (mg.groups if only is None else [only] if only in mg.groups else [])]
        return sorted(out, key=lambda s: (not s.flagged, -len(s.members), -s.score, s.group))

    def of(self, client: str) -> list[str]:
        """The groups a client is in (one per model at most)."""
        key = client_key(client)
        for mg in self.by_model.values():
            mg.settle()
        return [gid for mg in self.by_model.values() if (gid := mg.member_of.get(key)) is not None]

    # -- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"next": self._next, "models": {m: mg.state() for m, mg in self.by_model.items()}}

    def load(self, state: Any, params_of: Callable[[str], "LinksParams | None"]) -> None:
        """Restore every model's groups whose ``links`` parameters ``params_of`` accepts. A model whose
        saved groups do not hold together starts without groups (a warning says how many), and the
        clients and detector state restored beside them stay. Saved groups that are not even a
        mapping of models with a group number to go on from restore none (a warning says so).
        Never raises on what it reads: it runs after the clients are restored."""
        try:
            if not isinstance(state, dict) or not isinstance(models := state.get("models", {}), dict):
                raise ValueError("the saved groups are not a mapping of models")
            following = _count_of(state.get("next", 1), high=MAX_GROUP_NUMBER)
        except (ValueError, TypeError, OverflowError):
            log.warning("the saved groups are not readable; every model starts without groups")
            return
        self._next = max(self._next, following)
        bad = 0
        for model, st in models.items():
            params = params_of(model)
            if params is None:
                continue
            mg = self.model(model, params)
            try:
                mg.load(st)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError):
                bad += 1
                continue
            self._next = max(self._next, 1 + max((g.number for g in mg.groups.values()), default=0))
        if bad:
            log.warning("the saved groups of %d model(s) do not hold together; those models start without groups", bad)


def links_params(runtime: Any) -> "LinksParams | None":
    """The params of a model runtime's ``links`` detector (whose links make the model's groups), or None."""
    return next((d.params for d in (runtime.detectors if runtime is not None else ()) if d.name == SOURCE), None)


def group_threshold(maxima: Iterable[float], default: float, alpha: float) -> tuple[float, str]:
    """The group threshold from the maximum scores of the groups that formed among benign clients, and how.

    No benign group formed: the configured default stands. Otherwise the threshold is
    just above the largest benign maximum when there are fewer than ``2 / alpha`` groups
    (no benign group of the calibration would have been flagged), else the value that a
    share ``alpha`` of them exceeded; never below the default's half (a benign sample that
    happened to form weak groups must not make the first weak group an alarm), and never
    above 1, the largest score there is: above it, no group of the model would ever be
    flagged, and nothing would say so (``how`` says it instead).
    """
    x = np.sort(np.asarray(list(maxima), dtype=np.float64))
    if x.size == 0:
        return default, "no group formed among the benign calibration clients: the configured group_threshold stands"
    if x.size < 2.0 / alpha:
        tau = float(np.nextafter(x[-1], np.inf))
        how = f"{x.size} group(s) formed among the benign calibration clients (largest score {x[-1]:.4f}): the threshold lies just above it"
    else:
        k = int(np.floor(alpha * x.size))
        tau = float(np.nextafter(x[x.size - k - 1], np.inf))
        how = f"{x.size} groups formed among the benign calibration clients: {alpha:.1%} of them reached the threshold"
    if tau > 1.0:
        tau = 1.0
        how += "; capped at 1, the largest score: benign groups reached it, so groups that score 1 are flagged (check the calibration log)"
    return max(tau, default / 2.0), how


class GroupCollector(Collector):
    """Group series under a cardinality guard: at most ``max_group_series`` groups (flagged
    first, then the most members, then by score), each listing at most ``max_member_series`` members.

    * ``monitaur_group_suspicious{group, model}``: 1 while the group is flagged;
    * ``monitaur_group_score{group, model}``: its score (0 to 1);
    * ``monitaur_group_members{group, model}``: how many clients it has;
    * ``monitaur_group_member_info{group, model, client}``: 1 per member listed (the alert's list);
    * ``monitaur_groups{model}`` and ``monitaur_groups_flagged{model}``: all groups, exported or not.
    """

    def __init__(self, read: Callable[[], list[GroupSummary]], limits: Callable[[str], tuple[int, int]],
                 models: Callable[[], Iterable[str]]) -> None:
        """``read``: every group; ``limits(model)``: its series bounds; ``models``: the models whose
        groups are kept (their totals read 0 while they have none)."""
        self._read = read
        self._limits = limits
        self._models = models

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable:
        found = self._read()
        suspicious = GaugeMetricFamily("monitaur_group_suspicious", "1 while the group of linked clients is flagged.", labels=["group", "model"])
        score = GaugeMetricFamily("monitaur_group_score", "Share of the group's queries linked to another member's, 0 to 1.", labels=["group", "model"])
        members = GaugeMetricFamily("monitaur_group_members", "Clients in the group.", labels=["group", "model"])
        info = GaugeMetricFamily("monitaur_group_member_info", "1 for each member of the group (strongest first, up to the configured limit).", labels=["group", "model", "client"])
        total = GaugeMetricFamily("monitaur_groups", "Groups of linked clients, by model.", labels=["model"])
        flagged = GaugeMetricFamily("monitaur_groups_flagged", "Flagged groups of linked clients, by model.", labels=["model"])
        counts: dict[str, list[int]] = {m: [0, 0] for m in self._models()}
        shown: dict[str, int] = {}
        for g in found:
            c = counts.setdefault(g.model, [0, 0])
            c[0] += 1
            c[1] += int(g.flagged)
            if not is_valid_name(g.model):
                continue
            max_groups, max_members = self._limits(g.model)
            if shown.get(g.model, 0) >= max_groups:
                continue
            shown[g.model] = shown.get(g.model, 0) + 1
            labels = [g.group, g.model]
            suspicious.add_metric(labels, 1.0 if g.flagged else 0.0)
            score.add_metric(labels, g.score)
            members.add_metric(labels, float(len(g.members)))
            for m in [m for m in g.members if is_valid_name(m.client)][:max_members]:
                info.add_metric([*labels, m.client], 1.0)
        for model, (n, f) in counts.items():
            if is_valid_name(model):
                total.add_metric([model], float(n))
                flagged.add_metric([model], float(f))
        return [suspicious, score, members, info, total, flagged]

"""The clients API, on the exporter's main port: read verdicts, release and block clients.

- ``GET /api/v1/clients?flagged=true`` (or ``blocked=true``, or both: clients that are
  both): a page of clients, by client id, ``limit`` (default :data:`DEFAULT_LIMIT`, at
  most :data:`MAX_LIMIT`) at a time, the next page from ``cursor`` (the answer's
  ``next_cursor``, null on the last page). Flagged: the sticky verdict, for tracked
  clients and for evicted ones whose flag still holds. Blocked: what the decision
  endpoint blocks (flagged or blocked by hand, not allowlisted).
- ``GET /api/v1/clients/{id}``: one client (tracked, evicted while flagged, blocked by
  hand or with an override on record; else 404). The id is percent-encoded in the path
  (``urllib.parse.quote(id, safe="")``) and must be a valid client id (:mod:`exporter.names`).
- ``POST /api/v1/clients/{id}/release`` and ``.../block`` with ``{"reason": "..."}``.

Every request needs ``Authorization: Bearer <token>`` once ``api.tokens`` (or
``api.tokens_file``) holds any token; the exporter does not start beyond loopback
without them. Overrides always need a token: its name is who made the override (in the
log, the record and the answers). Answers are JSON; errors are ``{"error", "reason"}``.

Each client answer has a ``group`` field: the linked group of coordinated clients it
belongs to (:mod:`exporter.groups`; the first if it is in groups of several models), or
null. ``/api/v1/groups`` is answered by :mod:`exporter.groups_api` (``ClientsAPI.groups``),
whose group overrides go through :meth:`ClientsAPI.override`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import heapq
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import parse_qs, unquote

from exporter import jsonparse
from exporter.names import is_valid_name
from exporter.overrides import BLOCK, RELEASE, Override, OverrideError, check_reason

if TYPE_CHECKING:
    from exporter.groups_api import GroupsAPI
    from exporter.pipeline import Pipeline
    from exporter.reaction import Reaction
    from exporter.verdict import FlagRecord

PREFIX = "/api/v1/clients"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_BODY = 16 * 1024  # bytes of an override's body
MAX_PEERS = 20  # cross-client peers listed per client, heaviest first
# The `reason` of the API's error answers.
ERROR_REASONS = (
    "unauthorized", "named_token_required", "invalid_client", "unknown_client", "bad_query", "filter_required",
    "not_blocked", "allowlisted", "too_many_blocks", "reason_required", "reason_too_long", "malformed_json",
    "invalid_group", "unknown_group", "nothing_to_block", "invalid_members", "group_changed",  # the groups API (exporter.groups_api)
)


@dataclass(slots=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, {"error": message, "reason": reason}, headers or {})


def _num(v: float | None) -> float | None:
    """A float for JSON: None for None and non-finite values."""
    return None if v is None or not math.isfinite(v) else v


def flag_json(flag: "FlagRecord | None") -> dict[str, Any] | None:
    """A flag record for an answer: times, query numbers, model, and the detectors over their thresholds, strongest first."""
    if flag is None:
        return None
    return {
        "first_at": flag.first_at,
        "last_at": flag.last_at,
        "first_query": flag.first_query,
        "last_query": flag.last_query,
        "model": flag.model,
        "detectors": [{"detector": name, "over_threshold": _num(ratio)} for name, ratio in flag.detectors.items()],
        "cleared_at": flag.cleared_at,
        "cleared": flag.cleared,
    }


def override_json(o: Override | None) -> dict[str, Any] | None:
    if o is None:
        return None
    out = {"action": o.action, "client": o.client, "at": o.at, "who": o.who, "reason": o.reason, "group": o.group}
    if o.action == BLOCK:
        out["until"] = o.until
    return out


def override_request(body: bytes, who: str | None) -> tuple[str, str, dict[str, Any]] | Answer:
    """(who, reason, the body's object) of an override request, or the error answer: a named token and a JSON body with a reason are required."""
    if who is None:
        return error(403, "named_token_required", "an override needs a named API token (api.tokens): it records who acted")
    try:
        doc = jsonparse.loads(body)  # UTF-8 only, and nesting too deep is a ValueError too
    except ValueError:
        return error(400, "malformed_json", 'the body must be a JSON object: {"reason": "..."}')
    try:
        return who, check_reason(doc.get("reason") if isinstance(doc, dict) else None), doc
    except OverrideError as exc:
        return override_error(exc)


def override_error(exc: OverrideError) -> Answer:
    """An override refused: 400 for the request's reason text, 409 for the state (allowlisted, too many blocks)."""
    return error(400 if exc.reason.startswith("reason") else 409, exc.reason, str(exc))


def page_limit(params: dict[str, list[str]]) -> int | Answer:
    """The ``limit`` query parameter of a listing (default :data:`DEFAULT_LIMIT`), or the 400 answer."""
    if "limit" not in params:
        return DEFAULT_LIMIT
    text = params["limit"][0]
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 1 <= int(text) <= MAX_LIMIT:
        return error(400, "bad_query", f"limit is a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def encode_cursor(client: str) -> str:
    return base64.urlsafe_b64encode(client.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str | None:
    try:
        client = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return client if is_valid_name(client) else None


def bearer_match(authorization: str | None, tokens: Sequence[tuple[str, bytes]]) -> str | None:
    """The name of the token that an ``Authorization: Bearer <token>`` header carries, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode()
    if scheme.lower() != "bearer" or not given:
        return None
    # Compare against every token so timing does not reveal which one nearly matched.
    found = [name for name, t in tokens if hmac.compare_digest(given, t)]
    return found[0] if found else None


class ClientsAPI:
    """Answers the clients API's requests (the HTTP server reads and writes; this decides)."""

    def __init__(self, pipeline: "Pipeline", reaction: "Reaction", tokens: dict[str, str], group_of: Callable[[str], str | None] | None = None) -> None:
        self.pipeline = pipeline
        self.reaction = reaction
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]
        # The linked group of a client now (exporter.groups); without it, the group its flag recorded.
        self._group_of = group_of
        self.groups: "GroupsAPI | None" = None  # /api/v1/groups, set by the app

    def handles(self, path: str) -> bool:
        """Whether ``path`` is this API's (clients, or groups when set)."""
        return path == PREFIX or path.startswith(PREFIX + "/") or (self.groups is not None and self.groups.handles(path))

    # -- authentication ------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(allowed, token name): with tokens configured, a valid bearer token is required; without, anyone (loopback only) is allowed, unnamed."""
        if not self._tokens:
            return True, None
        name = bearer_match(authorization, self._tokens)
        return name is not None, name

    # -- reads ---------------------------------------------------------------------------
    def get(self, path: str, query: str) -> Answer:
        if self.groups is not None and self.groups.handles(path):
            return self.groups.get(path, query)
        if path in (PREFIX, PREFIX + "/"):
            return self.list_clients(query)
        client, action = self._target(path)
        if action is not None:
            return error(404, "not_found", "GET /api/v1/clients or /api/v1/clients/{id}; overrides are POSTed")
        if client is None:
            return error(400, "invalid_client", "not a valid client id (percent-encode it in the path)")
        found = self.client(client)
        if found is None:
            return error(404, "unknown_client", "no such client: not tracked, not recently flagged, not blocked and never overridden")
        return Answer(200, found)

    def _target(self, path: str) -> tuple[str | None, str | None]:
        """(client id, action) of ``/api/v1/clients/{id}[/{action}]``: id None if invalid; action "" for a path of another shape."""
        rest = path[len(PREFIX) + 1:] if path.startswith(PREFIX + "/") else ""
        parts = rest.split("/")
        if not rest or len(parts) > 2 or not parts[0]:
            return None, ""
        try:
            client = unquote(parts[0], errors="strict")
        except UnicodeDecodeError:
            return None, None if len(parts) == 1 else parts[1]
        return (client if is_valid_name(client) else None), (None if len(parts) == 1 else parts[1])

    def client(self, client_id: str) -> dict[str, Any] | None:
        """One client's answer, or None if nothing is known of it."""
        view = self.pipeline.view
        s = view.client(client_id)
        recent = view.recently_flagged_one(client_id) if s is None else None
        state = self.reaction.block_state(client_id, s is not None and s.suspicious, recent)
        released = self.reaction.overrides.last(client_id, RELEASE)
        if s is None and recent is None and state.manual is None and released is None:
            return None
        flag = s.flag if s is not None else recent.flag if recent is not None else None
        if s is not None:
            flagged = s.suspicious
        else:
            until = self.reaction.verdict_until(False, recent)
            flagged = until is not None and until > self.pipeline.clock()
        total, peers = view.peer_matches(client_id) if s is not None else (0, {})
        top = sorted(peers.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_PEERS]
        model = flag.model if flag is not None else (max(s.queries_by_model, key=s.queries_by_model.__getitem__) if s is not None and s.queries_by_model else None)
        if released is None and s is not None and s.released is not None:
            r = s.released
            released = Override(RELEASE, client_id, r.at, r.who, r.reason, flag_first_at=r.flag.first_at)
        group = self._group_of(client_id) if self._group_of is not None else flag.group if flag is not None else None
        mode = self.reaction.config.mode
        decision = ("allowlisted" if state.allowlisted else "block" if mode == "block" else "would_block") if state.blocked else "allow"
        return {
            "client": client_id,
            "tracked": s is not None,
            "evicted": {"at": recent.evicted_at, "reason": recent.reason} if recent is not None else None,
            "model": model,
            "queries": s.queries if s is not None else None,
            "risk": _num(round(s.score, 6)) if s is not None else None,
            "flagged": flagged,
            "flag": flag_json(flag),
            "detectors_flagging_now": list(s.detectors_on) if s is not None else [],
            "cross_client": {"matches": total, "peers": [{"client": p, "matches": n} for p, n in top]},
            "group": group,
            "blocked": state.blocked and not state.allowlisted,
            "block": {"source": state.source, "until": state.until} if state.blocked else None,
            "allowlisted": state.allowlisted,
            "decision": decision,
            "manual_block": override_json(state.manual),
            "released": override_json(released),
        }

    def list_clients(self, query: str) -> Answer:
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=10)
        except ValueError:
            return error(400, "bad_query", "too many query parameters")
        unknown = set(params) - {"flagged", "blocked", "limit", "cursor"}
        if unknown or any(len(v) > 1 for v in params.values()):
            return error(400, "bad_query", "query parameters: flagged=true, blocked=true, limit, cursor (each at most once)")
        want = {k for k in ("flagged", "blocked") if k in params}
        if any(params[k][0] != "true" for k in want):
            return error(400, "bad_query", "flagged and blocked take the value true")
        if not want:
            return error(400, "filter_required", "give flagged=true or blocked=true (every tracked client is not listed; /metrics has them)")
        limit = page_limit(params)
        if isinstance(limit, Answer):
            return limit
        after = None
        if "cursor" in params:
            after = decode_cursor(params["cursor"][0])
            if after is None:
                return error(400, "bad_query", "not a cursor of this API (use next_cursor from the previous page)")
        ids = self._matching(want)
        page = heapq.nsmallest(limit + 1, (c for c in ids if after is None or c > after))
        items = [found for c in page[:limit] if (found := self.client(c)) is not None]
        return Answer(200, {"clients": items, "total": len(ids), "limit": limit,
                            "next_cursor": encode_cursor(page[limit - 1]) if len(page) > limit else None})

    def _matching(self, want: set[str]) -> set[str]:
        """The ids that pass every filter asked for."""
        now = self.pipeline.clock()
        tracked, recent = self.pipeline.view.flagged_ids()
        flagged = set(tracked) | {c for c, last in recent if last + self.reaction.hold > now}
        if "blocked" not in want:
            return flagged
        blocked = (flagged | set(self.reaction.overrides.blocks(now))) - self.reaction.allowlist
        return blocked & flagged if "flagged" in want else blocked

    # -- overrides --------------------------------------------------------------------------
    def post(self, path: str, body: bytes, who: str | None) -> Answer:
        if self.groups is not None and self.groups.handles(path):
            return self.groups.post(path, body, who)
        client, action = self._target(path)
        if action not in (RELEASE, BLOCK):
            return error(404, "not_found", "POST /api/v1/clients/{id}/release or /api/v1/clients/{id}/block")
        if client is None:
            return error(400, "invalid_client", "not a valid client id (percent-encode it in the path)")
        asked = override_request(body, who)
        if isinstance(asked, Answer):
            return asked
        who, reason, _ = asked
        try:
            records, saved = self.override(action, [client], who, reason)
        except OverrideError as exc:
            return override_error(exc)
        if not records:
            return error(409, "not_blocked", "the client is neither flagged nor blocked by hand: nothing to release")
        return Answer(200, {"override": override_json(records[0]), "saved": saved, "client": self.client(client)})

    def override(self, action: str, clients: list[str], who: str, reason: str, group: str | None = None) -> tuple[list[Override], bool]:
        """Release or block ``clients`` as one override (a group's members, with its id); (records, saved)."""
        if action == RELEASE:
            return self.reaction.release(clients, who, reason, group)
        return self.reaction.block(clients, who, reason, group)

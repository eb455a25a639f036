"""The groups API, beside the clients API: read the linked groups, block or release one as a whole.

- ``GET /api/v1/groups`` (``?flagged=true`` for flagged groups only): every group of
  linked clients (:mod:`exporter.groups`), in the order of their ids, ``limit`` at a time
  (default :data:`exporter.api.DEFAULT_LIMIT`, at most :data:`exporter.api.MAX_LIMIT`),
  the next page from ``cursor`` (the answer's ``next_cursor``).
- ``GET /api/v1/groups/{id}``: one group, with its members (strongest first), each with
  its link strength and its own verdict and block state.
- ``POST /api/v1/groups/{id}/block`` and ``.../release`` with ``{"reason": "..."}``: one
  override of every member, recorded per member with the group's id. Allowlisted
  members are left out of a block (and listed as such); a release releases the members
  that are flagged or blocked by hand. With ``"members": [...]`` (the members as read),
  nothing is done if the group's members are not those any more (409 ``group_changed``,
  with the members now): a group gains, loses and merges members between a read and a
  POST, and a release should not clear the flag of a key that joined since.

Authentication and error answers are the clients API's (:mod:`exporter.api`): the HTTP
server authenticates, :class:`exporter.api.ClientsAPI` hands ``/api/v1/groups`` here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs

from exporter.api import Answer, error, override_error, override_json, override_request, page_limit
from exporter.names import is_valid_name
from exporter.overrides import BLOCK, RELEASE, Override, OverrideError

if TYPE_CHECKING:
    from exporter.groups import GroupSummary
    from exporter.view import ClientView

GROUPS_PREFIX = "/api/v1/groups"
GROUP_ID = re.compile(r"g[1-9][0-9]{0,17}")  # exporter.groups names groups g<n>, n <= MAX_GROUP_NUMBER
Overrider = Callable[[str, list[str], str, str, "str | None"], "tuple[list[Override], bool]"]


def _number(group_id: str) -> int:
    return int(group_id[1:])


def _expected_members(doc: dict[str, Any]) -> set[str] | None | Answer:
    """The members an override request (its body's object) expects the group to have
    (``"members"``), None when it names none, or the 400 answer."""
    if "members" not in doc:  # (a null is refused: a client that writes a missing list as null would lose the guard unawares)
        return None
    found = doc["members"]
    if not isinstance(found, list) or not found or not all(is_valid_name(c) for c in found):
        return error(400, "invalid_members", "members, if given, is the list of client ids the group had when you read it")
    return set(found)


class GroupsAPI:
    """Answers ``/api/v1/groups`` requests from the read-only view; overrides go through the clients API's."""

    def __init__(self, view: "ClientView", client_answer: Callable[[str], dict[str, Any] | None], override: Overrider,
                 allowlist: frozenset[str] | set[str]) -> None:
        self._view = view
        self._client = client_answer
        self._override = override
        self._allowlist = allowlist

    @staticmethod
    def handles(path: str) -> bool:
        return path == GROUPS_PREFIX or path.startswith(GROUPS_PREFIX + "/")

    def group_json(self, g: "GroupSummary", members: bool = True) -> dict[str, Any]:
        """A group for an answer; with ``members``, each member's own verdict and block state too."""
        doc = {"group": g.group, **g.as_dict()}
        doc["members"] = [
            {"client": m.client, "links": m.links, "queries": m.queries, "strength": round(m.strength, 6), "joined": m.joined,
             **(self._member_state(m.client) if members else {})}
            for m in g.members
        ]
        return doc

    def _member_state(self, client: str) -> dict[str, Any]:
        found = self._client(client)
        if found is None:
            return {"flagged": False, "blocked": False, "decision": "allow"}
        return {"flagged": found["flagged"], "blocked": found["blocked"], "decision": found["decision"]}

    # -- reads ---------------------------------------------------------------------------
    def get(self, path: str, query: str) -> Answer:
        if path in (GROUPS_PREFIX, GROUPS_PREFIX + "/"):
            return self._list(query)
        group_id, action = self._target(path)
        if action is not None:
            return error(404, "not_found", "GET /api/v1/groups or /api/v1/groups/{id}; overrides are POSTed")
        if group_id is None:
            return error(400, "invalid_group", "not a group id (g<number>)")
        g = self._view.group(group_id)
        if g is None:
            return error(404, "unknown_group", "no such group (any more): a group dissolves when its links expire or its members leave, and one that merged goes on under the older group's id (a member's group: GET /api/v1/clients/{client})")
        return Answer(200, self.group_json(g))

    def _target(self, path: str) -> tuple[str | None, str | None]:
        """(group id, action) of ``/api/v1/groups/{id}[/{action}]``: id None if invalid; action "" for a path of another shape."""
        rest = path[len(GROUPS_PREFIX) + 1:] if path.startswith(GROUPS_PREFIX + "/") else ""
        parts = rest.split("/")
        if not rest or len(parts) > 2 or not parts[0]:
            return None, ""
        group_id = parts[0] if GROUP_ID.fullmatch(parts[0]) else None
        return group_id, (None if len(parts) == 1 else parts[1])

    def _list(self, query: str) -> Answer:
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=10)
        except ValueError:
            return error(400, "bad_query", "too many query parameters")
        if set(params) - {"flagged", "limit", "cursor"} or any(len(v) > 1 for v in params.values()):
            return error(400, "bad_query", "query parameters: flagged=true, limit, cursor (each at most once)")
        if "flagged" in params and params["flagged"][0] != "true":
            return error(400, "bad_query", "flagged takes the value true")
        limit = page_limit(params)
        if isinstance(limit, Answer):
            return limit
        after = 0
        if "cursor" in params:
            if not GROUP_ID.fullmatch(params["cursor"][0]):
                return error(400, "bad_query", "not a cursor of this API (use next_cursor from the previous page)")
            after = _number(params["cursor"][0])
        found = [g for g in self._view.groups() if "flagged" not in params or g.flagged]
        found.sort(key=lambda g: _number(g.group))
        page = [g for g in found if _number(g.group) > after][: limit + 1]
        return Answer(200, {"groups": [self.group_json(g, members=False) for g in page[:limit]], "total": len(found), "limit": limit,
                            "next_cursor": page[limit - 1].group if len(page) > limit else None})

    # -- overrides --------------------------------------------------------------------------
    def post(self, path: str, body: bytes, who: str | None) -> Answer:
        group_id, action = self._target(path)
        if action not in (RELEASE, BLOCK):
            return error(404, "not_found", "POST /api/v1/groups/{id}/release or /api/v1/groups/{id}/block")
        if group_id is None:
            return error(400, "invalid_group", "not a group id (g<number>)")
        asked = override_request(body, who)
        if isinstance(asked, Answer):
            return asked
        name, reason, doc = asked
        expected = _expected_members(doc)
        if isinstance(expected, Answer):
            return expected
        g = self._view.group(group_id)
        if g is None:
            return error(404, "unknown_group", "no such group (any more): a group dissolves when its links expire or its members leave, and one that merged goes on under the older group's id (a member's group: GET /api/v1/clients/{client})")
        members = [m.client for m in g.members]
        if expected is not None and expected != set(members):
            changed = error(409, "group_changed", "the group's members are not the ones given (members): nothing was done; read it again")
            changed.body["members"] = members
            return changed
        skipped = [c for c in members if action == BLOCK and c in self._allowlist]
        try:
            records, saved = self._override(action, [c for c in members if c not in skipped], name, reason, group_id)
        except OverrideError as exc:
            return override_error(exc)
        if not records:
            return error(409, "not_blocked" if action == RELEASE else "nothing_to_block",
                         "no member is flagged or blocked by hand: nothing to release" if action == RELEASE else "every member is allowlisted")
        return Answer(200, {"group": group_id, "overrides": [override_json(r) for r in records], "skipped_allowlisted": skipped, "saved": saved})

"""Page tokens of the List RPCs (ListVolumes, ListSnapshots): a kind prefix plus the last ID the
previous page returned, so a token stays valid when entries are deleted between pages."""
from __future__ import annotations

from collections.abc import Callable

from .errors import Code, CsiError


def token_after(token: str, prefix: str, check_id: Callable[[str], str]) -> str:
    """The ID a starting_token continues after ('' for none). A token this driver did not issue
    (wrong prefix, or not a valid ID after it) is ABORTED, as the CSI spec asks."""
    if not token:
        return ""
    bad = CsiError(Code.ABORTED, f"starting_token {token[:40]!r} was not issued by this driver")
    if not token.startswith(prefix):
        raise bad
    after = token[len(prefix):]
    try:
        check_id(after)
    except CsiError:
        raise bad from None
    return after

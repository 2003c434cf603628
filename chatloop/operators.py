"""The operator's sign-in: one token compared in constant time, with a back-off per address.

Owns: ``OperatorGate``, the one check that both the admin API (``chatloop.web.deps``) and the
Admin tab (``ui``) use.

Invariants: with no token configured nobody signs in; a wrong token counts toward its client
address's back-off and a right one clears it; while an address must wait, ``matches`` raises
``RateLimited`` without comparing anything.
"""

from __future__ import annotations

import hmac

from chatloop.ratelimit import FailureBackoff


class OperatorGate:
    def __init__(self, token: str, backoff: FailureBackoff):
        self._token = token.encode()
        self._backoff = backoff

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def matches(self, given: str, address: str) -> bool:
        """Whether ``given`` is the operator token (RateLimited while ``address`` must wait)."""
        if not self._token:
            return False
        self._backoff.check(address)
        if hmac.compare_digest((given or "").encode(), self._token):
            self._backoff.succeeded(address)
            return True
        self._backoff.failed(address)
        return False

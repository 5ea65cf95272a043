"""
The pollen protocol without I/O: the challenge a pollinate client sends, and
the answer it checks.

pollinate (Ubuntu's boot-time seeding client) posts ``challenge=HEX`` as an
``application/x-www-form-urlencoded`` body; pollen, the server it was written
for, reads the challenge with Go's ``Request.FormValue``, so ``GET
?challenge=...`` is answered too. Both are parsed here as Go parses them:

- the body counts only for a POST whose ``Content-Type`` is the form type
  (Go leaves any other body unread), and its pairs come before the query's;
- the first ``challenge`` pair wins, pairs are split on ``&``, ``+`` is a
  space, and a pair holding a malformed ``%`` escape is skipped whole;
- the challenge is an opaque byte string of any length up to the caller's
  limit (the sink passes ``max_body_bytes``), hashed exactly as decoded.

The answer is two lines of lowercase hex, LF-terminated: SHA-512 of the
challenge (pollinate compares it with its own ``sha512sum``), then SHA-512 of
the challenge followed by `FRESH_BYTES` fresh pool bytes, the same hash state
continued. An empty or missing challenge gets pollen's own 400 text.

The challenge is never credited and never mixed into the pool: it is chosen by
an anonymous client, the pool is fed by health-tested sources, and pollen's
habit of writing it into its random device only helped a server whose device
had little else to go on. The pool's bytes go into the second line only, so
each answer draws `FRESH_BYTES` bytes that no other answer sees.
"""

import hashlib
import re
from typing import Final
from urllib.parse import unquote_to_bytes

FRESH_BYTES: Final = 64
"""Pool bytes behind each answer's second line, as pollen's ``-bytes`` default."""

CONTENT_TYPE: Final = "text/plain; charset=utf-8"
"""Of the answer and of the 400, as pollen's (sniffed by Go) are."""

FORM_TYPE: Final = "application/x-www-form-urlencoded"
"""The only body type that may carry the challenge."""

NO_CHALLENGE: Final = (
    b"Please use the pollinate client.  'sudo apt-get install pollinate' or "
    b"download from: https://bazaar.launchpad.net/~pollinate/pollinate/trunk/"
    b"view/head:/pollinate\n"
)
"""pollen's body for a request without a challenge (status 400)."""

_KEY: Final = b"challenge"
# A '%' not followed by two hex digits: Go refuses to unescape the pair.
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class ChallengeTooLarge(ValueError):
    """
    The challenge is longer than the sink accepts.
    """


def _unescape(text: bytes) -> bytes | None:
    if _BAD_ESCAPE.search(text):
        return None
    return unquote_to_bytes(text.replace(b"+", b" "))


def form_value(encoded: bytes, key: bytes = _KEY) -> bytes | None:
    """
    The first value of ``key`` in a URL-encoded form or query, decoded; None
    when no well-formed pair names it.

    Args:
        encoded: the query string (without ``?``) or form body, as sent.
        key: the decoded name to look for.
    """
    for pair in encoded.split(b"&"):
        if not pair:
            continue
        raw_key, _, raw_value = pair.partition(b"=")
        if _unescape(raw_key) != key:
            continue
        value = _unescape(raw_value)
        if value is not None:
            return value
    return None


def find_challenge(query: bytes, form: bytes | None, limit: int) -> bytes | None:
    """
    The request's challenge as pollen reads it: from the form body first,
    then from the query.

    Args:
        query: the raw query string, without ``?`` (empty when none).
        form: the body of a POST sent as `FORM_TYPE`; None otherwise.
        limit: the longest challenge accepted, in decoded bytes.

    Returns:
        The decoded challenge (possibly empty), or None when there is none.

    Raises:
        ChallengeTooLarge: the challenge is longer than ``limit``.
    """
    challenge = None
    if form is not None:
        challenge = form_value(form)
    if challenge is None:
        challenge = form_value(query)
    if challenge is not None and len(challenge) > limit:
        raise ChallengeTooLarge(
            f"challenge of {len(challenge)} bytes, more than {limit} accepted"
        )
    return challenge


def answer(challenge: bytes, fresh: bytes) -> bytes:
    """
    The body of a 200: ``hex(SHA-512(challenge))`` and
    ``hex(SHA-512(challenge || fresh))``, each followed by ``\\n``.

    Args:
        challenge: the decoded challenge, not empty.
        fresh: at least `FRESH_BYTES` bytes nobody else was given.

    Raises:
        ValueError: the challenge is empty or too few fresh bytes were given.
    """
    if not challenge:
        raise ValueError("an empty challenge gets the 400, not an answer")
    if len(fresh) < FRESH_BYTES:
        raise ValueError(f"{len(fresh)} fresh bytes, at least {FRESH_BYTES} needed")
    digest = hashlib.sha512(challenge)
    first = digest.hexdigest()
    digest.update(fresh)
    return f"{first}\n{digest.hexdigest()}\n".encode("ascii")

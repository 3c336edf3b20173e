"""Comic names and the partition keys derived from them: the one naming rule of every store.

A comic's *name* is whatever the collection calls it ("Amazing Spider-Man (1963) #001",
"Tintin - L'Île noire", "series/Book 000 - Issue #1" from a legacy canonical_id). People see
names. Machines need a *key*: a Dagster partition key, a Zarr group name in the output store, an
S3 object-key component. ``comic_key(name)`` is that key (scheme version 1, frozen: the tests pin
examples, so it is the same on every machine and in every release):

- A name that is already a plain key stays itself: lowercase ASCII letters and digits, single
  ``.``, ``_`` or ``-`` between them, at most 100 characters (``demo-0001`` -> ``demo-0001``).
- Any other name becomes ``<slug>~<hash>``: the slug is the name lowercased, accents stripped,
  every other run of characters turned into one ``-``, cut to 48 characters (``comic`` when
  nothing is left); the hash is the first 16 hex digits of SHA-256 of the exact UTF-8 name.
  ``Amazing Spider-Man (1963) #001`` -> ``amazing-spider-man-1963-001~<16 hex>``.

Why it is unique: plain keys never contain ``~`` and hashed keys always do, so the two kinds
never meet; two hashed keys are equal only when the SHA-256 prefixes of two different names
collide (64 bits; the stores also detect it and report both comics instead of mixing them).
Why it is safe everywhere: every key is lowercase ASCII from ``[a-z0-9._~-]`` without ``..``, so
it is one path component on any filesystem, the same key on case-insensitive filesystems and S3,
and valid for Dagster (which forbids ``...`` and control characters).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

KEY_SCHEME_VERSION = 1
PLAIN_KEY = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
PLAIN_KEY_MAX = 100
SLUG_MAX = 48
HASH_DIGITS = 16
HASH_SEPARATOR = "~"
# A key is either plain or slug~hash; anything else was not made by comic_key.
KEY_PATTERN = re.compile(rf"{PLAIN_KEY.pattern}|(?:[a-z0-9]+(?:-[a-z0-9]+)*)~[0-9a-f]{{{HASH_DIGITS}}}")


class ComicNameError(ValueError):
    """A value that cannot be a comic name (not a string, empty, or only whitespace)."""


def check_comic_name(name: object) -> str:
    """`name` itself when it can name a comic: any non-blank string."""
    if not isinstance(name, str):
        raise ComicNameError(f"a comic name must be a string, got {type(name).__name__} {name!r}")
    if not name.strip():
        raise ComicNameError(f"a comic name must not be empty or blank, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a badly decoded file name
        raise ComicNameError(f"comic name {name!r} is not valid Unicode ({exc.reason})") from None
    return name


def _slug(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    if len(slug) > SLUG_MAX:
        slug = slug[:SLUG_MAX].rstrip("-")
    return slug or "comic"


def comic_key(name: str) -> str:
    """The partition key of the comic called `name` (see the module docstring)."""
    check_comic_name(name)
    if len(name) <= PLAIN_KEY_MAX and PLAIN_KEY.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:HASH_DIGITS]
    return f"{_slug(name)}{HASH_SEPARATOR}{digest}"


def is_comic_key(value: object) -> bool:
    """Whether `value` has the shape of a key made by comic_key."""
    return isinstance(value, str) and KEY_PATTERN.fullmatch(value) is not None


def keys_by_name(names) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({key: name}, {key: [names]} of keys two or more names share) for `names`."""
    found: dict[str, list[str]] = {}
    for name in names:
        found.setdefault(comic_key(name), []).append(name)
    unique = {key: group[0] for key, group in found.items() if len(group) == 1}
    shared = {key: group for key, group in found.items() if len(group) > 1}
    return unique, shared


def is_group_name(name: str) -> bool:
    """Whether `name` can be one Zarr group / folder name as it is (one path component that
    readers do not skip, short enough for every filesystem)."""
    return (
        "/" not in name and "\\" not in name and not name.startswith((".", "__"))
        and name == name.strip() and len(name.encode("utf-8")) <= 200
        and not any(unicodedata.category(c) == "Cc" for c in name)
    )

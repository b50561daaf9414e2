"""The message formats of DeepFS's framed protocol, shared by both ends.

Clients and servers import what a message looks like from here and nowhere
else, so a new field (an authenticated handshake, a capability) is added in
one place. Layers, from the bottom:

- ``constants``: numbers both ends agree on (``ROOT_INO``, ``NAME_MAX``,
  ``MISSING_NODE``, the rename flags);
- ``fragment_key`` and ``records``: ``FragmentKey``, ``StripeRecord``, the
  ``attr`` and ``ctx`` maps, each with its wire form;
- ``validate``: field checks, and the one policy for bad input on every
  server (malformed frame: close; unknown op: ENOSYS; bad body: EINVAL);
- ``storage_requests`` and ``metadata_requests``: one validator per op.

Frames themselves (header, msgpack body, payload) are ``deepfs.frames``.
"""

from deepfs.messages.constants import (
    MISSING_NODE,
    NAME_MAX,
    PATH_MAX,
    RENAME_EXCHANGE,
    RENAME_FLAGS,
    RENAME_NOREPLACE,
    ROOT_INO,
    U32_MAX,
    U64_MAX,
)
from deepfs.messages.fragment_key import FragmentKey
from deepfs.messages.records import (
    ATTR_FIELDS,
    BLOCK_UNIT,
    INLINE_FIELD,
    STRIPE_FIELDS,
    Ctx,
    StripeRecord,
    blocks_of_size,
)

__all__ = [
    "ATTR_FIELDS",
    "BLOCK_UNIT",
    "INLINE_FIELD",
    "MISSING_NODE",
    "NAME_MAX",
    "PATH_MAX",
    "RENAME_EXCHANGE",
    "RENAME_FLAGS",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "STRIPE_FIELDS",
    "U32_MAX",
    "U64_MAX",
    "Ctx",
    "FragmentKey",
    "StripeRecord",
    "blocks_of_size",
]

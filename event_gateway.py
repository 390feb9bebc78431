"""A local reference gateway for the PushGo Event API (standard library only).

The Event API tells a channel's devices that something started, changed and
ended: ``POST /event/create``, ``/event/update`` and ``/event/close``.  This
module accepts exactly what the contract accepts, answers exactly what it
answers, and keeps the events in memory so that a test can look at them.

Run it::

    python event_gateway.py              # http://127.0.0.1:6666, the page's example channel
    python event_gateway.py --help

Embed it in a test suite (copy this one file into your project)::

    import event_gateway
    with event_gateway.serve_in_thread() as (url, gateway):
        ...  # point your client at url; look at gateway.events()

Or call the sans-I/O core directly, with no socket at all::

    status, headers, body = event_gateway.EventGateway().handle(
        "POST", "/event/create", {"content-type": "application/json"}, b'{...}')

The contract is SPEC.md; comments of the form "SPEC §2.5" cite its sections.
This is a test double and a readable specification, not a production server.

Reading order: limits, error codes, strict JSON, one ``check_<field>`` per
field rule, the route table, the event store, the core, the HTTP shell, the
test helper and the command line.  ``grep -n '^# .*###' event_gateway.py``
prints the table of contents.
"""

import argparse
import collections
import contextlib
import email.utils
import gc
import hashlib
import hmac
import http
import http.server
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from types import MappingProxyType

__all__ = ["EventGateway", "GatewayError", "make_server", "serve_in_thread", "main"]


# Limits and defaults ###########################################################

MAX_BODY_BYTES = 32768        # SPEC §2.5 (prod): larger bodies get 413 before being read
MAX_JSON_DEPTH = 32           # SPEC §2.6: objects and arrays each count; the top-level object is 1
MAX_INT_DIGITS = 4300         # CPython's own limit since 3.11: parsing longer integers is quadratic
MAX_TOKEN_CHARS = 4096        # SPEC §2.2: longest bearer token accepted
DEFAULT_HOST = "127.0.0.1"    # SPEC §9 (prod's default address)
DEFAULT_PORT = 6666           # SPEC §9 (prod's default address)
DEFAULT_MAX_EVENTS = 100000   # SPEC §7
IDLE_TIMEOUT_S = 5.0          # SPEC §9: a connection with no byte for this long is closed
LISTEN_BACKLOG = 1024         # the stdlib's 5 drops connections under 64 concurrent clients
MAX_FAULT_DELAY_MS = 60000    # this gateway's own bound for POST /__admin/faults delay_ms
MAX_CHUNK_LINE_BYTES = 1024   # longest chunk-size line of a chunked body we read
MAX_HEAD_LINE_BYTES = 65536   # longest request line or header line (the stdlib's limit: 414, 431)
MAX_HEADER_LINES = 100        # most header lines in one request (the stdlib's limit: 431)

# SPEC §9: with no --channel, the public page's example channel, so that its curl example works.
EXAMPLE_CHANNEL_ID = "06J0FZG1Y8XGG14VTQ4Y3G10MR"
EXAMPLE_CHANNEL_PASSWORD = "pass-1234"

# SPEC §4: the field limits, in Unicode characters.
PASSWORD_MIN_CHARS, PASSWORD_MAX_CHARS = 8, 128
OP_ID_MAX_CHARS = 128
THING_ID_MAX_CHARS = 64
EVENT_ID_MAX_CHARS = 64
TITLE_MAX_CHARS = 256          # this gateway's own limit (the page gives none)
DESCRIPTION_MAX_CHARS = 4096   # this gateway's own limit (the page gives none)
STATUS_MAX_CHARS = 24
MESSAGE_MAX_CHARS = 512
SEVERITIES = ("critical", "high", "normal", "low")
UNIX_SECONDS_LIMIT = 10 ** 12  # SPEC §4 event_time: 0 <= t < 10^12 (seconds, not milliseconds)
TAGS_MAX_ITEMS, TAG_MAX_CHARS = 32, 64
IMAGES_MAX_ITEMS, IMAGE_MAX_CHARS = 32, 2048
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 512

# SPEC §4: op_id, thing_id and event_id share one alphabet.
_ID_CHARS = re.compile(r"[A-Za-z0-9_:\-]+")

# SPEC §4 channel_id: Crockford base32 (no I, L, O, U), read leniently, echoed canonically.
CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CROCKFORD_SYMBOLS = 26                                   # 26 x 5 bits = 130 >= 128
_CROCKFORD_VALUE = MappingProxyType({c: i for i, c in enumerate(CROCKFORD_ALPHABET)})
_CROCKFORD_SYMBOL_SET = frozenset(CROCKFORD_ALPHABET)
_CROCKFORD_ALIASES = str.maketrans({"O": "0", "I": "1", "L": "1", "-": None})


# Error codes and messages ######################################################

# Every error code of the contract with its HTTP status, in the order of SPEC §2.
ERRORS = MappingProxyType({
    "route_not_found": 404,                              # §2.1
    "authentication_failed": 401,                        # §2.2 (and injected faults, §8)
    "method_not_allowed": 405,                           # §2.3
    "missing_json_content_type": 400,                    # §2.4
    "payload_too_large": 413,                            # §2.5
    "length_required": 411,                              # §2.5
    "invalid_json_syntax": 400,                          # §2.6
    "invalid_json_data": 400,                            # §2.7, §2.8
    "event_id_forbidden_on_create": 400,                 # §2.9
    "ended_at_forbidden_on_create": 400,
    "event_temporal_fields_forbidden_on_update": 400,
    "started_at_forbidden_on_close": 400,
    "channel_id_required": 400,                          # §2.10
    "invalid_channel_id": 400,
    "password_required": 400,
    "invalid_password": 400,
    "channel_not_found": 404,
    "event_id_required": 400,                            # §2.11
    "event_create_required_fields_missing": 400,
    "event_update_required_fields_missing": 400,
    "event_time_required": 400,
    "invalid_op_id": 400,                                # §2.12, the rows of §4
    "invalid_thing_id": 400,
    "invalid_event_id": 400,
    "invalid_title": 400,
    "invalid_description": 400,
    "invalid_status": 400,
    "invalid_message": 400,
    "invalid_severity": 400,
    "invalid_event_time": 400,
    "invalid_started_at": 400,
    "invalid_ended_at": 400,                             # also §2.14: ended_at before started_at
    "invalid_tags": 400,
    "invalid_images": 400,
    "invalid_attrs": 400,
    "extension_object_arrays_unsupported": 400,
    "extension_object_nested_object_unsupported": 400,
    "extension_object_key_required": 400,
    "invalid_metadata": 400,
    "metadata_value_scalar_required": 400,
    "metadata_key_required": 400,
    "metadata_key_too_long": 400,
    "metadata_key_duplicate": 400,
    "metadata_value_required": 400,
    "metadata_value_too_long": 400,
    "op_id_conflict": 409,                               # §2.13
    "event_not_found": 404,                              # §2.14
    "event_closed": 409,
    "thing_id_mismatch": 409,
    "store_full": 503,                                   # §2.15
    "internal_error": 500,                               # §3 (and injected faults, §8)
    "rate_limited": 429,                                 # §8 injected faults only
    "server_busy": 503,                                  # §8 injected faults only
    # This gateway's own codes (README, "contract"): admin input and broken HTTP framing.
    "invalid_fault": 400,
    "invalid_filter": 400,
    "bad_request": 400,
    "uri_too_long": 414,
    "header_fields_too_large": 431,
    "http_version_not_supported": 505,
})

# SPEC §8: an injected fault answers with the status and the code prod uses for it.
FAULT_CODES = MappingProxyType({
    401: "authentication_failed",
    429: "rate_limited",
    500: "internal_error",
    503: "server_busy",
})

# What the stdlib's HTTP parser reports through send_error(), as our codes.
_SHELL_ERROR_CODES = MappingProxyType({
    400: "bad_request",
    414: "uri_too_long",
    431: "header_fields_too_large",
    505: "http_version_not_supported",
})

_AUTH_CHALLENGE = (("WWW-Authenticate", "Bearer"),)   # SPEC §2.2


class GatewayError(Exception):
    """A request the contract refuses: an error code of ERRORS and one sentence.

    Anything else that escapes while handling a request is a bug in this module
    and becomes ``500 internal_error``.
    """

    def __init__(self, code, message, headers=()):
        super().__init__(message)
        self.code = code
        self.status = ERRORS[code]          # a code missing from ERRORS fails loudly
        self.message = message
        self.headers = tuple(headers)


# The messages take field names and limits, never submitted values, so a
# password or token can never leak into an answer.
def _too_long(field, limit):
    return "%s is too long (max %d characters)" % (field, limit)


def _must_be(field, what):
    return "%s must be %s" % (field, what)


def _required(fields):
    return "missing required field%s: %s" % ("s" if len(fields) > 1 else "", ", ".join(fields))


# Strict JSON and small helpers #################################################

class _DuplicateKey(Exception):
    """An object of the document repeats a key (SPEC §2.7)."""


def _object_without_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _reject_constant(name):
    # SPEC §2.6: NaN, Infinity and -Infinity are not JSON.
    raise ValueError("%s is not allowed in JSON" % name)


def _bounded_int(digits):
    # The same answer on every Python: 3.9 before 3.9.14 parses any length.
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError("integer of more than %d digits" % MAX_INT_DIGITS)
    return int(digits)


# Made once: json.loads() with hooks would build a new decoder for every request.
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                                   parse_constant=_reject_constant, parse_int=_bounded_int)
_REPEATED_KEYS_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_bounded_int)


def _decode_json(decoder, text):
    try:
        return decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError; so are NaN and over-long integers.
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "too deep"
        raise GatewayError("invalid_json_syntax", "body is not valid JSON: %s" % detail) from None


def _nesting_depth(text):
    """The deepest nesting of objects and arrays in a JSON text, strings skipped."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _has_lone_surrogate(value):
    """True when a string anywhere in a parsed document is not valid Unicode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json_body(body):
    """SPEC §2.6 and §2.7: one strict JSON object in UTF-8, or a GatewayError.

    Strict means: valid UTF-8 without a BOM; no NaN or Infinity; no trailing
    data; at most MAX_JSON_DEPTH levels; no lone surrogate escapes; then the
    top level is an object and no object repeats a key.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayError("invalid_json_syntax", "body is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        raise GatewayError("invalid_json_syntax", "body starts with a byte order mark; send plain UTF-8")
    # Fewer brackets than the limit cannot nest deeper than it: the scan is for the rare rest.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _nesting_depth(text) > MAX_JSON_DEPTH:
        raise GatewayError("invalid_json_syntax",
                           "body is nested deeper than %d levels" % MAX_JSON_DEPTH)
    repeated_key = None
    try:
        doc = _decode_json(_STRICT_DECODER, text)
    except _DuplicateKey as duplicate:
        # Any syntax error outranks a repeated key (step 6 before step 7), so parse
        # once more without the check to find one.
        repeated_key = duplicate.args[0]
        doc = _decode_json(_REPEATED_KEYS_DECODER, text)
    if "\\u" in text and _has_lone_surrogate(doc):
        raise GatewayError("invalid_json_syntax", "body has a lone surrogate escape (\\uD800-\\uDFFF)")
    if not isinstance(doc, dict):
        raise GatewayError("invalid_json_data", "body must be a JSON object")
    if repeated_key is not None:
        raise GatewayError("invalid_json_data", "duplicate key `%s` in an object" % repeated_key)
    return doc


def _is_number(value):
    # SPEC §4: JSON true/false is never a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(number):
    # A JSON integer is always finite (and may be too large for math.isfinite); 1e400 is inf.
    return isinstance(number, int) or math.isfinite(number)


def _is_blank(value):
    """SPEC §2.11: absent, null, or a string empty after trimming counts as missing."""
    return value is None or (isinstance(value, str) and not value.strip())


def canonical_channel_id(value):
    """SPEC §4 channel_id: the canonical upper-case Crockford form, or None if malformed."""
    if not isinstance(value, str) or not value.isascii():
        return None
    symbols = "".join(value.split()).upper().translate(_CROCKFORD_ALIASES)
    if len(symbols) != CROCKFORD_SYMBOLS or not _CROCKFORD_SYMBOL_SET.issuperset(symbols):
        return None
    if _CROCKFORD_VALUE[symbols[-1]] & 0b11:    # 130 bits carry 128: the last two must be 0
        return None
    return symbols


def _new_event_id():
    """SPEC §5: event_id = uuid4().hex, made as uuid4() makes it (RFC 9562 §5.4):
    16 random bytes with the version (4) and variant (10) bits set."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()


def _new_hex_id():
    """A 32-char lowercase hex id for generated op_ids and request ids (SPEC §3, §6)."""
    return os.urandom(16).hex()


def _same_secret(given, expected):
    """Constant-time comparison of two strings (SPEC §2.2, §2.10)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


# Field rules ###################################################################
#
# One check_<field>(value) per row of SPEC §4, in the table's order.  Each one
# takes a value that is present and not null (SPEC §4: null is absent), and
# returns it normalised, or None where the rule says the value counts as absent.

def _trimmed_string(field, value, code):
    if not isinstance(value, str):
        raise GatewayError(code, _must_be(field, "a string"))
    return value.strip()


def _identifier(field, value, code, max_chars):
    text = _trimmed_string(field, value, code)
    if len(text) > max_chars:
        raise GatewayError(code, _too_long(field, max_chars))
    if text and not _ID_CHARS.fullmatch(text):
        raise GatewayError(code, _must_be(field, "made of A-Z a-z 0-9 _ : - only"))
    return text


def check_channel_id(value):
    """Required on all routes; Crockford base32 of 128 bits, echoed canonically."""
    canonical = canonical_channel_id(value)
    if canonical is None:
        raise GatewayError("invalid_channel_id", _must_be(
            "channel_id", "26 Crockford base32 symbols (0-9, A-Z without I L O U) encoding 128 bits"))
    return canonical


def check_password(value):
    """Required on all routes; 8-128 characters after trimming."""
    text = _trimmed_string("password", value, "invalid_password")
    if not PASSWORD_MIN_CHARS <= len(text) <= PASSWORD_MAX_CHARS:
        raise GatewayError("invalid_password", _must_be(
            "password", "%d-%d characters" % (PASSWORD_MIN_CHARS, PASSWORD_MAX_CHARS)))
    return text


def check_op_id(value):
    """Optional; 1-128 of A-Z a-z 0-9 _ : -; an empty string is absent."""
    return _identifier("op_id", value, "invalid_op_id", OP_ID_MAX_CHARS) or None


def check_thing_id(value):
    """Optional; 1-64 of A-Z a-z 0-9 _ : -; an empty string is absent."""
    thing_id = _identifier("thing_id", value, "invalid_thing_id", THING_ID_MAX_CHARS)
    return sys.intern(thing_id) if thing_id else None


def check_event_id(value):
    """Required on update and close; 1-64 of A-Z a-z 0-9 _ : -."""
    return _identifier("event_id", value, "invalid_event_id", EVENT_ID_MAX_CHARS)


def _bounded_text(field, value, code, max_chars):
    text = _trimmed_string(field, value, code)
    if not text:
        raise GatewayError(code, _must_be(field, "non-empty"))
    if len(text) > max_chars:
        raise GatewayError(code, _too_long(field, max_chars))
    return text


def check_title(value):
    """Required on create, optional elsewhere; non-empty, at most 256 characters."""
    return _bounded_text("title", value, "invalid_title", TITLE_MAX_CHARS)


def check_description(value):
    """Optional; an empty string is absent; at most 4096 characters."""
    text = _trimmed_string("description", value, "invalid_description")
    if len(text) > DESCRIPTION_MAX_CHARS:
        raise GatewayError("invalid_description", _too_long("description", DESCRIPTION_MAX_CHARS))
    return text or None


def check_status(value):
    """Required on all routes; non-empty, at most 24 characters."""
    return sys.intern(_bounded_text("status", value, "invalid_status", STATUS_MAX_CHARS))


def check_message(value):
    """Required on all routes; non-empty, at most 512 characters."""
    return _bounded_text("message", value, "invalid_message", MESSAGE_MAX_CHARS)


# Each severity is stored as one of these four strings, not a copy per event.
_SEVERITY_NAMES = MappingProxyType({name: name for name in SEVERITIES})


def check_severity(value):
    """Required on all routes; critical, high, normal or low, any case; stored lower-case."""
    severity = _SEVERITY_NAMES.get(_trimmed_string("severity", value, "invalid_severity").lower())
    if severity is None:
        raise GatewayError("invalid_severity", _must_be(
            "severity", "one of critical, high, normal, low"))
    return severity


def _unix_seconds(field, value, code):
    if not _is_number(value):
        raise GatewayError(code, _must_be(field, "a number of Unix seconds"))
    if not _is_finite(value):
        raise GatewayError(code, _must_be(field, "a finite number of Unix seconds"))
    if value < 0:
        raise GatewayError(code, _must_be(field, "Unix seconds, not negative"))
    if value >= UNIX_SECONDS_LIMIT:
        raise GatewayError(code, "%s must be Unix seconds below 10^12; this value looks like "
                                 "milliseconds (divide it by 1000)" % field)
    return value


def check_event_time(value):
    """Required on all routes; Unix seconds, finite, 0 <= t < 10^12."""
    return _unix_seconds("event_time", value, "invalid_event_time")


def check_started_at(value):
    """Create only; like event_time; defaults to event_time."""
    return _unix_seconds("started_at", value, "invalid_started_at")


def check_ended_at(value):
    """Close only; like event_time; defaults to event_time; not before started_at (§5)."""
    return _unix_seconds("ended_at", value, "invalid_ended_at")


def _string_list(field, value, code, max_items, max_chars):
    if not isinstance(value, list):
        raise GatewayError(code, _must_be(field, "an array of strings"))
    if len(value) > max_items:       # counted before de-duplication
        raise GatewayError(code, "%s has too many items (max %d)" % (field, max_items))
    items = []
    for item in value:
        if not isinstance(item, str):
            raise GatewayError(code, _must_be(field, "an array of strings"))
        text = item.strip()
        if not text:
            raise GatewayError(code, "%s items must be non-empty" % field)
        if len(text) > max_chars:
            raise GatewayError(code, "%s items are too long (max %d characters)" % (field, max_chars))
        items.append(text)
    return tuple(dict.fromkeys(items))    # de-duplicated after trim, first order kept


def check_tags(value):
    """Optional; at most 32 strings, each 1-64 characters after trim; de-duplicated."""
    tags = _string_list("tags", value, "invalid_tags", TAGS_MAX_ITEMS, TAG_MAX_CHARS)
    return tuple(map(sys.intern, tags))


def check_images(value):
    """Optional; at most 32 strings, each 1-2048 characters after trim; de-duplicated."""
    return _string_list("images", value, "invalid_images", IMAGES_MAX_ITEMS, IMAGE_MAX_CHARS)


def _is_scalar(value):
    """A JSON string, bool or finite number."""
    return isinstance(value, (str, bool)) or (_is_number(value) and _is_finite(value))


def _check_attrs_entry(key, value, inner):
    if not key.strip():
        raise GatewayError("extension_object_key_required", "attrs keys must be non-empty")
    if isinstance(value, list):
        raise GatewayError("extension_object_arrays_unsupported", "attrs values cannot be arrays")
    if isinstance(value, dict):
        if inner:
            raise GatewayError("extension_object_nested_object_unsupported",
                               "attrs objects cannot hold objects (one level only)")
    elif value is not None and not _is_scalar(value):
        raise GatewayError("invalid_attrs", "attrs numbers must be finite")


def check_attrs(value):
    """Optional object patch: scalar, null (delete) or a one-level object of scalars/null.

    Checked value by value in document order, the outer level before the inner
    objects, so the first violation in that order is the one reported.
    """
    if not isinstance(value, dict):
        raise GatewayError("invalid_attrs", _must_be("attrs", "an object"))
    for key, item in value.items():
        _check_attrs_entry(key, item, inner=False)
    for item in value.values():
        if isinstance(item, dict):
            for key, inner_item in item.items():
                _check_attrs_entry(key, inner_item, inner=True)
    return value      # stored as sent (keys and values are not trimmed)


def _metadata_text(value):
    """The text a metadata value stands for: the trimmed string, or its JSON form."""
    return value.strip() if isinstance(value, str) else json.dumps(value)


def check_metadata(value):
    """Optional object of scalars with short, unique, non-empty keys and values."""
    if not isinstance(value, dict):
        raise GatewayError("invalid_metadata", _must_be("metadata", "an object"))
    seen = set()
    for key, item in value.items():
        if not _is_scalar(item):
            raise GatewayError("metadata_value_scalar_required",
                               "metadata values must be strings, finite numbers or booleans")
        name = key.strip()
        if not name:
            raise GatewayError("metadata_key_required", "metadata keys must be non-empty")
        if len(name) > METADATA_KEY_MAX_CHARS:
            raise GatewayError("metadata_key_too_long",
                               "metadata keys are too long (max %d characters)" % METADATA_KEY_MAX_CHARS)
        if name in seen:
            raise GatewayError("metadata_key_duplicate", "metadata keys must be unique after trimming")
        seen.add(name)
        text = _metadata_text(item)
        if not text:
            raise GatewayError("metadata_value_required", "metadata values must be non-empty")
        if len(text) > METADATA_VALUE_MAX_CHARS:
            raise GatewayError("metadata_value_too_long", "metadata values are too long "
                               "(max %d characters)" % METADATA_VALUE_MAX_CHARS)
    return value      # stored as sent


# SPEC §2.12: the field rules of §4 in the table's order.  channel_id and password
# are checked earlier, at step 10, and so are not in this table.
FIELD_RULES = (
    ("op_id", check_op_id),
    ("thing_id", check_thing_id),
    ("event_id", check_event_id),
    ("title", check_title),
    ("description", check_description),
    ("status", check_status),
    ("message", check_message),
    ("severity", check_severity),
    ("event_time", check_event_time),
    ("started_at", check_started_at),
    ("ended_at", check_ended_at),
    ("tags", check_tags),
    ("images", check_images),
    ("attrs", check_attrs),
    ("metadata", check_metadata),
)

# SPEC §2.8: every field the event routes know; anything else is an unknown field.
EVENT_FIELDS = frozenset(["channel_id", "password"] + [name for name, _ in FIELD_RULES])

# SPEC §5: the business fields an event holds, as shown in a dispatch's "fields".
BUSINESS_FIELDS = ("title", "description", "status", "message", "severity",
                   "tags", "images", "attrs", "started_at", "ended_at")


# Routes ########################################################################

CREATE, UPDATE, CLOSE = "/event/create", "/event/update", "/event/close"
EVENT_ROUTES = (CREATE, UPDATE, CLOSE)

# SPEC §2.9: fields that must be absent (or null) on a route, with the code for each.
FORBIDDEN_FIELDS = MappingProxyType({
    CREATE: (("event_id", "event_id_forbidden_on_create"),
             ("ended_at", "ended_at_forbidden_on_create")),
    UPDATE: (("started_at", "event_temporal_fields_forbidden_on_update"),
             ("ended_at", "event_temporal_fields_forbidden_on_update")),
    CLOSE: (("started_at", "started_at_forbidden_on_close"),),
})

# SPEC §2.11: the hard required business fields, and the code that lists the missing ones.
REQUIRED_FIELDS = MappingProxyType({
    CREATE: (("title", "status", "message", "severity"), "event_create_required_fields_missing"),
    UPDATE: (("status", "message", "severity"), "event_update_required_fields_missing"),
    CLOSE: (("status", "message", "severity"), "event_update_required_fields_missing"),
})

ADMIN_EVENT_PREFIX = "/__admin/events/"

# SPEC §1 and §8: path -> {method: name of the EventGateway method that answers it}.
ROUTES = MappingProxyType({
    CREATE: {"POST": "_route_event_create"},
    UPDATE: {"POST": "_route_event_update"},
    CLOSE: {"POST": "_route_event_close"},
    "/healthz": {"GET": "_route_healthz"},
    "/__admin/events": {"GET": "_route_admin_events_get", "DELETE": "_route_admin_events_delete"},
    ADMIN_EVENT_PREFIX + "{event_id}": {"GET": "_route_admin_event_get"},
    "/__admin/channels": {"GET": "_route_admin_channels_get", "POST": "_route_admin_channels_post"},
    "/__admin/faults": {"GET": "_route_admin_faults_get", "POST": "_route_admin_faults_post",
                        "DELETE": "_route_admin_faults_delete"},
})
PUBLIC_PATHS = frozenset({"/healthz"})      # SPEC §1: liveness never looks at the token
_ALLOW = MappingProxyType({path: ", ".join(sorted(methods)) for path, methods in ROUTES.items()})

# SPEC §2.4: JSON-body routes are the POSTs; these are the fields each admin POST takes.
ADMIN_CHANNEL_FIELDS = frozenset({"channel_id", "password"})
ADMIN_FAULT_FIELDS = frozenset({"route", "status", "count", "delay_ms"})
EVENT_FILTERS = frozenset({"channel_id", "thing_id", "state"})


# Store #########################################################################

# Memory layout.  At rest, an event is a plain tuple of its values in
# EVENT_KEYS order (the SPEC §8 shape): strings, numbers, None, dicts of those
# (attrs), and tuples: tags and images are tuples of strings, a history is a
# tuple of dispatches and a dispatch a plain tuple.  A tuple is smaller than a
# dict (all told, 962 bytes per stored example event, against 1404 with each
# event a dict and each dispatch two nested tuples), and CPython's
# garbage collector stops tracking tuples that hold only untracked values (one
# nesting level per pass), so old events cost it nothing; main() also makes
# full passes rare (see there).  The store unpacks a record into a dict to
# read or change it, and packs it back.
# Labels that repeat from event to event (status, thing_id, tags) are interned
# by their checkers, and a severity is one of four constant strings, so each
# distinct label is stored once, not once per event.  Views copy everything
# out as lists and dicts, so what a caller does with a view never reaches the
# store.

EVENT_KEYS = ("event_id", "channel_id", "thing_id", "state", "title", "description", "status",
              "message", "severity", "tags", "images", "attrs", "started_at", "ended_at",
              "created_at", "updated_at", "history")


def _pack(event):
    """An event dict as the tuple the store keeps."""
    return tuple(map(event.__getitem__, EVENT_KEYS))


def _unpack(record):
    """A stored tuple as an event dict."""
    return dict(zip(EVENT_KEYS, record))


def _copy_json(value):
    """A fresh copy of a stored JSON value, tuples as lists."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_json(item) for item in value]
    return value


def _new_event(event_id, channel_id, thing_id, received_at):
    """SPEC §5: a new event, ongoing, owned by its channel.

    A literal, three times faster than dict.fromkeys(EVENT_KEYS) and an update;
    _pack() reads it by EVENT_KEYS, so a key missing here fails every create."""
    return {"event_id": event_id, "channel_id": channel_id, "thing_id": thing_id,
            "state": "ongoing", "title": None, "description": None, "status": None,
            "message": None, "severity": None, "tags": (), "images": (), "attrs": None,
            "started_at": None, "ended_at": None, "created_at": received_at,
            "updated_at": received_at, "history": ()}


def _merge(event, fields):
    """SPEC §5 merge: given fields replace; attrs is a patch; lists replace whole."""
    for name, value in fields.items():
        if name == "attrs":
            attrs = dict(event["attrs"] or ())
            for key, item in value.items():
                if item is None:
                    attrs.pop(key, None)
                else:
                    attrs[key] = item
            value = attrs
        event[name] = value


# One accepted request of an event's history (SPEC §5), as one flat tuple:
# (route, op_id, event_time, received_at, metadata, then the business fields
# it carried in BUSINESS_FIELDS order, None where it did not carry one).
def _dispatch_view(dispatch):
    route, op_id, event_time, received_at, metadata = dispatch[:5]
    return {"route": route, "op_id": op_id, "event_time": event_time,
            "received_at": received_at,
            "fields": {name: _copy_json(value)
                       for name, value in zip(BUSINESS_FIELDS, dispatch[5:])
                       if value is not None},
            "metadata": _copy_json(metadata)}


def _event_view(event):
    """SPEC §8: an event as the admin routes show it, a copy."""
    view = _copy_json(event)
    view["attrs"] = view["attrs"] or {}
    view["history"] = [_dispatch_view(dispatch) for dispatch in event["history"]]
    return view


# An op_id the gateway generated: the request it names carried no op_id, so a
# request that sends it can never be that request's replay (SPEC §6).
_GENERATED_OP = ("generated", None)


class EventStore:
    """The in-memory events, their op_id records and capacity (SPEC §5, §6, §7).

    One lock guards everything, and dispatch() does SPEC §2 steps 13-16 under
    it, so a request is replayed, refused or applied whole, never half.
    """

    def __init__(self, max_events=DEFAULT_MAX_EVENTS):
        self.max_events = max_events
        self.lock = threading.Lock()
        self._events = {}                          # event_id -> packed event, oldest first
        self._closed = collections.OrderedDict()   # event_id -> None, closed longest ago first
        self._ops = {}                             # channel_id -> {op_id: (digest, body)}

    def __len__(self):
        return len(self._events)

    def dispatch(self, route, channel_id, op_id, digest, fields, received_at):
        """Steps 13-16 for one validated request; returns the 200 body bytes.

        fields holds the request's normalised fields (section 4) and is consumed.
        digest identifies the request's body for op_id replays (section 6).
        """
        with self.lock:
            ops = self._ops.setdefault(channel_id, {})
            # 13. Idempotency: a known op_id replays its answer or conflicts.
            if op_id is not None and op_id in ops:
                known_digest, known_body = ops[op_id]
                if known_digest != digest:
                    raise GatewayError("op_id_conflict", "op_id was already used in this channel "
                                       "for a different request; use a new op_id")
                return known_body
            if op_id is None:
                op_id = _new_hex_id()       # SPEC §6: absent -> generated (digest stays None)
            thing_id = fields.pop("thing_id", None)
            event_time = fields.pop("event_time")
            metadata = fields.pop("metadata", None)
            event_id = fields.pop("event_id", None)
            dispatch = (route, op_id, event_time, received_at, metadata,
                        *map(fields.get, BUSINESS_FIELDS))
            if route == CREATE:
                # 15. Capacity.
                self._make_room()
                event = _new_event(_new_event_id(), channel_id, thing_id, received_at)
                fields.setdefault("started_at", event_time)
            else:
                # 14. Event state.
                event = self._open_event(channel_id, event_id, thing_id)
                if route == CLOSE:
                    fields.setdefault("ended_at", event_time)
                    if fields["ended_at"] < event["started_at"]:
                        raise GatewayError("invalid_ended_at",
                                           "ended_at must not be before the event's started_at")
                    fields["state"] = "closed"
                    self._closed[event["event_id"]] = None
                fields["updated_at"] = received_at
            # 16. Apply, record the op_id and the dispatch, answer.
            _merge(event, fields)
            body = _dispatch_body(channel_id, op_id, event["event_id"], event["thing_id"])
            ops[op_id] = _GENERATED_OP if digest is None else (digest, body)
            event["history"] += (dispatch,)
            self._events[event["event_id"]] = _pack(event)
            return body

    def _open_event(self, channel_id, event_id, thing_id):
        record = self._events.get(event_id)
        event = None if record is None else _unpack(record)
        if event is None or event["channel_id"] != channel_id:
            # SPEC §5: an event of another channel is not found, never revealed.
            raise GatewayError("event_not_found", "no event with this event_id in this channel")
        if event["state"] == "closed":
            raise GatewayError("event_closed", "event is closed; create a new event instead")
        if thing_id is not None and thing_id != event["thing_id"]:
            raise GatewayError("thing_id_mismatch",
                               "thing_id differs from the one the event was created with")
        return event

    def _make_room(self):
        """SPEC §7: drop the event closed longest ago, or refuse when all are open. O(1)."""
        if len(self._events) < self.max_events:
            return
        if not self._closed:
            raise GatewayError("store_full", "event store is full (%d open events); close "
                               "some events or restart with a larger --max-events" % self.max_events)
        self._drop(next(iter(self._closed)))

    def _drop(self, event_id):
        """Remove one event with its op_id records (the lock is held)."""
        event = _unpack(self._events.pop(event_id))
        self._closed.pop(event_id, None)
        ops = self._ops.get(event["channel_id"], {})
        for _route, op_id, *_ in event["history"]:
            ops.pop(op_id, None)

    def clear(self):
        """Drop every event and op_id record; returns how many events there were."""
        with self.lock:
            count = len(self._events)
            self._events.clear()
            self._closed.clear()
            self._ops.clear()
            return count

    def get(self, event_id):
        with self.lock:
            record = self._events.get(event_id)
            return None if record is None else _event_view(_unpack(record))

    def select(self, channel_id=None, thing_id=None, state=None):
        """The events that pass every given filter, oldest first, as views."""
        with self.lock:
            events = map(_unpack, self._events.values())
            return [_event_view(event) for event in events
                    if (channel_id is None or event["channel_id"] == channel_id)
                    and (thing_id is None or event["thing_id"] == thing_id)
                    and (state is None or event["state"] == state)]


def _success_body(data):
    """SPEC §3: the four-key envelope of a success, as bytes."""
    return json.dumps({"success": True, "data": data, "error": None, "error_code": None}).encode()


# SPEC §3: the answer to an accepted dispatch.  Every value in it is an id that
# its rule limits to A-Z a-z 0-9 _ : - (or null), characters JSON never escapes,
# so formatting them into json.dumps' own output gives json.dumps' bytes.
_DISPATCH_TEMPLATE = _success_body({"channel_id": "%s", "op_id": "%s", "event_id": "%s",
                                    "thing_id": "%s", "accepted": True}).decode()
_DISPATCH_TEMPLATE_NO_THING = _success_body({"channel_id": "%s", "op_id": "%s", "event_id": "%s",
                                             "thing_id": None, "accepted": True}).decode()


def _dispatch_body(channel_id, op_id, event_id, thing_id):
    if thing_id is None:
        return (_DISPATCH_TEMPLATE_NO_THING % (channel_id, op_id, event_id)).encode()
    return (_DISPATCH_TEMPLATE % (channel_id, op_id, event_id, thing_id)).encode()


def _error_body(code, message):
    """SPEC §3: the four-key envelope of an error, as bytes."""
    return json.dumps({"success": False, "data": None, "error": message,
                       "error_code": code}).encode()


# Sans-I/O core #################################################################

_CONTENT_LENGTH = re.compile(r"[0-9]+")
_HTTP_VERSION = re.compile(r"HTTP/[0-9]+\.[0-9]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110 token

# A queued fault (SPEC §8): its route ("*" for any event route), status, strikes
# left and delay.
Fault = collections.namedtuple("Fault", "route status count delay_ms")


def _lower_headers(headers):
    """Header names lower-cased once; accepts a mapping or (name, value) pairs."""
    items = headers.items() if hasattr(headers, "items") else headers
    return {name.lower(): value for name, value in items}


def _declared_length(headers):
    """The body length a request head declares: 0 for a chunked body (decoded up
    to the limit by the shell), None for none, 0 for a malformed Content-Length
    (the shell refuses it before asking)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return 0
    declared = headers.get("content-length")
    if declared is None:
        return None
    declared = declared.strip()
    return int(declared) if _CONTENT_LENGTH.fullmatch(declared) else 0


def _printable(text):
    """A path or method safe to write on one log line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _admin_event_id(path):
    """The {event_id} of /__admin/events/{event_id}, or None for any other path."""
    if path.startswith(ADMIN_EVENT_PREFIX):
        event_id = path[len(ADMIN_EVENT_PREFIX):]
        if event_id and "/" not in event_id:
            return event_id
    return None


def _request_digest(route, doc):
    """What makes two requests "the same" for op_id replays (SPEC §6): route and parsed body."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(("%s\n%s" % (route, canonical)).encode("ascii")).digest()


class EventGateway:
    """The gateway's logic with no I/O: handle() maps one request to one response.

    token       gateway bearer token, or None for no auth (SPEC §2.2)
    channels    {channel_id: password}; None registers the page's example channel
    max_events  store capacity (SPEC §7)
    clock       returns the receive time in Unix seconds (tests pin it)
    log         a text stream for one line per request, or None for silence
    """

    def __init__(self, token=None, channels=None, max_events=DEFAULT_MAX_EVENTS,
                 clock=time.time, log=None):
        if channels is None:
            channels = {EXAMPLE_CHANNEL_ID: EXAMPLE_CHANNEL_PASSWORD}
        self.token = token
        self.store = EventStore(max_events)
        self.clock = clock
        self.log = log
        self.internal_errors = []       # tracebacks of unexpected exceptions (a 500 each)
        self._channels = {}
        for channel_id, password in channels.items():
            self.register_channel(channel_id, password)
        self._faults = []               # [Fault] in queue order, count = strikes left
        self._faults_lock = threading.Lock()
        self._routes = {path: {method: getattr(self, name) for method, name in methods.items()}
                        for path, methods in ROUTES.items()}

    # -- the embedding API ---------------------------------------------------------

    def register_channel(self, channel_id, password):
        """Add a channel, or replace its password; returns the canonical id."""
        channel_id = check_channel_id(channel_id)
        self._channels[channel_id] = check_password(password)
        return channel_id

    def channel_ids(self):
        return list(self._channels)

    def events(self, channel_id=None, thing_id=None, state=None):
        """The stored events, oldest first, in the shape of SPEC §8."""
        return self.store.select(channel_id, thing_id, state)

    def event(self, event_id):
        """One stored event in the shape of SPEC §8, or None."""
        return self.store.get(event_id)

    def reset(self):
        """What DELETE /__admin/events does: drop every event and op_id record."""
        return self.store.clear()

    def add_fault(self, route, status, count=1, delay_ms=0):
        """What POST /__admin/faults does, with the same checks; returns strikes queued.

        count and delay_ms may be None, meaning their defaults (as null in JSON)."""
        fault = self._check_fault({"route": route, "status": status, "count": count,
                                   "delay_ms": delay_ms})
        with self._faults_lock:
            self._faults.append(fault)
            return sum(f.count for f in self._faults)

    def faults(self):
        with self._faults_lock:
            return [fault._asdict() for fault in self._faults]

    def clear_faults(self):
        """What DELETE /__admin/faults does; returns how many strikes were left."""
        with self._faults_lock:
            cleared = sum(f.count for f in self._faults)
            self._faults.clear()
            return cleared

    # -- one request -----------------------------------------------------------------

    def handle(self, method, path, headers, body):
        """SPEC §2 for one request; returns (status, [(header, value)], body bytes).

        headers is a mapping or (name, value) pairs, names in any case.  body is
        the request body as bytes, or None when the request had neither a
        Content-Length nor a chunked body.  A query string is ignored except on
        GET /__admin/events.
        """
        started = time.perf_counter() if self.log is not None else 0.0
        try:
            status, extra, payload, code = 200, (), self._serve(method, path, headers, body), None
        except GatewayError as error:
            status, extra, code = error.status, error.headers, error.code
            payload = _error_body(error.code, error.message)
        except Exception:       # a bug in this module: answer 500 and keep serving
            trace = traceback.format_exc()
            self.internal_errors.append(trace)
            if self.log is not None:
                self.log.write(trace)
            status, extra, code = 500, (), "internal_error"
            payload = _error_body(code, "internal error in the gateway; see its log")
        return self._finish(method, path, status, extra, payload, code, started)

    def check_head(self, method, path, headers):
        """Steps 1-5 of SPEC §2 from the request head alone, before any body is read.

        Returns None when the body should be read and handle() called, or the
        final answer to send instead (status, headers, body), which may be an
        injected fault.  The HTTP shell calls it for a declared body over
        MAX_BODY_BYTES, so as to answer without reading it, and for "Expect:
        100-continue", so as to send the final answer instead of 100.
        """
        started = time.perf_counter()
        try:
            headers = _lower_headers(headers)
            self._steps_before_body(method, path.split("?", 1)[0], headers)
            self._check_body_size(method, _declared_length(headers))
            return None
        except GatewayError as error:
            payload = _error_body(error.code, error.message)
            return self._finish(method, path, error.status, error.headers, payload, error.code,
                                started)

    def refuse(self, code, message, method="-", path="-"):
        """An error answer that the HTTP shell decides itself (broken HTTP framing)."""
        error = GatewayError(code, message)
        return self._finish(method, path, error.status, (), _error_body(code, message), code,
                            time.perf_counter())

    def _finish(self, method, path, status, extra, payload, code, started):
        request_id = _new_hex_id()
        if self.log is not None:
            self.log.write("%s %s %d %s %.1fms %s\n" % (
                _printable(method), _printable(path.split("?", 1)[0]), status, code or "-",
                (time.perf_counter() - started) * 1000, request_id))
            self.log.flush()
        headers = [("Content-Type", "application/json"), ("X-Request-Id", request_id)]
        headers.extend(extra)
        return status, headers, payload

    def _serve(self, method, path, headers, body):
        """SPEC §2, steps 1 to 16, first failure wins; returns the 200 body bytes."""
        headers = _lower_headers(headers)
        path, _, query = path.partition("?")
        route = self._steps_before_body(method, path, headers)
        if method != "POST":
            result = route(path, query, None)
        else:
            # 5. Body size.
            self._check_body_size(method, None if body is None else len(body))
            # 6-7. Strict JSON, an object, no duplicate keys.
            doc = parse_json_body(body)
            # 8-16 are the route's.
            result = route(path, query, doc)
        return result if isinstance(result, bytes) else _success_body(result)

    def _steps_before_body(self, method, path, headers):
        """Steps 1-4 and injected faults; returns the route's handler."""
        # Steps 1-3: route, gateway auth, method.
        route = self._check_route_auth_method(method, path, headers)
        # SPEC §8: a queued fault strikes here, before the body is looked at.
        if path in EVENT_ROUTES and self._faults:
            self._strike_fault(path)
        # 4. Content-Type, on the routes that take a JSON body.
        if method == "POST":
            self._check_content_type(headers)
        return route

    def _check_route_auth_method(self, method, path, headers):
        """Steps 1-3; returns the route's handler."""
        # 1. Unknown path (no auth needed to learn this).
        key = path if path in self._routes else None
        if key is None and _admin_event_id(path) is not None:
            key = ADMIN_EVENT_PREFIX + "{event_id}"
        if key is None:
            raise GatewayError("route_not_found", "no route %s; the event routes are "
                               "POST /event/create, /event/update and /event/close" % path[:100])
        # 2. Gateway auth, when enabled.
        if self.token is not None and key not in PUBLIC_PATHS:
            self._check_token(headers.get("authorization"))
        # 3. Method.
        handler = self._routes[key].get(method)
        if handler is None:
            raise GatewayError("method_not_allowed", "%s takes %s" % (key, _ALLOW[key]),
                               headers=[("Allow", _ALLOW[key])])
        return handler

    def _check_token(self, authorization):
        """SPEC §2.2: exactly "Bearer <token>", compared in constant time."""
        parts = (authorization or "").split(" ")
        if (len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1]
                or len(parts[1]) > MAX_TOKEN_CHARS or not _same_secret(parts[1], self.token)):
            raise GatewayError("authentication_failed", "send the gateway token as "
                               "'Authorization: Bearer <token>'", headers=_AUTH_CHALLENGE)

    @staticmethod
    def _check_content_type(headers):
        """SPEC §2.4: application/json, parameters allowed, any case."""
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise GatewayError("missing_json_content_type",
                               "Content-Type must be application/json")

    @staticmethod
    def _check_body_size(method, length):
        """SPEC §2.5: a POST with no body length (411), or a body too large (413).

        length is None when the request has neither Content-Length nor a
        chunked body; a body of any method over the limit is refused.
        """
        if length is None:
            if method == "POST":
                raise GatewayError("length_required", "send the body with a Content-Length "
                                   "header or chunked transfer encoding")
        elif length > MAX_BODY_BYTES:
            raise GatewayError("payload_too_large",
                               "body is larger than %d bytes" % MAX_BODY_BYTES)

    def _strike_fault(self, path):
        with self._faults_lock:
            for index, fault in enumerate(self._faults):
                if fault.route in (path, "*"):
                    if fault.count > 1:
                        self._faults[index] = fault._replace(count=fault.count - 1)
                    else:
                        del self._faults[index]
                    break
            else:
                return
        if fault.delay_ms:
            time.sleep(fault.delay_ms / 1000)
        raise GatewayError(FAULT_CODES[fault.status], "injected fault: this request was "
                           "failed on purpose by POST /__admin/faults",
                           headers=_AUTH_CHALLENGE if fault.status == 401 else ())

    # -- the event routes (SPEC §2, steps 8-16) -------------------------------------

    def _route_event_create(self, path, query, doc):
        return self._event_request(CREATE, doc)

    def _route_event_update(self, path, query, doc):
        return self._event_request(UPDATE, doc)

    def _route_event_close(self, path, query, doc):
        return self._event_request(CLOSE, doc)

    def _event_request(self, route, doc):
        # 8. Unknown fields: the first in sorted order is named.
        if not EVENT_FIELDS.issuperset(doc):
            _reject_unknown(doc, EVENT_FIELDS)
        # 9. Fields forbidden on this route.
        for field, code in FORBIDDEN_FIELDS[route]:
            if doc.get(field) is not None:
                raise GatewayError(code, "%s is not allowed on %s" % (field, route))
        # 10. Channel credentials.
        channel_id = self._authenticate_channel(doc)
        # 11. Required fields.
        if route != CREATE and _is_blank(doc.get("event_id")):
            raise GatewayError("event_id_required", _required(["event_id"]))
        names, code = REQUIRED_FIELDS[route]
        missing = [name for name in names if _is_blank(doc.get(name))]
        if missing:
            raise GatewayError(code, _required(missing))
        if _is_blank(doc.get("event_time")):
            raise GatewayError("event_time_required", _required(["event_time"]))
        # 12. Field rules, in the order of SPEC §4.
        fields = {}
        for name, check in FIELD_RULES:
            value = doc.get(name)
            if value is not None:
                value = check(value)
                if value is not None:
                    fields[name] = value
        # 13-16 happen under the store's lock.
        op_id = fields.pop("op_id", None)
        digest = None if op_id is None else _request_digest(route, doc)
        return self.store.dispatch(route, channel_id, op_id, digest, fields, self.clock())

    def _credentials(self, doc):
        """SPEC §2.10: channel_id then password, each required and well-formed."""
        if _is_blank(doc.get("channel_id")):
            raise GatewayError("channel_id_required", _required(["channel_id"]))
        channel_id = check_channel_id(doc["channel_id"])
        if _is_blank(doc.get("password")):
            raise GatewayError("password_required", _required(["password"]))
        return channel_id, check_password(doc["password"])

    def _authenticate_channel(self, doc):
        channel_id, password = self._credentials(doc)
        expected = self._channels.get(channel_id)
        # Unknown channel and wrong password are one answer: no oracle for which.
        if expected is None or not _same_secret(password, expected):
            raise GatewayError("channel_not_found", "no channel with this channel_id and password")
        return sys.intern(channel_id)       # stored with each event: one copy, not one per event

    # -- liveness and the test-support routes (SPEC §1, §8) --------------------------

    def _route_healthz(self, path, query, doc):
        return {"status": "ok"}

    def _route_admin_events_get(self, path, query, doc):
        filters = {}
        for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if name not in EVENT_FILTERS:
                raise GatewayError("invalid_filter", "unknown filter `%s`; use channel_id, "
                                   "thing_id or state" % name[:64])
            filters[name] = value
        if "channel_id" in filters:
            filters["channel_id"] = canonical_channel_id(filters["channel_id"])
            if filters["channel_id"] is None:
                raise GatewayError("invalid_filter", "channel_id filter is not a channel id")
        if filters.get("state", "ongoing") not in ("ongoing", "closed"):
            raise GatewayError("invalid_filter", "state filter must be ongoing or closed")
        return {"events": self.events(**filters)}

    def _route_admin_event_get(self, path, query, doc):
        event = self.event(_admin_event_id(path))
        if event is None:
            raise GatewayError("event_not_found", "no event with this event_id")
        return event

    def _route_admin_events_delete(self, path, query, doc):
        return {"deleted": self.reset()}

    def _route_admin_channels_get(self, path, query, doc):
        return {"channels": self.channel_ids()}

    def _route_admin_channels_post(self, path, query, doc):
        _reject_unknown(doc, ADMIN_CHANNEL_FIELDS)
        channel_id, password = self._credentials(doc)
        return {"channel_id": self.register_channel(channel_id, password)}

    def _route_admin_faults_get(self, path, query, doc):
        return {"faults": self.faults()}

    def _route_admin_faults_post(self, path, query, doc):
        _reject_unknown(doc, ADMIN_FAULT_FIELDS)
        return {"queued": self.add_fault(doc.get("route"), doc.get("status"), doc.get("count"),
                                         doc.get("delay_ms"))}

    def _route_admin_faults_delete(self, path, query, doc):
        return {"cleared": self.clear_faults()}

    @staticmethod
    def _check_fault(doc):
        route, status = doc.get("route"), doc.get("status")
        count = 1 if doc.get("count") is None else doc["count"]
        delay_ms = 0 if doc.get("delay_ms") is None else doc["delay_ms"]
        if route not in EVENT_ROUTES + ("*",):
            raise GatewayError("invalid_fault", "route must be /event/create, /event/update, "
                               "/event/close or *")
        if not _is_number(status) or status not in FAULT_CODES:
            raise GatewayError("invalid_fault", "status must be 401, 429, 500 or 503")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise GatewayError("invalid_fault", "count must be a whole number of at least 1")
        if (not isinstance(delay_ms, int) or isinstance(delay_ms, bool)
                or not 0 <= delay_ms <= MAX_FAULT_DELAY_MS):
            raise GatewayError("invalid_fault",
                               "delay_ms must be a whole number from 0 to %d" % MAX_FAULT_DELAY_MS)
        return Fault(route, int(status), count, delay_ms)


def _reject_unknown(doc, known):
    """SPEC §2.8 for the admin POSTs."""
    unknown = doc.keys() - known
    if unknown:
        raise GatewayError("invalid_json_data", "unknown field `%s`" % min(unknown))


# HTTP shell ####################################################################

_REASONS = MappingProxyType({status.value: status.phrase for status in http.HTTPStatus})

# Fixed sentences for what the stdlib's parser refuses (never the submitted bytes).
_SHELL_MESSAGES = MappingProxyType({
    "bad_request": "malformed HTTP request",
    "uri_too_long": "request line is too long",
    "header_fields_too_large": "too many header lines, or one too long",
    "http_version_not_supported": "HTTP version not supported; use HTTP/1.1",
})


class _BadFraming(Exception):
    """The request's body framing (Content-Length, chunked) is broken."""


def _framing(transfer_encoding, content_length):
    """(Content-Length or None, chunked?) of a request, or _BadFraming."""
    if transfer_encoding is not None:
        if transfer_encoding.lower() != "chunked":
            raise _BadFraming("Transfer-Encoding must be chunked")
        if content_length is not None:
            raise _BadFraming("send Content-Length or chunked encoding, not both")
        return None, True
    if content_length is None:
        return None, False
    lengths = set(value.strip() for value in content_length.split(","))
    if len(lengths) > 1:
        raise _BadFraming("conflicting Content-Length headers")
    length = lengths.pop()
    if not _CONTENT_LENGTH.fullmatch(length):
        raise _BadFraming("Content-Length must be a whole number of bytes")
    return int(length), False


def _tokens(value):
    """The lower-cased tokens of a comma-separated header value."""
    return {token.strip().lower() for token in value.split(",")}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Moves bytes between a socket and EventGateway; decides nothing of the contract.

    What it overrides of the stdlib and why: its own request-head reader
    (parse_request, see there); HTTP/1.1 keep-alive and an idle timeout (setup);
    every method reaches the gateway (no HTML 501); send_error() sends
    the JSON envelope; Expect: 100-continue runs the gateway's pre-body checks;
    one write per response (two writes cost ~40 ms with Nagle and delayed ACK);
    no stdlib logging (the gateway logs one line per request).
    """

    protocol_version = "HTTP/1.1"
    server_version = "event_gateway/1"
    sys_version = ""
    disable_nagle_algorithm = True

    def parse_request(self):
        """Read the request line and header lines; False when answered or gone.

        This replaces the stdlib's parser, which builds an email.message.Message
        for every request (about 15 us, a fifth of a request's time here) where
        the gateway needs a dict.  What it accepts: "METHOD TARGET HTTP/1.0" or
        "HTTP/1.1" separated by single spaces, then "name: value" lines, at most
        MAX_HEADER_LINES of at most MAX_HEAD_LINE_BYTES each.  self.headers is a
        dict of lower-cased names; a repeated name's values are joined with ", "
        as RFC 9110 §5.3 allows.  Then keep-alive and Expect are decided.
        """
        self.command = None
        self.request_version = "HTTP/1.1"     # what an answer sent before the version says
        self.close_connection = True
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) != 3 or not all(words):
            self.send_error(400)
            return False
        method, target, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505 if _HTTP_VERSION.fullmatch(version) else 400)
            return False
        self.command, self.path, self.request_version = method, target, version
        headers = {}
        for _ in range(MAX_HEADER_LINES + 1):
            line = self.rfile.readline(MAX_HEAD_LINE_BYTES + 1)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                return False                   # the client went away mid-head
            if len(line) > MAX_HEAD_LINE_BYTES:
                self.send_error(431)
                return False
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                self.send_error(400)
                return False
            name, value = name.lower(), value.strip()
            headers[name] = headers[name] + ", " + value if name in headers else value
        else:
            self.send_error(431)
            return False
        self.headers = headers
        connection = _tokens(headers.get("connection", ""))
        if version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        if version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def setup(self):
        self.timeout = self.server.idle_timeout     # StreamRequestHandler applies it per recv
        super().setup()

    def __getattr__(self, name):
        # The stdlib answers a method with no do_<METHOD> with an HTML 501; here
        # every method (PUT, PATCH, BREW...) reaches the gateway, which says 405.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def _serve(self):
        gateway = self.server.gateway
        headers = self.headers
        try:
            length, chunked = _framing(headers.get("transfer-encoding"),
                                       headers.get("content-length"))
        except _BadFraming as problem:
            self.close_connection = True
            self._send(gateway.refuse("bad_request", str(problem), self.command, self.path))
            return
        if length is not None and length > MAX_BODY_BYTES:
            # Refuse before reading (413, or whatever comes first in SPEC §2); the
            # unread body makes the connection unusable.  Any smaller body is read,
            # and handle() runs the same steps with it.
            refusal = gateway.check_head(self.command, self.path, headers)
            if refusal is not None:
                self.close_connection = True
                self._send(refusal)
                return
        if chunked:
            try:
                body = self._read_chunked()
            except _BadFraming as problem:
                self.close_connection = True
                self._send(gateway.refuse("bad_request", str(problem), self.command, self.path))
                return
        elif length is None:
            body = None
        else:
            body = self.rfile.read(length)
        if body is not None and len(body) < (length or 0):
            self.close_connection = True    # the client went away mid-body: nothing to answer
            return
        if body is not None and len(body) > MAX_BODY_BYTES:
            self.close_connection = True    # the rest of a chunked body is left unread
        self._send(gateway.handle(self.command, self.path, headers, body))

    def _read_chunked(self):
        """A chunked body, decoded up to one byte over MAX_BODY_BYTES."""
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE_BYTES)
            if not line.endswith(b"\n"):
                raise _BadFraming("chunk size line is missing or too long")
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise _BadFraming("chunk size must be hexadecimal")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY_BYTES:
                return bytes(body) + b"\0" * (MAX_BODY_BYTES + 1 - len(body))
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.readline(MAX_CHUNK_LINE_BYTES).strip():
                raise _BadFraming("chunk is shorter than its size")
            body += chunk
        while self.rfile.readline(MAX_CHUNK_LINE_BYTES).strip():
            pass        # trailer fields, ignored
        return bytes(body)

    def handle_expect_100(self):
        # Refuse before the client sends the body (SPEC §9: curl sends Expect for > 1 KiB).
        refusal = self.server.gateway.check_head(self.command, self.path, self.headers)
        if refusal is None:
            return super().handle_expect_100()
        self.close_connection = True
        self._send(refusal)
        return False

    def send_error(self, code, message=None, explain=None):
        # The stdlib's parser calls this for a broken request line or headers.
        error_code = _SHELL_ERROR_CODES.get(code, "bad_request")
        self.close_connection = True
        self._send(self.server.gateway.refuse(error_code, _SHELL_MESSAGES[error_code],
                                              self.command or "-", getattr(self, "path", "-")))

    def _send(self, response):
        """The whole response in one write."""
        status, headers, body = response
        head = ["%s %d %s\r\n" % (self.protocol_version, status, _REASONS.get(status, ""))]
        head.extend("%s: %s\r\n" % pair for pair in headers)
        head.append("Content-Length: %d\r\nDate: %s\r\nServer: %s\r\n"
                    % (len(body), self.server.http_date(), self.server_version))
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        self.wfile.write(data if self.command == "HEAD" else data + body)

    def log_message(self, format, *args):
        pass    # the gateway writes the one log line per request


class _Server(http.server.ThreadingHTTPServer):
    """A thread per connection (daemon threads), so a slow client stalls nobody."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, gateway, idle_timeout):
        self.gateway = gateway
        self.idle_timeout = idle_timeout
        self._date = (0, "")
        super().__init__(address, _Handler)

    def http_date(self):
        """The Date header's value, formatted once per second rather than per response."""
        now = int(time.time())
        second, text = self._date
        if second != now:
            text = email.utils.formatdate(now, usegmt=True)
            self._date = (now, text)
        return text

    def server_bind(self):
        # The stdlib's server_bind() asks DNS for the host's name; we need only the port.
        socketserver_bind = http.server.socketserver.TCPServer.server_bind
        socketserver_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # A client that resets or times out its connection is no error of ours.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        self.gateway.internal_errors.append(traceback.format_exc())
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(gateway, host=DEFAULT_HOST, port=DEFAULT_PORT, idle_timeout=IDLE_TIMEOUT_S):
    """A listening (not yet serving) HTTP server for gateway; .url is its base URL."""
    server_class = _Server6 if ":" in host else _Server
    server = server_class((host, port), gateway, idle_timeout)
    bound_host, bound_port = server.server_address[:2]
    server.url = "http://%s:%d" % ("[%s]" % bound_host if ":" in bound_host else bound_host,
                                   bound_port)
    return server


# Test support ##################################################################

Served = collections.namedtuple("Served", "url gateway")


@contextlib.contextmanager
def serve_in_thread(gateway=None, host=DEFAULT_HOST, port=0, idle_timeout=IDLE_TIMEOUT_S):
    """Serve gateway on a background thread; yields Served(url, gateway).

    The socket listens before this yields, so no readiness poll is needed; the
    server is stopped and its socket closed on exit, also when the block raised.
    """
    if gateway is None:
        gateway = EventGateway()
    server = make_server(gateway, host, port, idle_timeout)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="event-gateway %s" % server.url, daemon=True)
    thread.start()
    try:
        yield Served(server.url, gateway)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# Command line ##################################################################

def build_parser():
    parser = argparse.ArgumentParser(
        prog="event_gateway.py",
        description="A local PushGo Event API gateway for testing clients: POST /event/create, "
                    "/event/update and /event/close, events kept in memory, inspectable under "
                    "/__admin/. Not a production server.",
        epilog="Example: python event_gateway.py --port 0 --channel "
               "06J0FZG1Y8XGG14VTQ4Y3G10MR:pass-1234 --token secret")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one and prints it "
                             "(default %(default)s)")
    parser.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' (default: env PUSHGO_TOKEN; "
                             "none = auth off)")
    parser.add_argument("--channel", action="append", metavar="ID:PASSWORD", default=[],
                        help="register a channel (repeatable; default: the API page's example "
                             "channel %s with password %s)"
                             % (EXAMPLE_CHANNEL_ID, EXAMPLE_CHANNEL_PASSWORD))
    parser.add_argument("--max-events", type=int, default=DEFAULT_MAX_EVENTS,
                        help="events kept in memory; closed ones are dropped first "
                             "(default %(default)s)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S,
                        help="seconds without a byte before a connection is closed "
                             "(default %(default)s)")
    parser.add_argument("--quiet", action="store_true",
                        help="no request log lines (and no start-up line unless --port 0)")
    return parser


def _parse_channels(parser, specs):
    channels = {}
    for spec in specs:
        channel_id, sep, password = spec.partition(":")
        try:
            if not sep:
                raise GatewayError("invalid_password", "missing :PASSWORD")
            canonical = check_channel_id(channel_id)     # the id first, as in SPEC §2.10
            channels[canonical] = check_password(password)
        except GatewayError as error:
            # The message names the rule, never the password.
            parser.error("--channel %s:...: %s" % (channel_id[:40], error.message))
    return channels or None


def main(argv=None):
    """Run the gateway until Ctrl-C or SIGTERM; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.token if args.token is not None else os.environ.get("PUSHGO_TOKEN") or None
    if token is not None and (not token or len(token) > MAX_TOKEN_CHARS
                              or any(c.isspace() for c in token)):
        parser.error("the token must be 1-%d characters with no spaces" % MAX_TOKEN_CHARS)
    if args.max_events < 1:
        parser.error("--max-events must be at least 1")
    if not args.idle_timeout > 0:
        parser.error("--idle-timeout must be a positive number of seconds")
    channels = _parse_channels(parser, args.channel)
    gateway = EventGateway(token=token, channels=channels, max_events=args.max_events,
                           log=None if args.quiet else sys.stderr)
    try:
        server = make_server(gateway, args.host, args.port, args.idle_timeout)
    except OSError as error:
        print("event_gateway: cannot listen on %s:%d: %s (try another --port, or --port 0)"
              % (args.host, args.port, error.strerror or error), file=sys.stderr)
        return 1

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    # The store keeps up to --max-events events for the life of the process, and
    # a full pass of the garbage collector walks all of them and its large dicts:
    # with the default thresholds one came every few thousand creates, a 10-25 ms
    # pause each, more often and longer as the store grew.  The gateway makes no
    # reference cycles that outlive a request, so full passes are made rare
    # (after 1000 middle-generation passes instead of 10), and the objects of
    # start-up are frozen out of them.  Young objects are collected as usual.
    # Only main() does this: it owns the process; an embedding test suite does not.
    gc.freeze()
    gc.set_threshold(700, 10, 1000)
    if not args.quiet or args.port == 0:
        print("event_gateway: listening on %s (auth %s; channels: %s); Ctrl-C to stop"
              % (server.url, "on" if token else "off", ", ".join(gateway.channel_ids())),
              flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

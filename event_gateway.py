"""A local reference gateway for the PushGo Event API (standard library only).

The Event API tells a channel's devices that something started, changed and
ended: ``POST /event/create``, ``/event/update`` and ``/event/close``.  This
module accepts exactly what the production gateway accepts and the public API
page documents, answers as they answer, and keeps the events in memory so that
a test can look at them.  A client that passes here must not fail against
production, and a client that follows the public page must not be refused
here.  This is a test double and a readable specification, not a production
server.

Run it::

    python event_gateway.py              # http://127.0.0.1:6666/, the page's example channel
    python event_gateway.py --help

and, for the live page (the last section of this module), start it on a port
that browsers allow, such as --port 8666 (they refuse 6666), and open
http://127.0.0.1:8666/ to watch requests and events arrive.

Embed it in a test suite (copy this one file into your project)::

    import event_gateway
    with event_gateway.serve_in_thread() as (url, gateway):
        ...  # point your client at url; then gateway.wait_for_events(count=1)

Or call the sans-I/O core directly, with no socket at all::

    status, headers, body = event_gateway.EventGateway().handle(
        "POST", "/event/create", {"content-type": "application/json"}, b'{...}')

The processing order.  Every request goes through these steps; the first
that fails answers, and comments below cite them as "step N".  Where the two
production lines differ (1.2 and 1.3: --gateway-version), the steps read the
line's record in LINES:

 1. Unknown path: 404 route_not_found (no token needed to learn this).  The
    routes of one line only (ROUTES' line_field) are unknown paths in the other.
 1a. Local safety, on the page and /__admin/ only: a Host that is not an IP
    literal, localhost, *.localhost or an allowed name: 403 host_not_allowed
    (DNS rebinding); under /__admin/, a request another web site made a
    browser send (a foreign Origin, Sec-Fetch-Site cross-site or same-site):
    403 cross_site_request.
 2. Gateway token, when one is set: 401 authentication_failed.
 2a. Line 1.3 without a token, an event route: production's rate limit per
    calendar minute (Line.rate_limit), counted once the method passed step 3:
    429 rate_limited with rate_limit=True, else a note in the journal.
 3. Method other than the route's: 405 method_not_allowed, with Allow and no
    body.  (A queued fault strikes here, after step 3: see "Faults".)
 4. Content-Type other than application/json on a route that takes JSON:
    400 missing_json_content_type.
 5. No body length: 411 length_required; a body over MAX_BODY_BYTES:
    413 payload_too_large, decided from the head before the body is read.
 6. Not one strict JSON document in UTF-8: 400 invalid_json_syntax.
 7. Not an object, or an object that repeats a key: 400 invalid_json_data.
 8. Unknown fields: 400 invalid_json_data, naming every one (line 1.2), or
    ignored and noted (line 1.3).
 8a. A thing-scoped route (line 1.3): the path's thing by the thing_id rule,
    and a body thing_id that differs from it: 400 thing_id_mismatch.
 9. A field the route forbids (FORBIDDEN_FIELDS).
10. Channel credentials: channel_id, then password, then the lookup:
    404 channel_not_found for an unknown channel, 403 password_mismatch for
    a known one with another password.
11. Required fields: event_id, then the route's REQUIRED_FIELDS, then
    event_time; the first missing one's code, every missing one named.
12. The field rules (FIELD_RULES, one check_<field> each), in table order.
13. Idempotency: a known op_id replays its answer or conflicts (409).
14. Event state: 404 event_not_found, 409 event_closed, 409
    thing_id_mismatch, 400 invalid_ended_at.
15. Store capacity (max_events, and the store-wide bound max_store_mb): room
    is made by dropping closed events, then the oldest updates; a create that
    cannot find room is 503 store_full.
16. Apply atomically and answer 200.

Every answer is JSON in production's form: a success is {"success": true,
"data": ...} without null keys; an error is {"success": false, "error",
"error_code", "problem"} with problem localized by Accept-Language
(PROBLEM_CATEGORIES, PROBLEM_SENTENCES, LOCALE_PREFIXES; _error_body), and a
405 has no body.

Comparing with another gateway: --record FILE (or record=, recording(),
GET /__admin/requests?format=jsonl) writes a client's traffic without its
secrets, and ``python event_gateway.py compare RECORDING --url URL`` (or
--gateway-version for the other line, in process) replays it and says of
each answer that differs whether the contract states it (STATED_REASONS) or
something drifted.

Reading order: limits, the production lines (and the reasons two gateways may
differ), error codes, the envelope, strict JSON, the field rules, the route
table, the event store, the request journal, the channels, the faults, the core
(one request's steps 1-12 in order, with a map), the OpenAPI description, the
HTTP shell, the test helper, comparing with another gateway, the command line
and, last, the live page.
``grep -n '^# .*###' event_gateway.py`` prints the table of contents.
"""

import argparse
import base64
import collections
import contextlib
import difflib
import errno
import email.utils
import functools
import gc
import hashlib
import hmac
import http
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import math
import operator
import os
import platform
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from types import MappingProxyType

__all__ = ["EventGateway", "GatewayError", "LINES", "make_server", "serve_in_thread", "main"]

# A change that a client sees changes this version (semantic versioning).
__version__ = "3.2.1"


# Limits and defaults ###########################################################
#
# "prod" marks a figure that both production lines share (LINES: 1.2 and 1.3),
# "the page" one from the public API page; the rest are this gateway's own.

MAX_BODY_BYTES = 32768        # step 5 (prod's limit): a larger body is 413 here, refused unread
MAX_JSON_DEPTH = 32           # step 6: objects and arrays each count; the top-level object is 1
MAX_INT_DIGITS = 4300         # CPython's own limit since 3.11: parsing longer integers is quadratic
MAX_TOKEN_CHARS = 4096        # step 2: longest bearer token accepted
DEFAULT_HOST = "127.0.0.1"    # prod's default address
DEFAULT_PORT = 6666           # prod's default address
DEFAULT_MAX_EVENTS = 100000   # events kept; closed ones are dropped first (Store)
DEFAULT_MAX_HISTORY = 1000    # dispatches kept per event, the create included (Store)
DEFAULT_MAX_STORE_MB = 256    # the store's memory as a whole, in MiB (Store, "the bound")
# What the store-wide bound counts besides request bodies, measured with tracemalloc
# on CPython 3.11 and rounded up: an update with an op_id takes its body's size
# plus 690-730 bytes (its tuple, its op_id and send-status records, its place in
# the eviction order); a create of the page's example (248 bytes) 1105 bytes in
# all, which the bound counts as about 1650: 300 + 800 + 248 twice (its body stands
# for the event's first fields and for its create), and the slack below.
STORE_DISPATCH_OVERHEAD_BYTES = 800
STORE_EVENT_OVERHEAD_BYTES = 300
# The process's resident memory holds more than the objects themselves: under a
# soak of 16 KB updates it stood 8% above what tracemalloc counted, and more as
# the journal's bodies came and went beside the store's (the memory allocator's
# free space between large strings).  A body counts a quarter more.
STORE_BODY_SLACK = 4
DEFAULT_MAX_REQUESTS = 1000   # entries kept by the request journal; 0 turns it off
MAX_CHANNELS = 10000          # registered channels, the start-up ones included
MAX_FAULTS = 1000             # queued fault entries
MAX_LABELS = 10000            # distinct labels kept as one shared copy each (_shared_label)
IDLE_TIMEOUT_S = 5.0          # a connection with no byte for this long is closed
MAX_IDLE_TIMEOUT_S = 3600     # the longest --idle-timeout accepted
LISTEN_BACKLOG = 1024         # the stdlib's 5 drops connections under 64 concurrent clients
ACCEPT_BACKOFF_S = 0.1        # pause before accepting again when out of file descriptors
STOP_GRACE_S = 2.0            # a stopping server lets a request under way answer this long
MAX_FAULT_DELAY_MS = 60000    # longest delay_ms of a queued fault
MAX_RETRY_AFTER_S = 3600      # longest retry_after_s of a queued fault
MAX_WAIT_MS = 30000           # longest ?wait_ms= of the admin lists
MAX_WAIT_COUNT = 1000         # largest ?count= of the admin lists
MAX_CHUNK_LINE_BYTES = 1024   # longest chunk-size line of a chunked body we read
MAX_HEAD_LINE_BYTES = 65536   # longest request line or header line (the stdlib's limit: 414, 431)
MAX_HEADER_LINES = 100        # most header lines in one request (the stdlib's limit: 431)
MAX_HEAD_BYTES = 131072       # all header lines of one request together (431), so that the
                              # journal's worst case is bounded (Request journal)
MAX_LOG_LINE_CHARS = 400      # one request's log line is cut to this length
# Chrome and Firefox refuse to load pages from these ports (ERR_UNSAFE_PORT), prod's
# default 6666 among them (IRC's ports): the start-up line says so, for the live page.
BROWSER_REFUSED_PORTS = frozenset({6000, 6566, 6665, 6666, 6667, 6668, 6669, 6697})
OWS = " \t"                   # the only optional whitespace of HTTP (RFC 9110 5.6.3)

# With no --channel, the public page's example channel, so that its curl example works.
EXAMPLE_CHANNEL_ID = "06J0FZG1Y8XGG14VTQ4Y3G10MR"
EXAMPLE_CHANNEL_PASSWORD = "pass-1234"

# Send status (GET /send_status/{op_id}, line 1.3) and production's rate limit (line 1.3).
SEND_STATUSES = ("accepted", "processing", "provider_queued", "sent", "partially_failed",
                 "failed")                                # prod's statuses of a dispatch
SEND_STATUS_DEFAULT = "sent"     # this gateway delivers nothing: accepted means sent
SEND_STATUS_RETENTION_MS = 30 * 24 * 3600 * 1000          # prod's default: 30 days
RATE_LIMIT_PER_IP = 60           # prod 1.3: requests per client IP per calendar minute
RATE_LIMIT_TOTAL = 1200          # prod 1.3: requests in all per calendar minute

# The field limits (FIELD_RULES).  _CHARS limits count Unicode characters, _BYTES
# limits count the UTF-8 bytes of the trimmed text, as production counts them.
PASSWORD_MIN_BYTES, PASSWORD_MAX_BYTES = 8, 128          # the page, counted as prod counts
OP_ID_MAX_CHARS = 128
THING_ID_MAX_CHARS = 64
EVENT_ID_MAX_CHARS = 64
TITLE_MAX_CHARS = 256          # this gateway's own limit (the page gives none)
DESCRIPTION_MAX_CHARS = 4096   # this gateway's own limit (the page gives none)
STATUS_MAX_CHARS = 24          # the page
MESSAGE_MAX_CHARS = 512        # the page
SEVERITIES = ("critical", "high", "normal", "low")
TAGS_MAX_ITEMS, TAG_MAX_BYTES = 32, 64                   # the page, counted as prod counts
IMAGES_MAX_ITEMS, IMAGE_MAX_BYTES = 32, 2048             # the page, counted as prod counts
METADATA_KEY_MAX_BYTES = 64                              # the page, counted as prod counts
METADATA_VALUE_MAX_BYTES = 512                           # the page, counted as prod counts

# Timestamps (event_time, started_at, ended_at) are whole numbers, as prod parses
# them; prod tells the unit by size.  All are kept as integer Unix milliseconds.
SECONDS_BELOW = 10 ** 12       # 0 <= t < 10^12: Unix seconds (the seed page's unit)
MILLISECONDS_BELOW = 10 ** 14  # 10^12 <= t < 10^14: Unix milliseconds (today's page)
MICROSECONDS_BELOW = 10 ** 17  # only for the message: what a larger number probably is

# op_id, thing_id and event_id share one alphabet (FIELD_RULES).
_ID_CHARS = re.compile(r"[A-Za-z0-9_:\-]+")

# channel_id: Crockford base32 (no I, L, O, U), read leniently, echoed canonically.
CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CROCKFORD_SYMBOLS = 26                                   # 26 x 5 bits = 130 >= 128
_CROCKFORD_VALUE = MappingProxyType({c: i for i, c in enumerate(CROCKFORD_ALPHABET)})
_CROCKFORD_SYMBOL_SET = frozenset(CROCKFORD_ALPHABET)
_CROCKFORD_ALIASES = str.maketrans({"O": "0", "I": "1", "L": "1", "-": None})
# The canonical form itself: 25 symbols, then one whose value ends in two 0 bits.
_CANONICAL_CHANNEL_ID = re.compile("[%s]{%d}[%s]" % (
    CROCKFORD_ALPHABET, CROCKFORD_SYMBOLS - 1, CROCKFORD_ALPHABET[::4]))


# Production lines ##############################################################
#
# Clients meet two lines of the production gateway, and this gateway answers as
# either (--gateway-version, default 1.3).  Where the two differ is this one
# record; the steps read self.line.<field> and never test the version itself.
# A reader compares the lines by reading the two rows of LINES.

# The page's rules that production 1.3 no longer checks (its source no longer
# checks status, message and severity for presence, length or value, nor tags,
# images and attrs, takes images/attrs null as absent, and ignores started_at on
# update and close), by the code this gateway still refuses with, and what the
# journal's note names.  Line 1.3's lenient_codes are this table's codes.
LENIENT_RULES_1_3 = MappingProxyType({
    "invalid_status": "status", "invalid_message": "message", "invalid_severity": "severity",
    "invalid_tags": "tags", "invalid_images": "images", "invalid_attrs": "attrs",
    "extension_object_arrays_unsupported": "attrs",
    "extension_object_nested_object_unsupported": "attrs",
    "extension_object_key_required": "attrs",
    "started_at_forbidden_on_close": "started_at on close (it ignores it)",
    "event_temporal_fields_forbidden_on_update": "started_at on update (it ignores it)",
    "event_create_required_fields_missing": "status, message and severity for presence",
    "event_update_required_fields_missing": "status, message and severity for presence",
})


Line = collections.namedtuple("Line", (
    "name",                  # "1.2" or "1.3"
    "releases",              # the production releases the line stands for
    "thing_routes",          # V1: POST /thing/{thing_id}/event/create|update|close served
    "send_status_route",     # V2: GET /send_status/{op_id} served
    "success_keys",          # V3: the keys of an event route's success data, in order
    "op_id_time_prefix",     # V4: a generated op_id starts with the receive time in ms, as hex
    "ignore_unknown_fields", # V5: unknown top-level fields ignored (noted), not refused
    "op_id_conflict",        # V6: the code of an op_id reused with another body
    "locales",               # V7: the locales of problem.localized_message
    "rate_limit",            # V8: (per client IP, in all) per calendar minute without a token
    "refuse_null_ended_at",  # V9: ended_at on create and update refused even as null
    "lenient_codes",         # refusals of the page's rules that the line's production no
                             # longer makes: this gateway still refuses, and notes it
    "refuses_client_op_id",  # the line's production refuses an op_id a client sends on an
                             # event route: this gateway keeps the page's rule, and notes it
))

LINES = MappingProxyType({
    "1.2": Line(
        name="1.2", releases="v1.2.9",
        thing_routes=False,                # 404 route_not_found
        send_status_route=False,           # 404 route_not_found
        success_keys=("channel_id", "op_id", "event_id", "thing_id", "accepted"),
        op_id_time_prefix=False,           # 32 lowercase hex
        ignore_unknown_fields=False,       # 400 invalid_json_data, naming each
        op_id_conflict="op_id_conflict",   # this gateway's code (prod replays the first answer)
        locales=("en", "zh-CN"),
        rate_limit=None,                   # none
        refuse_null_ended_at=False,        # ended_at: null counts as absent
        lenient_codes=frozenset(),
        refuses_client_op_id=False,
    ),
    "1.3": Line(
        name="1.3", releases="v1.3.0-v1.3.3",
        thing_routes=True,
        send_status_route=True,
        success_keys=("op_id", "event_id"),
        op_id_time_prefix=True,            # 13 hex digits of Unix ms, "-", 32 hex: 46 chars
        ignore_unknown_fields=True,        # not checked, stored or shown; the journal notes them
        op_id_conflict="op_id_payload_conflict",
        locales=("en", "zh-CN", "zh-TW"),
        rate_limit=(RATE_LIMIT_PER_IP, RATE_LIMIT_TOTAL),
        refuse_null_ended_at=True,         # prod 1.3 refuses the key whatever its value
        lenient_codes=frozenset(LENIENT_RULES_1_3),
        # prod 1.3's event normalisation refuses a client op_id (400 op_id_not_allowed);
        # the page documents op_id as the client's idempotency key.
        refuses_client_op_id=True,
    ),
})
DEFAULT_LINE = "1.3"


def _lenient_rule(code, doc):
    """What the line's production would not have checked in this refusal, or None
    when it would have refused the request too."""
    if code.endswith("_required_fields_missing"):
        if _is_blank(doc.get("event_time")):
            return None                     # production refuses a missing event_time
        if code.startswith("event_update") or not _is_blank(doc.get("title")):
            return LENIENT_RULES_1_3[code]     # only status, message or severity are missing
        return None
    if code == "event_temporal_fields_forbidden_on_update" and "ended_at" in doc:
        return None                         # ended_at is refused by production too
    return LENIENT_RULES_1_3[code]


# Why production 1.3 would refuse a request, by the arguments _RateCounter.over() gives.
RATE_LIMIT_REASONS = MappingProxyType({
    2: "over %d requests from %s this minute",      # (the per-IP count, the client)
    1: "over %d requests in all this minute",        # (the total count,)
})


class _RateCounter:
    """Production 1.3's rate limit (step 2a): requests per client IP and in all,
    per calendar minute (Unix seconds // 60).  A request over either count is
    refused by production and not counted.  One counter per client IP seen this
    minute, all dropped when the minute turns: O(1) per request, and bounded by
    the clients of one minute."""

    def __init__(self, per_ip, total):
        self.per_ip, self.total = per_ip, total
        self._lock = threading.Lock()
        self._minute = None
        self._by_ip = {}
        self._all = 0
        self._notes = {}        # client -> its note this minute, made once, not per request

    def over(self, client, now_ms):
        """Count one request; None, or why production would refuse it (not counted),
        as a note of the journal: ("rate_limit", the arguments of a
        RATE_LIMIT_REASONS sentence)."""
        minute = now_ms // 60000
        with self._lock:
            if minute != self._minute:
                self._minute, self._by_ip, self._all, self._notes = minute, {}, 0, {}
            from_ip = self._by_ip.get(client, 0)
            if from_ip >= self.per_ip:
                note = self._notes.get(client)
                if note is None:
                    note = self._notes[client] = ("rate_limit", self.per_ip,
                                                  client or "this client")
                return note
            if self._all >= self.total:
                return ("rate_limit", self.total)
            self._by_ip[client] = from_ip + 1
            self._all += 1
            return None

    def clear(self):
        with self._lock:
            self._minute, self._by_ip, self._all = None, {}, 0


# Where two gateways may answer the same request differently, and this contract
# says so: the reasons `compare` gives a disagreement (the section "Comparing with
# another gateway" judges them).
# A reason explains a disagreement when each condition it sets holds:
#   across_lines  the recording's line and the target's differ (rows V1-V9 above);
#   target_line   the target answers as this line;
#   kinds         the disagreement is of one of these kinds;
#   side, codes   the recorded answer's error_code ("recorded"), the target's
#                 ("target"), or either one's, is one of codes;
#   path          the request's path matches this regex;
#   places        every place where the two bodies or headers differ matches it;
#   fault         a queued fault struck the recorded exchange.
Reason = collections.namedtuple("Reason", (
    "name", "says", "across_lines", "target_line", "kinds", "side", "codes", "path",
    "places", "fault"))

_REFUSALS = frozenset({"target_accepts", "target_refuses", "status", "code"})
_ANY_KIND = _REFUSALS | {"shape", "no_answer"}


def _reason(name, says, across_lines=False, target_line=None, kinds=_REFUSALS, side="either",
            codes=None, path=None, places=None, fault=False):
    return Reason(name, says, across_lines, target_line, frozenset(kinds), side,
                  None if codes is None else frozenset(codes), path, places, fault)


STATED_REASONS = (
    _reason("V1", "thing-scoped routes: line 1.2 has none", across_lines=True,
            codes={"route_not_found"}, path="^/thing/"),
    _reason("V2", "GET /send_status: line 1.2 has none", across_lines=True,
            codes={"route_not_found"}, path="^/send_status/"),
    _reason("V3", "the keys of a success's data differ by line", across_lines=True,
            kinds={"shape"}, places="^/data/(channel_id|thing_id|accepted)$"),
    _reason("V4", "a generated op_id has each line's form", across_lines=True,
            kinds={"shape"}, places="^/data/op_id$"),
    _reason("V5", "line 1.2 refuses an unknown field, line 1.3 ignores it", across_lines=True,
            codes={"invalid_json_data"}),
    _reason("V6", "the code of an op_id reused with another body differs by line",
            across_lines=True, kinds={"code"}, codes={"op_id_conflict", "op_id_payload_conflict"}),
    _reason("V7", "zh-TW is a locale of line 1.3 only", across_lines=True, kinds={"shape"},
            places="^(/problem/locale|/headers/content-language)$"),
    _reason("V8", "line 1.3 has a rate limit without a token", across_lines=True,
            codes={"rate_limited"}),
    _reason("V9", "line 1.3 refuses ended_at: null", across_lines=True,
            codes={"ended_at_forbidden_on_create", "event_temporal_fields_forbidden_on_update"}),
    _reason("lenient", "a rule of the page that production 1.3 no longer checks",
            target_line="1.3", kinds={"target_accepts"}, side="recorded",
            codes=LINES["1.3"].lenient_codes),
    _reason("client_op_id", "production 1.3 refuses a client op_id; the page documents it",
            target_line="1.3", side="target", codes={"op_id_not_allowed"}),
    _reason("lifecycle", "this gateway's store: production keeps no events",
            kinds={"target_accepts"}, side="recorded",
            codes={"event_not_found", "event_closed", "thing_id_mismatch"}),
    _reason("op_id_conflict", "line 1.2's conflict code: production replays the first answer",
            kinds={"target_accepts"}, side="recorded", codes={"op_id_conflict"}),
    _reason("capacity", "this gateway's bounds (max_events, the store's memory)",
            codes={"store_full"}),
    _reason("fault", "a queued fault struck the recorded exchange", kinds=_ANY_KIND,
            fault=True),
    _reason("specific_code", "this gateway's code is more specific than production's",
            kinds={"code"}, side="target",
            codes={"invalid_json_data", "validation_failed", "invalid_request_body"}),
    _reason("head_413", "a body over the limit is 413 here, 400 invalid_request_body there",
            kinds={"status"}, side="recorded", codes={"payload_too_large"}),
)


# Error codes and messages ######################################################

# Every error code with its HTTP status, in the order of the processing steps.
ERRORS = MappingProxyType({
    "route_not_found": 404,                              # step 1
    "host_not_allowed": 403,                             # step 1a: local safety
    "cross_site_request": 403,
    "authentication_failed": 401,                        # step 2 (and injected faults)
    "method_not_allowed": 405,                           # step 3
    "missing_json_content_type": 400,                    # step 4
    "payload_too_large": 413,                            # step 5
    "length_required": 411,                              # step 5
    "invalid_json_syntax": 400,                          # step 6
    "invalid_json_data": 400,                            # steps 7 and 8
    "event_id_forbidden_on_create": 400,                 # step 9
    "ended_at_forbidden_on_create": 400,
    "event_temporal_fields_forbidden_on_update": 400,
    "started_at_forbidden_on_close": 400,
    "channel_id_required": 400,                          # step 10
    "invalid_channel_id": 400,
    "password_required": 400,
    "invalid_password": 400,
    "channel_not_found": 404,
    "password_mismatch": 403,                            # step 10: a known channel, another password
    "event_id_required": 400,                            # step 11
    "event_create_required_fields_missing": 400,
    "event_update_required_fields_missing": 400,
    "event_time_required": 400,
    "invalid_op_id": 400,                                # step 12, the rows of FIELD_RULES
    "invalid_thing_id": 400,
    "invalid_ciphertext": 400,
    "invalid_event_id": 400,
    "invalid_title": 400,
    "invalid_description": 400,
    "invalid_status": 400,
    "invalid_message": 400,
    "invalid_severity": 400,
    "invalid_event_time": 400,
    "invalid_started_at": 400,
    "invalid_ended_at": 400,                             # also step 14: ended_at before started_at
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
    "op_id_conflict": 409,                               # step 13 (line 1.2)
    "op_id_payload_conflict": 409,                       # step 13 (line 1.3)
    "event_not_found": 404,                              # step 14
    "event_closed": 409,
    "thing_id_mismatch": 409,                            # (400 at step 8a: the path's thing)
    "send_status_not_found": 404,                        # GET /send_status/{op_id}
    "store_full": 503,                                   # step 15
    "internal_error": 500,                               # a bug (and injected faults)
    "rate_limited": 429,                                 # step 2a (line 1.3) and injected faults
    "server_busy": 503,                                  # injected faults only
    "too_many_channels": 409,                            # MAX_CHANNELS (test-support routes)
    "too_many_faults": 409,                              # MAX_FAULTS (test-support routes)
    # This gateway's own codes: the test-support routes' input and broken HTTP framing.
    "invalid_fault": 400,
    "invalid_filter": 400,
    "bad_request": 400,
    "uri_too_long": 414,
    "header_fields_too_large": 431,
    "http_version_not_supported": 505,
})

# Production's error answers carry a "problem": the code's category, whether a
# retry can help, and a sentence in the client's language (Accept-Language).
# Every code of ERRORS is in one row here; a test checks it.
PROBLEM_CATEGORIES = (
    # (category, retryable, the codes of that row): one category may take two rows.
    ("validation", False, tuple(code for code, status in ERRORS.items()
                                if status in (400, 405, 411, 413, 414, 431, 505))),
    ("auth", False, ("authentication_failed",)),
    ("permission", False, ("host_not_allowed", "cross_site_request")),
    ("conflict", False, ("password_mismatch", "op_id_conflict", "op_id_payload_conflict",
                         "event_closed", "thing_id_mismatch", "too_many_channels",
                         "too_many_faults")),
    ("not_found", False, ("route_not_found", "channel_not_found", "event_not_found",
                          "send_status_not_found")),
    ("rate_limit", True, ("rate_limited",)),
    ("too_busy", True, ("server_busy",)),
    ("too_busy", False, ("store_full",)),       # retrying does not help until events close
    ("internal", True, ("internal_error",)),
)
# One code, two statuses: step 8a refuses a body whose thing_id contradicts the
# path's with 400, a validation as production's 8a names it; the store refuses an
# update naming another thing than the event's with 409, a conflict (step 14).
# (code, status) -> the category of that status's row.
SECOND_STATUSES = MappingProxyType({("thing_id_mismatch", 400): "validation"})

# (code, status) -> (category, retryable)
_PROBLEM_OF = MappingProxyType(dict(
    [((code, ERRORS[code]), (category, retryable))
     for category, retryable, codes in PROBLEM_CATEGORIES for code in codes]
    + [(code_status, next((category, retryable) for category, retryable, _ in PROBLEM_CATEGORIES
                          if category == row))
       for code_status, row in SECOND_STATUSES.items()]))

# problem.title per category and locale: a short label.
PROBLEM_TITLES = MappingProxyType({
    "validation": {"en": "Validation failed", "zh-CN": "请求校验失败", "zh-TW": "請求驗證失敗"},
    "auth": {"en": "Authentication failed", "zh-CN": "认证失败", "zh-TW": "驗證失敗"},
    "permission": {"en": "Not allowed", "zh-CN": "不允许", "zh-TW": "不允許"},
    "conflict": {"en": "Conflict", "zh-CN": "冲突", "zh-TW": "衝突"},
    "not_found": {"en": "Not found", "zh-CN": "未找到", "zh-TW": "找不到"},
    "rate_limit": {"en": "Too many requests", "zh-CN": "请求过于频繁", "zh-TW": "請求過於頻繁"},
    "too_busy": {"en": "Server busy", "zh-CN": "服务器繁忙", "zh-TW": "伺服器忙碌"},
    "internal": {"en": "Internal error", "zh-CN": "内部错误", "zh-TW": "內部錯誤"},
})

# problem.localized_message: one sentence per code where the code has its own,
# else per category.  This gateway's own texts: clients must not parse them.
PROBLEM_SENTENCES = MappingProxyType({
    "validation": {"en": "The request is invalid. Check the fields and send it again.",
                   "zh-CN": "请求无效，请检查字段后重新发送。",
                   "zh-TW": "請求無效，請檢查欄位後重新傳送。"},
    "auth": {"en": "The gateway token is missing or wrong.",
             "zh-CN": "网关令牌缺失或错误。", "zh-TW": "閘道權杖缺少或錯誤。"},
    "permission": {"en": "This request is not allowed here.",
                   "zh-CN": "此处不允许该请求。", "zh-TW": "此處不允許此請求。"},
    "conflict": {"en": "The request conflicts with what the gateway already holds.",
                 "zh-CN": "请求与网关现有数据冲突。", "zh-TW": "請求與閘道現有資料衝突。"},
    "not_found": {"en": "What the request names was not found.",
                  "zh-CN": "请求指定的对象不存在。", "zh-TW": "請求指定的對象不存在。"},
    "rate_limit": {"en": "Too many requests. Wait a minute and try again.",
                   "zh-CN": "请求过于频繁，请稍后再试。", "zh-TW": "請求過於頻繁，請稍後再試。"},
    "too_busy": {"en": "The gateway is busy. Try again later.",
                 "zh-CN": "网关繁忙，请稍后再试。", "zh-TW": "閘道忙碌，請稍後再試。"},
    "internal": {"en": "Something went wrong in the gateway. Try again later.",
                 "zh-CN": "网关内部出错，请稍后再试。", "zh-TW": "閘道內部出錯，請稍後再試。"},
    "password_mismatch": {"en": "The channel password is wrong.",
                          "zh-CN": "频道密码错误。", "zh-TW": "頻道密碼錯誤。"},
    "channel_not_found": {"en": "No such channel. Check the channel ID.",
                          "zh-CN": "频道不存在，请检查频道 ID。",
                          "zh-TW": "頻道不存在，請檢查頻道 ID。"},
    "event_not_found": {"en": "No such event in this channel.",
                        "zh-CN": "此频道中没有该事件。", "zh-TW": "此頻道中沒有該事件。"},
    "event_closed": {"en": "The event is closed. Create a new event instead.",
                     "zh-CN": "事件已关闭，请创建新事件。", "zh-TW": "事件已關閉，請建立新事件。"},
    "store_full": {"en": "The gateway holds too many open events. Close some first.",
                   "zh-CN": "网关中未关闭的事件过多，请先关闭一些。",
                   "zh-TW": "閘道中未關閉的事件過多，請先關閉一些。"},
    "payload_too_large": {"en": "The request body is too large.",
                          "zh-CN": "请求体过大。", "zh-TW": "請求內容過大。"},
})

# Accept-Language: the first part (weights ignored) that names a known locale
# wins; a part names a locale by its lower-cased start.  "zh_cn" is not among
# them, as in production, and falls through to the next part.
LOCALE_PREFIXES = (
    ("zh-TW", ("zh-tw", "zh_tw", "zh-hk", "zh_hk", "zh-mo", "zh_mo", "zh-hant", "zh_hant")),
    ("zh-CN", ("zh-cn", "zh-sg", "zh_sg", "zh-hans", "zh_hans")),
    ("en", ("en-", "en_")),
)
LOCALE_WHOLE = MappingProxyType({"zh": "zh-CN", "en": "en"})

# An injected fault of kind "status" answers with the code prod uses for its status.
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

_AUTH_CHALLENGE = (("WWW-Authenticate", "Bearer"),)   # step 2


class GatewayError(Exception):
    """A request the contract refuses: an error code of ERRORS and one sentence.

    Anything else that escapes while handling a request is a bug in this module
    and becomes ``500 internal_error``.
    """

    def __init__(self, code, message, headers=(), status=None):
        super().__init__(message)
        self.code = code
        self.status = ERRORS[code] if status is None else status   # a code missing from
                                                                    # ERRORS fails loudly
        self.message = message
        self.headers = tuple(headers)


# The messages take field names and limits, never submitted values, so a
# password or token can never leak into an answer.
def _too_long(field, limit):
    return "%s is too long (max %d characters)" % (field, limit)


def _too_long_bytes(where, text, limit):
    """An item over its limit in UTF-8 bytes, named by where it is and how it starts
    (tags, images and metadata hold no secrets), with its size and the limit."""
    start = text if len(text) <= 24 else text[:21] + "..."
    return "%s (`%s`) is %d bytes of UTF-8, over the limit of %d" % (
        where, _printable(start), _utf8_bytes(text), limit)


def _must_be(field, what):
    return "%s must be %s" % (field, what)


def _required(fields):
    return "missing required field%s: %s" % ("s" if len(fields) > 1 else "", ", ".join(fields))


# The envelope #################################################################
#
# Every answer of the event routes and the test-support routes is JSON in
# production's envelope: a success is {"success": true, "data": ...}; an error
# {"success": false, "error", "error_code", "problem"}, problem in the
# client's locale.  Both are made from templates built once, at import.

def _success_body(data):
    """A success envelope, as bytes: exactly "success" and "data"."""
    return json.dumps({"success": True, "data": data}).encode()


def _success_templates(line):
    """The two templates of an accepted dispatch's answer in line: (with a thing,
    without).  Every value in them is an id that its rule limits to A-Z a-z 0-9
    _ : -, characters JSON never escapes, so formatting the ids into json.dumps'
    own output gives json.dumps' bytes.  Production leaves a null thing_id out."""
    with_thing = {key: True if key == "accepted" else "%s" for key in line.success_keys}
    without = {key: value for key, value in with_thing.items() if key != "thing_id"}
    return _success_body(with_thing).decode(), _success_body(without).decode()


# The ids an answer's templates take, in the order of their "%s": picked out of
# (channel_id, op_id, event_id, thing_id) in one step.  Every line's answer names
# two ids or more, so an itemgetter always gives a tuple.
_ANSWER_IDS = ("channel_id", "op_id", "event_id", "thing_id")


def _success_template_ids(line):
    """(with a thing, without): the ids each of the line's templates takes, as getters."""
    keys = [key for key in line.success_keys if key in _ANSWER_IDS]
    return tuple(operator.itemgetter(*map(_ANSWER_IDS.index, chosen))
                 for chosen in (keys, [key for key in keys if key != "thing_id"]))


def _locale(accept_language, locales):
    """The answer's locale for an Accept-Language header: its parts split on ",",
    weights ignored, the first part that names one of locales (LOCALE_WHOLE,
    LOCALE_PREFIXES) wins; none -> en."""
    for part in (accept_language or "").split(","):
        tag = part.split(";", 1)[0].strip(OWS).lower()
        named = LOCALE_WHOLE.get(tag)
        if named is None:
            named = next((locale for locale, starts in LOCALE_PREFIXES
                          if tag.startswith(starts)), None)
        if named in locales:
            return named
    return "en"


def _error_template(code, status, locale):
    """The error envelope of code at status in locale as a %-template of (message,
    status, message, request_id part): everything but those is fixed, so it is made once."""
    category, retryable = _PROBLEM_OF[code, status]
    sentences = PROBLEM_SENTENCES.get(code) or PROBLEM_SENTENCES[category]

    def fixed(value):
        return json.dumps(value, ensure_ascii=False).replace("%", "%%")
    return ('{"success": false, "error": %%s, "error_code": %s, "problem": {"code": %s, '
            '"category": %s, "status": %%d, "title": %s, "detail": %%s, '
            '"localized_message": %s, "locale": %s, "retryable": %s%%s}}' % (
                fixed(code), fixed(code), fixed(category),
                fixed(PROBLEM_TITLES[category][locale]), fixed(sentences[locale]),
                fixed(locale), "true" if retryable else "false"))


# Made once, at import: every code at each of its statuses, in every locale.
_ERROR_TEMPLATES = MappingProxyType({
    (code, status, locale): _error_template(code, status, locale)
    for code, status in _PROBLEM_OF for locale in PROBLEM_TITLES["validation"]})


def _error_body(code, message, status, locale="en", request_id=None):
    """The error envelope, as bytes: success, error, error_code and problem (no data)."""
    text = json.dumps(message, ensure_ascii=False)
    request_part = "" if request_id is None else ', "request_id": "%s"' % request_id
    return (_ERROR_TEMPLATES[code, status, locale] % (text, status, text, request_part)).encode()


# Strict JSON and small helpers #################################################

class _DuplicateKey(Exception):
    """An object of the document repeats a key (step 7)."""


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
    # Step 6: NaN, Infinity and -Infinity are not JSON.
    raise ValueError("%s is not allowed in JSON" % name)


def _bounded_int(digits):
    # The same answer on every Python: 3.9 before 3.9.14 parses any length.
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError("integer of more than %d digits" % MAX_INT_DIGITS)
    return int(digits)


def _finite_or_text(digits):
    # What the journal shows of a number a double cannot hold (1e400, which the
    # field rules refuse): the number as sent, as a string, since Infinity is not JSON.
    number = float(digits)
    return number if math.isfinite(number) else digits


# Made once: json.loads() with hooks would build a new decoder for every request.
# The first pair checks a request; the second reads a journaled body for showing.
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                                   parse_constant=_reject_constant, parse_int=_bounded_int)
_REPEATED_KEYS_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_bounded_int)
_SHOWN_DECODERS = (
    json.JSONDecoder(object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant,
                     parse_int=_bounded_int, parse_float=_finite_or_text),
    json.JSONDecoder(parse_constant=_reject_constant, parse_int=_bounded_int,
                     parse_float=_finite_or_text))


def _decode_json(decoder, text):
    try:
        return decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError; so are NaN and over-long integers.
        if isinstance(exc, json.JSONDecodeError):
            detail = "%s at line %d, column %d" % (exc.msg, exc.lineno, exc.colno)
        else:
            detail = str(exc) or "too deep"
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


def parse_json_body(body, decoders=(_STRICT_DECODER, _REPEATED_KEYS_DECODER)):
    """Steps 6 and 7: one strict JSON object in UTF-8, or a GatewayError.

    Strict means: valid UTF-8 without a BOM; no NaN or Infinity; no trailing
    data; at most MAX_JSON_DEPTH levels; no lone surrogate escapes; then the
    top level is an object and no object repeats a key.  The journal passes
    _SHOWN_DECODERS, which keep a number too large for a double as its text.
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
        doc = _decode_json(decoders[0], text)
    except _DuplicateKey as duplicate:
        # Any syntax error outranks a repeated key (step 6 before step 7), so parse
        # once more without the check to find one.
        repeated_key = duplicate.args[0]
        doc = _decode_json(decoders[1], text)
    if "\\u" in text and _has_lone_surrogate(doc):
        raise GatewayError("invalid_json_syntax", "body has a lone surrogate escape (\\uD800-\\uDFFF)")
    if not isinstance(doc, dict):
        raise GatewayError("invalid_json_data", "body must be a JSON object")
    if repeated_key is not None:
        raise GatewayError("invalid_json_data", "duplicate key `%s` in an object" % repeated_key)
    return doc


def _is_number(value):
    # JSON true/false is never a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(number):
    # A JSON integer is always finite (and may be too large for math.isfinite); 1e400 is inf.
    return isinstance(number, int) or math.isfinite(number)


def _is_blank(value):
    """Step 11: absent, null, or a string empty after trimming counts as missing."""
    return value is None or (isinstance(value, str) and not value.strip())


def canonical_channel_id(value):
    """channel_id: the canonical upper-case Crockford form, or None if malformed."""
    if type(value) is str and _CANONICAL_CHANNEL_ID.fullmatch(value):
        return value        # sent as it is stored: one match instead of the steps below
    if not isinstance(value, str) or not value.isascii():
        return None
    symbols = "".join(value.split()).upper().translate(_CROCKFORD_ALIASES)
    if len(symbols) != CROCKFORD_SYMBOLS or not _CROCKFORD_SYMBOL_SET.issuperset(symbols):
        return None
    if _CROCKFORD_VALUE[symbols[-1]] & 0b11:    # 130 bits carry 128: the last two must be 0
        return None
    return symbols


# Generated ids are unique, not secret (a channel's password guards its events),
# so they come from one generator the operating system seeds at start-up rather
# than from os.urandom: that is a system call that lets other threads run, and two
# of a create's ids are made while the store's lock is held.
_ID_BITS = random.Random()
if hasattr(os, "register_at_fork"):         # a forked child draws ids of its own
    os.register_at_fork(after_in_child=_ID_BITS.seed)
_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48)     # the version and variant bits...
_UUID4_SET = 4 << 76 | 0x8000 << 48               # ...set as uuid4() sets them


def _new_event_id():
    """event_id = uuid4().hex, made as uuid4() makes it (RFC 9562 §5.4):
    128 random bits with the version (4) and variant (10) bits set."""
    return "%032x" % (_ID_BITS.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)


def _new_hex_id():
    """A 32-char lowercase hex id for generated op_ids and request ids."""
    return "%032x" % _ID_BITS.getrandbits(128)


def _op_id_maker(line):
    """The op_id the line generates for a request that carried none (V4), as a
    function of the request's receive time in integer Unix milliseconds."""
    bits = _ID_BITS.getrandbits
    if line.op_id_time_prefix:
        return lambda received_at: "%013x-%032x" % (received_at, bits(128))
    return lambda received_at: "%032x" % bits(128)


def _same_secret(given, expected):
    """Constant-time comparison of two strings (steps 2 and 10)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


def _cut(text, most):
    """text in at most most characters: a longer one loses its middle."""
    if len(text) <= most:
        return text
    half = (most - 3) // 2
    return text[:most - 3 - half] + "..." + text[len(text) - half:]


def _printable(text):
    """Text safe to write on one log line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _text_or_none(value):
    return value if isinstance(value, str) and value else None


# Field rules ###################################################################
#
# One check_<field>(value) per field, in FIELD_RULES order.  Each one takes a
# value that is present and not null (a top-level null counts as absent, but
# for images and attrs: NOT_NULL_FIELDS), and returns it normalised, or None
# where the rule says the value counts as absent.  Every string is trimmed of
# surrounding whitespace before it is checked and stored.

# Labels that repeat from event to event (a channel_id, thing_id, status or tag)
# are stored as one shared copy: the first MAX_LABELS distinct ones are kept here
# for the life of the process (at most 2 MB: measured with labels of 24 emoji),
# and any others are stored as they came.  sys.intern would share them without
# a bound, and on Python 3.12 what it interns is never freed.
_LABELS: "dict[str, str]" = {}


def _shared_label(text):
    """The stored copy of text, kept as the shared one while there is room."""
    label = _LABELS.get(text)
    if label is None:
        label = _LABELS.setdefault(text, text) if len(_LABELS) < MAX_LABELS else text
    return label


def _trimmed_string(field, value, code):
    if not isinstance(value, str):
        raise GatewayError(code, _must_be(field, "a string"))
    return value.strip()


def _utf8_bytes(text):
    """How production counts a limit marked _BYTES: the UTF-8 bytes of the text."""
    return len(text.encode("utf-8", "surrogatepass"))


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
    """Required on all routes; 8-128 UTF-8 bytes after trimming."""
    text = _trimmed_string("password", value, "invalid_password")
    if not PASSWORD_MIN_BYTES <= _utf8_bytes(text) <= PASSWORD_MAX_BYTES:
        raise GatewayError("invalid_password", _must_be(
            "password", "%d-%d bytes of UTF-8" % (PASSWORD_MIN_BYTES, PASSWORD_MAX_BYTES)))
    return text


def check_op_id(value):
    """Optional; 1-128 of A-Z a-z 0-9 _ : -; an empty string is absent."""
    return _identifier("op_id", value, "invalid_op_id", OP_ID_MAX_CHARS) or None


def check_op_id_segment(segment):
    """The {op_id} of a send-status path: the op_id rule, and blank is not absent there."""
    op_id = check_op_id(segment)
    if op_id is None:
        raise GatewayError("invalid_op_id", "the path's op_id is blank; send "
                           "/send_status/{op_id} with the op_id a dispatch carried")
    return op_id


def check_thing_id(value):
    """Optional; 1-64 of A-Z a-z 0-9 _ : -; an empty string is absent."""
    thing_id = _identifier("thing_id", value, "invalid_thing_id", THING_ID_MAX_CHARS)
    return _shared_label(thing_id) if thing_id else None


def check_ciphertext(value):
    """Optional; a string (the end-to-end encrypted payload); an empty one is absent.

    No limit but the body's.  It belongs to the dispatch: the event's history
    shows it in that dispatch's fields; the event itself never holds it."""
    return _trimmed_string("ciphertext", value, "invalid_ciphertext") or None


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
    return _shared_label(_bounded_text("status", value, "invalid_status", STATUS_MAX_CHARS))


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


def _timestamp(field, value, code):
    """A whole number of Unix seconds or milliseconds, as integer milliseconds.

    Production parses whole numbers only and tells the unit by size: below
    SECONDS_BELOW seconds, below MILLISECONDS_BELOW milliseconds.  Each
    refusal says what to send instead and names the likely cause."""
    if type(value) is int and 0 <= value < MILLISECONDS_BELOW:     # the usual case, first
        return value * 1000 if value < SECONDS_BELOW else value
    if isinstance(value, str):
        raise GatewayError(code, "%s must be a JSON number, not a string: send whole Unix "
                                 "seconds or milliseconds without quotes" % field)
    if not _is_number(value):
        raise GatewayError(code, _must_be(field, "a whole number of Unix seconds or milliseconds"))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GatewayError(code, _must_be(field, "a finite whole number of Unix seconds or "
                                                     "milliseconds"))
        raise GatewayError(code, "%s must be whole Unix seconds or milliseconds, with no fraction "
                                 "or exponent: round it (time.time() has a fraction; send "
                                 "int(time.time()) or int(time.time() * 1000))" % field)
    if value < 0:
        raise GatewayError(code, "%s must not be negative: send whole Unix seconds or "
                                 "milliseconds" % field)
    if value >= MILLISECONDS_BELOW:
        likely = ("microseconds (divide by 1000)" if value < MICROSECONDS_BELOW
                  else "nanoseconds (divide by 1000000)")
        raise GatewayError(code, "%s is too large for Unix milliseconds (below 10^14); it looks "
                                 "like %s" % (field, likely))
    return value * 1000 if value < SECONDS_BELOW else value


def check_event_time(value):
    """Required on all routes; a timestamp (whole seconds or milliseconds)."""
    return _timestamp("event_time", value, "invalid_event_time")


def check_started_at(value):
    """Create only; a timestamp; defaults to event_time."""
    return _timestamp("started_at", value, "invalid_started_at")


def check_ended_at(value):
    """Close only; a timestamp; defaults to event_time; not before started_at (step 14)."""
    return _timestamp("ended_at", value, "invalid_ended_at")


def _string_list(field, value, code, max_items, max_bytes):
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
            raise GatewayError(code, "%s[%d] is empty; %s items must be non-empty"
                               % (field, value.index(item), field))
        if _utf8_bytes(text) > max_bytes:
            raise GatewayError(code, _too_long_bytes("%s[%d]" % (field, value.index(item)),
                                                     text, max_bytes))
        items.append(text)
    return tuple(dict.fromkeys(items))    # de-duplicated after trim, first order kept


def check_tags(value):
    """Optional; at most 32 strings, each 1-64 UTF-8 bytes after trim; de-duplicated."""
    tags = _string_list("tags", value, "invalid_tags", TAGS_MAX_ITEMS, TAG_MAX_BYTES)
    return tuple(map(_shared_label, tags))


def check_images(value):
    """Optional, not null; at most 32 strings, each 1-2048 UTF-8 bytes after trim; de-duplicated."""
    return _string_list("images", value, "invalid_images", IMAGES_MAX_ITEMS, IMAGE_MAX_BYTES)


def _is_scalar(value):
    """A JSON string, bool or finite number."""
    return isinstance(value, (str, bool)) or (_is_number(value) and _is_finite(value))


def check_attrs(value):
    """Optional, not null; an object patch, checked in one pass as production checks it.

    Top-level entries in document order, the first violation wins: a blank key;
    an array value; an object value whose own values include an array or an
    object (its keys are not checked).  Other values are scalars or null (null
    deletes the key).  Keys and values are stored as sent."""
    if not isinstance(value, dict):
        raise GatewayError("invalid_attrs", _must_be("attrs", "an object"))
    for key, item in value.items():
        if not key.strip():
            raise GatewayError("extension_object_key_required", "attrs keys must be non-empty")
        if isinstance(item, list):
            raise GatewayError("extension_object_arrays_unsupported",
                               "attrs values cannot be arrays; send a string or an object")
        inner = item.values() if isinstance(item, dict) else (item,)
        for scalar in inner:
            if isinstance(scalar, (list, dict)):
                raise GatewayError("extension_object_nested_object_unsupported",
                                   "attrs objects cannot hold arrays or objects (one level only)")
            if scalar is not None and not _is_scalar(scalar):
                raise GatewayError("invalid_attrs", "attrs numbers must be finite")
    return value


def _metadata_text(value):
    """The text a metadata value stands for: the trimmed string, or its JSON form."""
    return value.strip() if isinstance(value, str) else json.dumps(value)


def check_metadata(value):
    """Optional object of scalars with short, unique, non-empty keys and values (UTF-8 bytes)."""
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
        if _utf8_bytes(name) > METADATA_KEY_MAX_BYTES:
            raise GatewayError("metadata_key_too_long", _too_long_bytes(
                "a metadata key", name, METADATA_KEY_MAX_BYTES))
        if name in seen:
            raise GatewayError("metadata_key_duplicate", "metadata keys must be unique after trimming")
        seen.add(name)
        text = _metadata_text(item)
        if not text:
            raise GatewayError("metadata_value_required", "metadata values must be non-empty")
        if _utf8_bytes(text) > METADATA_VALUE_MAX_BYTES:
            raise GatewayError("metadata_value_too_long", _too_long_bytes(
                "metadata[%s]" % json.dumps(name[:24]), text, METADATA_VALUE_MAX_BYTES))
    return value      # stored as sent


# Step 12: the field rules in order.  channel_id and password are checked
# earlier, at step 10, and so are not in this table.
FIELD_RULES = (
    ("op_id", check_op_id),
    ("thing_id", check_thing_id),
    ("ciphertext", check_ciphertext),
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

# The codes each field's rule can answer (steps 10-12), which the OpenAPI
# description lists for each event route with FORBIDDEN_FIELDS and REQUIRED_FIELDS.
FIELD_CODES = MappingProxyType({
    "channel_id": ("channel_id_required", "invalid_channel_id"),
    "password": ("password_required", "invalid_password"),
    "op_id": ("invalid_op_id",),
    "thing_id": ("invalid_thing_id",),
    "ciphertext": ("invalid_ciphertext",),
    "event_id": ("event_id_required", "invalid_event_id"),
    "title": ("invalid_title",),
    "description": ("invalid_description",),
    "status": ("invalid_status",),
    "message": ("invalid_message",),
    "severity": ("invalid_severity",),
    "event_time": ("event_time_required", "invalid_event_time"),
    "started_at": ("invalid_started_at",),
    "ended_at": ("invalid_ended_at",),
    "tags": ("invalid_tags",),
    "images": ("invalid_images",),
    "attrs": ("invalid_attrs", "extension_object_key_required",
              "extension_object_arrays_unsupported", "extension_object_nested_object_unsupported"),
    "metadata": ("invalid_metadata", "metadata_value_scalar_required", "metadata_key_required",
                 "metadata_key_too_long", "metadata_key_duplicate", "metadata_value_required",
                 "metadata_value_too_long"),
})

# Fields that production refuses as null, where every other null counts as absent.
NOT_NULL_FIELDS = MappingProxyType({"images": "invalid_images", "attrs": "invalid_attrs"})

# Step 8: every field the event routes know; anything else is an unknown field.
EVENT_FIELDS = frozenset(["channel_id", "password"] + [name for name, _ in FIELD_RULES])

# The business fields an event holds (Store).
BUSINESS_FIELDS = ("title", "description", "status", "message", "severity",
                   "tags", "images", "attrs", "started_at", "ended_at")

# What a dispatch of an event's history shows in its "fields": the business
# fields it carried, and its ciphertext, which only the dispatch keeps.
DISPATCH_FIELDS = BUSINESS_FIELDS + ("ciphertext",)


# Step 8: a field no rule knows is named in the refusal, with the known field a
# typing mistake most likely meant.

def _close_name(name, known):
    """The known field a mistyped one most likely meant (eventTime: event_time), or None."""
    squashed = {key.replace("_", ""): key for key in known}
    key = name.lower().replace("_", "").replace("-", "")
    if key in squashed:
        return squashed[key]
    match = difflib.get_close_matches(name.lower(), sorted(known), n=1, cutoff=0.75)
    return match[0] if match else None


def _named_unknown(unknown, known):
    """Unknown field names as a message names them: sorted, quoted, the first ten
    each with a close known name if there is one."""
    names = []
    for name in sorted(unknown)[:10]:
        hint = _close_name(name, known)
        names.append("`%s`%s" % (_printable(name[:64]), " (did you mean `%s`?)" % hint if hint else ""))
    if len(unknown) > 10:
        names.append("and %d more" % (len(unknown) - 10))
    return ", ".join(names)


def _reject_unknown(doc, known):
    """Step 8: every unknown field named, sorted, each with a close known name if any."""
    unknown = doc.keys() - known
    if unknown:
        raise GatewayError("invalid_json_data", "unknown field%s %s; remove %s" % (
            "s" if len(unknown) > 1 else "", _named_unknown(unknown, known),
            "them" if len(unknown) > 1 else "it"))


# Routes ########################################################################

CREATE, UPDATE, CLOSE = "/event/create", "/event/update", "/event/close"
EVENT_ROUTES = (CREATE, UPDATE, CLOSE)

# Step 9: fields that must be absent (or null) on a route, with the code for each.
# event_id is refused on create even as null: production has no such field there.
FORBIDDEN_FIELDS = MappingProxyType({
    CREATE: (("event_id", "event_id_forbidden_on_create"),
             ("ended_at", "ended_at_forbidden_on_create")),
    UPDATE: (("started_at", "event_temporal_fields_forbidden_on_update"),
             ("ended_at", "event_temporal_fields_forbidden_on_update")),
    CLOSE: (("started_at", "started_at_forbidden_on_close"),),
})

# Step 11: the hard required business fields, and the code that lists the missing ones.
REQUIRED_FIELDS = MappingProxyType({
    CREATE: (("title", "status", "message", "severity"), "event_create_required_fields_missing"),
    UPDATE: (("status", "message", "severity"), "event_update_required_fields_missing"),
    CLOSE: (("status", "message", "severity"), "event_update_required_fields_missing"),
})

ADMIN_PREFIX = "/__admin/"
THING_PREFIX = "/thing/"

# The route table: one row per route, read by every step that asks of a route.
#   path        a {name} is one path segment, percent-decoded, checked by its field rule
#   methods     {method: the EventGateway method that answers it}; GET brings HEAD
#   allow       step 3: the Allow header of its 405
#   action      the event route it is (a thing-scoped route is its action's), or None
#   line_field  the Line field that serves a route of one production line only, or
#               None (both lines); in the other line it is an unknown path (step 1)
#   guard       step 1a: "host" (only this machine's names may reach it), "site" (and
#               never a request another web site made a browser send), or None
#   public      step 2: answered without the gateway token
#   json_body   step 4: its POST takes a JSON body (a body sent to any other route or
#               method is read, up to step 5's limit, and ignored)
#   journaled   kept by the request journal and a recording (watching the gateway and
#               probing it must not fill them)
# The /__admin/ routes are test support, not part of the PushGo API.
Route = collections.namedtuple("Route", (
    "path", "methods", "allow", "action", "line_field", "guard", "public", "json_body",
    "journaled"))


def _route(path, methods, line_field=None, guard=None, public=False, json_body=True,
           journaled=True):
    """A row of ROUTES: a route that takes GET takes HEAD (the same status and
    headers, no body); its action and Allow header follow from its path and methods."""
    if "GET" in methods:
        methods = dict(methods, HEAD=methods["GET"])
    action = path[path.index("/event/"):] if "/event/" in path else None
    return Route(path, MappingProxyType(methods), ", ".join(sorted(methods)), action,
                 line_field, guard, public, json_body and "POST" in methods, journaled)


_TEST_SUPPORT = {"guard": "site", "journaled": False}
ROUTES = MappingProxyType({row.path: row for row in (
    _route(CREATE, {"POST": "_route_event_create"}),
    _route(UPDATE, {"POST": "_route_event_update"}),
    _route(CLOSE, {"POST": "_route_event_close"}),
    _route(THING_PREFIX + "{thing_id}" + CREATE, {"POST": "_route_event_create"},
           line_field="thing_routes"),
    _route(THING_PREFIX + "{thing_id}" + UPDATE, {"POST": "_route_event_update"},
           line_field="thing_routes"),
    _route(THING_PREFIX + "{thing_id}" + CLOSE, {"POST": "_route_event_close"},
           line_field="thing_routes"),
    _route("/send_status/{op_id}", {"GET": "_route_send_status"},
           line_field="send_status_route"),
    _route("/healthz", {"GET": "_route_healthz"}, public=True, journaled=False),
    _route("/readyz", {"GET": "_route_healthz"}, public=True, journaled=False),
    _route("/", {"GET": "_route_page"}, guard="host", public=True, journaled=False),
    _route("/favicon.ico", {"GET": "_route_favicon"}, public=True, journaled=False),
    _route("/__admin/events", {"GET": "_route_admin_events_get",
                               "DELETE": "_route_admin_events_delete"}, **_TEST_SUPPORT),
    _route("/__admin/events/{event_id}", {"GET": "_route_admin_event_get"}, **_TEST_SUPPORT),
    _route("/__admin/requests", {"GET": "_route_admin_requests_get",
                                 "DELETE": "_route_admin_requests_delete"}, **_TEST_SUPPORT),
    _route("/__admin/reset", {"POST": "_route_admin_reset"}, json_body=False, **_TEST_SUPPORT),
    _route("/__admin/channels", {"GET": "_route_admin_channels_get",
                                 "POST": "_route_admin_channels_post"}, **_TEST_SUPPORT),
    _route("/__admin/faults", {"GET": "_route_admin_faults_get",
                               "POST": "_route_admin_faults_post",
                               "DELETE": "_route_admin_faults_delete"}, **_TEST_SUPPORT),
    _route("/__admin/send_status/{op_id}", {"POST": "_route_admin_send_status"},
           **_TEST_SUPPORT),
    _route("/__admin/info", {"GET": "_route_admin_info"}, **_TEST_SUPPORT),
    _route("/__admin/openapi.json", {"GET": "_route_admin_openapi"}, **_TEST_SUPPORT),
)})

# The routes with a {segment}, as (what comes before it, route, what comes after).
_SEGMENT_ROUTES = tuple((path.split("{", 1)[0], path, path.split("}", 1)[1])
                        for path in ROUTES if "{" in path)


def _journaled(path, route):
    """Whether the journal keeps a request to path (route: its row, or None when
    step 1 did not find one): an unknown path is kept, but under /__admin/."""
    if route is None:
        route = ROUTES.get(path)        # broken HTTP is refused before it is routed
    return route.journaled if route is not None else not path.startswith(ADMIN_PREFIX)


# The fields each admin POST takes, and the query parameters each admin list takes.
ADMIN_CHANNEL_FIELDS = frozenset({"channel_id", "password"})
ADMIN_SEND_STATUS_FIELDS = frozenset({"status"})
FAULT_DEFAULTS = MappingProxyType({"route": None, "kind": "status", "status": None, "when": "before",
                                   "count": 1, "delay_ms": 0, "retry_after_s": None,
                                   "probability": 1})
EVENT_FILTERS = ("channel_id", "thing_id", "state", "wait_ms", "count")
REQUEST_FILTERS = ("method", "path", "status", "error_code", "channel_id", "after", "wait_ms",
                   "count")
STATUS_DROPPED = "dropped"  # ?status=dropped: the requests whose connection was dropped unanswered


# Step 1: a request target's path, query and authority, and the route of a path.
# Step 1a: the names that are this machine's.

def _split_target(target):
    """(path, query, authority or None) of a request target, in origin form or
    absolute form (http://host:port/path?query, which a proxy-minded client may
    send; its authority then stands for the Host header)."""
    authority = None
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if sep and scheme.lower() in ("http", "https"):
            start = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
            authority, target = rest[:start], rest[start:]
            target = target if target.startswith("/") else "/" + target
    path, _, query = target.partition("?")
    return path, query, authority


_PORT = re.compile(r"(?::[0-9]*)?")


def _host_name(host):
    """The name a Host header (or an absolute-form authority) names: lower case,
    without its port or a trailing dot; an IPv6 literal keeps its brackets.  None
    for a malformed one."""
    host = host.strip(OWS).lower()
    if host.startswith("["):
        literal, bracket, port = host.partition("]")
        return literal + bracket if bracket and _PORT.fullmatch(port) else None
    name, colon, port = host.partition(":")
    if colon and not _PORT.fullmatch(colon + port):
        return None
    return name.rstrip(".")


def _is_local_name(name):
    """An IP address literal, localhost or a name under .localhost (section 1a):
    names no DNS-rebinding site can make a browser send for the gateway."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
    except ValueError:
        return False
    return True


def _match_route(path, routes):
    """(the row of path's route in routes, its percent-decoded {segment} or None),
    or (None, None) for an unknown path.  An empty segment is an unknown path."""
    route = routes.get(path)
    if route is not None:
        return route, None
    for before, template, after in _SEGMENT_ROUTES:
        if path.startswith(before) and path.endswith(after) and template in routes:
            segment = path[len(before):len(path) - len(after)]
            if segment and "/" not in segment:
                return routes[template], urllib.parse.unquote(segment)
    return None, None


# Store #########################################################################
#
# The rules of the event store:
# - create makes a new event, state "ongoing", event_id = uuid4().hex, owned by
#   its channel; update and close find it by event_id within the caller's
#   channel only (an event of another channel is not found, never revealed).
# - A closed event is terminal; an event's thing is fixed at create.
# - Merge on update and close: given fields replace; tags and images replace
#   the whole list (an empty list clears); attrs is a patch (null deletes a
#   key, an object value replaces wholesale); metadata and ciphertext belong to
#   the dispatch, not the event.
# - Every accepted dispatch joins the event's history, at O(1) however long the
#   history is.  An event keeps at most max_history dispatches: past that, the
#   oldest one after the create is dropped with its op_id record (a retry of
#   that op_id is then a new request), and history_dropped counts it.
# - The store holds at most max_events events.  When full, the event closed
#   longest ago is dropped (with its op_id records), or, if every event is
#   open, create answers 503 store_full and nothing is lost.  Both cost O(1) in
#   the number of events.
# - The bound: the store's memory as a whole is at most max_store_mb MiB, as it
#   counts it: each dispatch its request body's bytes plus
#   STORE_DISPATCH_OVERHEAD_BYTES, each event STORE_EVENT_OVERHEAD_BYTES plus
#   its current fields (the create's body bytes at first, then each field a
#   dispatch replaces or an attrs patch sets by its size as JSON: attrs patches
#   accumulate on the event while its history is trimmed).  Past it, the event
#   closed longest ago is dropped first, then the oldest dispatch after a
#   create across all events (counted in its event's history_dropped, its op_id
#   record and send status going with it), O(1) amortised.  What the request
#   itself applies is never dropped to make room: when nothing else can be
#   freed (every event is open and holds only its create), a create answers
#   503 store_full and nothing is lost, and an update or close is applied (the
#   bound is overshot by one body at most).
# - One lock guards it all, and dispatch() does steps 13-16 under it, so a
#   request is replayed, refused or applied whole, never half.  Reads copy the
#   records under the lock and build their views outside it, so that a listing
#   of every event does not hold up the requests that come meanwhile.
#
# Memory layout.  At rest, an event is a plain tuple of its values in
# EVENT_KEYS order: strings, numbers, None, dicts of those (attrs), and
# tuples: tags and images are tuples of strings, a dispatch is a plain tuple.
# A tuple is much smaller than a dict, and CPython's garbage collector stops
# tracking tuples that hold only untracked values, so old events cost it
# nothing; main() also makes full passes rare (see there).  A history is a
# one-tuple while the event has only its create, and a deque from its first
# update on, so that appending and trimming are O(1).  The store unpacks a
# record into a dict to read or change it, and packs it back.  Labels that
# repeat from event to event (status, thing_id, tags) are shared by their
# checkers (_shared_label), and a severity is one of four constant strings.
# Views copy everything out as lists and dicts, so what a caller does with a
# view never reaches the store.

EVENT_KEYS = ("event_id", "channel_id", "thing_id", "state", "title", "description", "status",
              "message", "severity", "tags", "images", "attrs", "started_at", "ended_at",
              "created_at", "updated_at", "history", "history_dropped", "stored_bytes")
_CHANNEL, _THING, _STATE, _HISTORY, _HISTORY_DROPPED, _STORED = (EVENT_KEYS.index(key) for key in (
    "channel_id", "thing_id", "state", "history", "history_dropped", "stored_bytes"))


def _pack(event):
    """An event dict as the tuple the store keeps."""
    return tuple(map(event.__getitem__, EVENT_KEYS))


def _unpack(record):
    """A stored tuple as an event dict."""
    return dict(zip(EVENT_KEYS, record))


def _frozen(record):
    """A record whose history no later dispatch can change (the lock is held)."""
    history = record[_HISTORY]
    if type(history) is tuple:
        return record
    return record[:_HISTORY] + (tuple(history),) + record[_HISTORY + 1:]


def _copy_json(value):
    """A fresh copy of a stored JSON value, tuples as lists."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_json(item) for item in value]
    return value


def _new_event(event_id, channel_id, thing_id, received_at):
    """A new event, ongoing, owned by its channel.

    A literal, three times faster than dict.fromkeys(EVENT_KEYS) and an update;
    _pack() reads it by EVENT_KEYS, so a key missing here fails every create."""
    return {"event_id": event_id, "channel_id": channel_id, "thing_id": thing_id,
            "state": "ongoing", "title": None, "description": None, "status": None,
            "message": None, "severity": None, "tags": (), "images": (), "attrs": None,
            "started_at": None, "ended_at": None, "created_at": received_at,
            "updated_at": received_at, "history": (), "history_dropped": 0, "stored_bytes": 0}


def _merge(event, fields):
    """Given fields replace; attrs is a patch; lists replace whole."""
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


_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _json_bytes(value):
    """A value's size as JSON in characters, as the store-wide bound counts it (a
    string's escapes are not counted: it is the size that matters, not the text)."""
    kind = type(value)
    if kind is str:
        return len(value) + 2
    if kind is int or kind is float or kind is bool:
        return len(repr(value))           # True is as long as true
    return len(_COMPACT_JSON(value))


def _fields_growth(event, fields):
    """How many bytes an event's current fields grow by (or shrink, below 0) when a
    dispatch's fields are merged in: each field it replaces by its size as JSON,
    and each key an attrs patch sets or deletes.  Costs what the request's fields
    and the values they replace weigh, not what the event holds."""
    growth = 0
    for name, value in fields.items():
        if name == "attrs":
            attrs = event["attrs"] or {}
            for key, item in value.items():
                old = attrs.get(key)
                if old is not None:
                    growth -= _json_bytes(key) + _json_bytes(old)
                if item is not None:
                    growth += _json_bytes(key) + _json_bytes(item)
        elif name in BUSINESS_FIELDS or name in ("started_at", "ended_at"):
            old = event.get(name)
            if value != old:
                growth += _json_bytes(value) - (0 if old is None else _json_bytes(old))
    return growth


# One accepted request of an event's history, as one flat tuple: (route, op_id,
# event_time, received_at, metadata, send status, the bytes the store-wide bound
# counts for it, then the fields it carried in DISPATCH_FIELDS order, None where
# it did not carry one).  The send status is SEND_STATUS_DEFAULT until a test
# sets another, and then (status, updated_at).
_D_OP_ID, _D_RECEIVED_AT, _D_SEND_STATUS, _D_BYTES = 1, 3, 5, 6


def _send_status_of(dispatch):
    """(status, updated_at) of a dispatch."""
    sent = dispatch[_D_SEND_STATUS]
    return (sent, dispatch[_D_RECEIVED_AT]) if type(sent) is str else sent


def _dispatch_view(dispatch):
    route, op_id, event_time, received_at, metadata = dispatch[:5]
    return {"route": route, "op_id": op_id, "event_time": event_time,
            "received_at": received_at,
            "fields": {name: _copy_json(value)
                       for name, value in zip(DISPATCH_FIELDS, dispatch[7:])
                       if value is not None},
            "metadata": _copy_json(metadata),
            "send_status": _send_status_of(dispatch)[0]}


def _send_status_view(dispatch, event_id):
    """A dispatch's send status as GET /send_status/{op_id} shows it."""
    status, updated_at = _send_status_of(dispatch)
    accepted_at = dispatch[_D_RECEIVED_AT]
    return {"op_id": dispatch[_D_OP_ID], "status": status, "model": "event",
            "entity_id": event_id, "accepted_at": accepted_at, "updated_at": updated_at,
            "expires_at": accepted_at + SEND_STATUS_RETENTION_MS}


def _event_view(record):
    """An event as the test-support routes show it (GET /__admin/events), a copy."""
    view = _copy_json(_unpack(record))
    del view["stored_bytes"]                # the store's own accounting
    view["attrs"] = view["attrs"] or {}
    view["history"] = [_dispatch_view(dispatch) for dispatch in record[_HISTORY]]
    return view


# Step 13: two requests with one op_id are the same request when their digests are equal.

def _request_digest(route, path_thing, doc):
    """What makes two requests "the same" for op_id replays: the action, the path's
    thing (None on the plain routes) and the parsed body."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(("%s\n%s\n%s" % (route, path_thing, canonical)).encode("ascii")).digest()


# An op_id the gateway generated: the request it names carried no op_id, so a
# request that sends it can never be that request's replay (Idempotency).
_GENERATED_OP = ("generated", None, None)


class _Signal:
    """A change counter that waits can sleep on: notify() after each change; a
    waiter holds no lock but this one's own, and only while it sleeps.

    notify() costs one lock round trip while nobody waits (Condition.notify_all
    alone costs more than that, in Python code, on every request)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.condition = threading.Condition(self.lock)
        self.version = 0            # changes so far, under the lock
        self.waiting = 0            # sleeping waiters, under the lock

    def notify(self):
        with self.lock:
            self.version += 1
            if self.waiting:
                self.condition.notify_all()

    def wake_all(self):
        with self.lock:
            self.condition.notify_all()

    def sleep(self, version, timeout_s):
        """Sleep until the version moves past version, a wake_all() or timeout_s."""
        with self.lock:
            if self.version == version:
                self.waiting += 1
                try:
                    self.condition.wait(timeout_s)
                finally:
                    self.waiting -= 1


class EventStore:
    """The in-memory events, their op_id records and capacity (the rules above).

    line is the production line (LINES) whose answers, op_id conflict code and
    generated op_ids the store gives.  changed is notified after every change,
    for waits.
    """

    def __init__(self, max_events=DEFAULT_MAX_EVENTS, max_history=DEFAULT_MAX_HISTORY,
                 line=None, max_store_mb=DEFAULT_MAX_STORE_MB):
        self.max_events = max_events
        self.max_history = max_history
        self.max_store_bytes = max_store_mb * 1024 * 1024
        line = line or LINES[DEFAULT_LINE]
        self.success_templates = _success_templates(line)
        self.template_ids = _success_template_ids(line)
        self.conflict_code = line.op_id_conflict
        self.new_op_id = _op_id_maker(line)
        self.lock = threading.Lock()
        self.changed = _Signal()
        self.stored_bytes = 0                      # what the bound counts, all events together
        self._events = {}                          # event_id -> packed event, oldest first
        self._closed = collections.OrderedDict()   # event_id -> None, closed longest ago first
        self._ops = {}                             # channel_id -> {op_id: (digest, body, seq)}
        self._sent = {}                            # op_id -> event_id of its latest dispatch
        # Every dispatch after a create, oldest first, as (event_id, its number among
        # its event's dispatches after the create); one whose number is below its
        # event's history_dropped was dropped already, and is skipped.
        self._after_creates = collections.deque()
        self._kept_after_creates = 0

    def __len__(self):
        return len(self._events)

    def dispatch(self, route, channel_id, op_id, digest, fields, received_at, body_bytes=0):
        """Steps 13-16 for one validated request.

        Returns (200 body, op_id, event_id, seq, replayed): seq is a one-item
        list that the caller fills with the journal's seq of an accepted
        request, so that a replay can name the request it replays.  fields
        holds the request's normalised fields (FIELD_RULES) and is consumed.
        digest identifies the request for op_id replays (Idempotency);
        received_at is the server's receive time in integer Unix milliseconds;
        body_bytes the request body's length, which the store-wide bound counts.
        """
        with self.lock:
            ops = self._ops.setdefault(channel_id, {})
            # 13. Idempotency: a known op_id replays its answer or conflicts.
            if op_id is not None and op_id in ops:
                known_digest, known_body, seq = ops[op_id]
                if known_digest != digest:
                    raise GatewayError(self.conflict_code, "op_id was already used in this "
                                       "channel for a different request; use a new op_id")
                return known_body, op_id, json.loads(known_body)["data"]["event_id"], seq, True
            thing_id = fields.pop("thing_id", None)
            event_time = fields.pop("event_time")
            metadata = fields.pop("metadata", None)
            event_id = fields.pop("event_id", None)
            if op_id is None:
                op_id = self.new_op_id(received_at)     # absent -> generated (digest stays None)
            cost = body_bytes + body_bytes // STORE_BODY_SLACK + STORE_DISPATCH_OVERHEAD_BYTES
            # The fields the request carried, before any default is set.
            dispatch = (route, op_id, event_time, received_at, metadata, SEND_STATUS_DEFAULT,
                        cost, *map(fields.get, DISPATCH_FIELDS))
            if route == CREATE:
                # 15. Capacity: max_events, then the store-wide bound.
                grown = cost + STORE_EVENT_OVERHEAD_BYTES + body_bytes
                if (len(self._events) >= self.max_events
                        or self.stored_bytes + grown > self.max_store_bytes):
                    self._make_room(grown, creating=True)
                event = _new_event(_new_event_id(), channel_id, thing_id, received_at)
                event["stored_bytes"] = STORE_EVENT_OVERHEAD_BYTES + body_bytes
                fields.setdefault("started_at", event_time)
            else:
                # 14. Event state.
                event = self._open_event(channel_id, event_id, thing_id)
                if route == CLOSE:
                    defaulted = "ended_at" not in fields
                    fields.setdefault("ended_at", event_time)
                    if fields["ended_at"] < event["started_at"]:
                        raise GatewayError("invalid_ended_at", "ended_at%s must not be before "
                                           "the event's started_at (%d ms)" % (
                                               " (defaulted from event_time)" if defaulted
                                               else "", event["started_at"]))
                # 15. The store-wide bound: room for this dispatch and what its fields add.
                grown = cost + _fields_growth(event, fields)
                if self.stored_bytes + grown > self.max_store_bytes and self._make_room(
                        grown, creating=False):
                    event = _unpack(self._events[event["event_id"]])    # as making room left it
                event["stored_bytes"] += grown - cost
                if route == CLOSE:
                    fields["state"] = "closed"
                    self._closed[event["event_id"]] = None
                fields["updated_at"] = received_at
            # 16. Apply, record the op_id, answer with the request's own thing.
            fields.pop("ciphertext", None)
            if route == CREATE:
                event["history"] = (dispatch,)
            else:
                self._append(event, dispatch, ops)
            self.stored_bytes += grown
            _merge(event, fields)
            event_id = event["event_id"]
            ids = (channel_id, op_id, event_id, thing_id)
            if thing_id is None:
                body = (self.success_templates[1] % self.template_ids[1](ids)).encode()
            else:
                body = (self.success_templates[0] % self.template_ids[0](ids)).encode()
            if digest is None:
                seq, ops[op_id] = None, _GENERATED_OP       # no request can replay it
            else:
                seq = [None]
                ops[op_id] = (digest, body, seq)
            self._sent[op_id] = event_id
            self._events[event_id] = _pack(event)
        self.changed.notify()
        return body, op_id, event_id, seq, False

    def _append(self, event, dispatch, ops):
        """Add a dispatch after the create to an event's history, dropping the oldest
        after the create when the history is full: O(1) either way (the lock is held)."""
        history = event["history"]
        if type(history) is tuple:
            history = event["history"] = collections.deque(history)
        self._after_creates.append((event["event_id"],
                                    event["history_dropped"] + len(history) - 1))
        self._kept_after_creates += 1
        history.append(dispatch)
        if len(history) > self.max_history:
            dropped = history[1]
            del history[1]
            self._forget(ops, dropped, event["event_id"])
            event["history_dropped"] += 1
        if len(self._after_creates) > 2 * self._kept_after_creates + 1024:
            self._compact_after_creates()

    def _forget(self, ops, dispatch, event_id):
        """A dropped dispatch after a create: its bytes, op_id record and send status
        go with it."""
        op_id = dispatch[_D_OP_ID]
        ops.pop(op_id, None)
        if self._sent.get(op_id) == event_id:
            del self._sent[op_id]
        self.stored_bytes -= dispatch[_D_BYTES]
        self._kept_after_creates -= 1

    def _compact_after_creates(self):
        """Leave out the entries of dispatches dropped already (by max_history or with
        their event): run when they are half the order or more, so O(1) amortised."""
        kept = collections.deque()
        for event_id, number in self._after_creates:
            record = self._events.get(event_id)
            if record is not None and number >= record[_HISTORY_DROPPED]:
                kept.append((event_id, number))
        self._after_creates = kept

    def _open_event(self, channel_id, event_id, thing_id):
        record = self._events.get(event_id)
        event = None if record is None else _unpack(record)
        if event is None or event["channel_id"] != channel_id:
            raise GatewayError("event_not_found", "no event with this event_id in this channel")
        if event["state"] == "closed":
            raise GatewayError("event_closed", "event is closed; create a new event instead")
        if thing_id is not None and thing_id != event["thing_id"]:
            raise GatewayError("thing_id_mismatch",
                               "thing_id differs from the one the event was created with")
        return event

    def _make_room(self, grown, creating):
        """Step 15: room for an event (creating) and for grown more bytes, O(1)
        amortised (the lock is held); whether anything was dropped."""
        dropped = False
        if creating and len(self._events) >= self.max_events:
            if not self._closed:
                raise GatewayError("store_full", "event store is full (%d open events); close "
                                   "some events or restart with a larger --max-events"
                                   % self.max_events)
            self._drop(next(iter(self._closed)))
            dropped = True
        while self.stored_bytes + grown > self.max_store_bytes:
            dropped = True
            if self._closed:
                self._drop(next(iter(self._closed)))        # closed longest ago first
            elif not self._drop_oldest_after_create():
                if creating:
                    raise GatewayError("store_full", "event store is full (%d MiB in %d open "
                                       "events); close some events or restart with a larger "
                                       "--max-store-mb" % (self.max_store_bytes >> 20,
                                                           len(self._events)))
                break           # an update or close is applied: over by this one body at most
        return dropped

    def _drop_oldest_after_create(self):
        """Drop the oldest dispatch after a create across all events; False when there
        is none (the lock is held)."""
        while self._after_creates:
            event_id, number = self._after_creates.popleft()
            record = self._events.get(event_id)
            if record is None or number != record[_HISTORY_DROPPED]:
                continue                    # dropped already, with its event or by max_history
            history = record[_HISTORY]
            dropped = history[1]
            del history[1]
            self._forget(self._ops.get(record[_CHANNEL], {}), dropped, event_id)
            self._events[event_id] = (record[:_HISTORY_DROPPED] + (record[_HISTORY_DROPPED] + 1,)
                                      + record[_HISTORY_DROPPED + 1:])
            return True
        return False

    def _drop(self, event_id):
        """Remove one event with its op_id records (the lock is held): O(its history)."""
        record = self._events.pop(event_id)
        self._closed.pop(event_id, None)
        ops = self._ops.get(record[_CHANNEL], {})
        history = record[_HISTORY]
        create = history[0]
        ops.pop(create[_D_OP_ID], None)
        if self._sent.get(create[_D_OP_ID]) == event_id:
            del self._sent[create[_D_OP_ID]]
        self.stored_bytes -= create[_D_BYTES] + record[_STORED]
        for index in range(1, len(history)):
            self._forget(ops, history[index], event_id)

    def clear(self):
        """Drop every event and op_id record; returns how many events there were."""
        with self.lock:
            count = len(self._events)
            self._events.clear()
            self._closed.clear()
            self._ops.clear()
            self._sent.clear()
            self._after_creates.clear()
            self._kept_after_creates = self.stored_bytes = 0
        self.changed.notify()
        return count

    def _latest_dispatch(self, op_id, now):
        """(event, index in its history) of op_id's latest accepted dispatch, or None
        when there is none, it was dropped, or it expired (the lock is held).  The
        history is searched from its newest end, where the dispatch usually is."""
        event_id = self._sent.get(op_id)
        if event_id is None:
            return None
        event = _unpack(self._events[event_id])
        history = event["history"]
        for index in range(len(history) - 1, -1, -1):
            dispatch = history[index]
            if dispatch[_D_OP_ID] == op_id:
                if now >= dispatch[_D_RECEIVED_AT] + SEND_STATUS_RETENTION_MS:
                    return None
                return event, index
        return None

    def send_status(self, op_id, now):
        """The send status of op_id's latest accepted dispatch, or None."""
        with self.lock:
            found = self._latest_dispatch(op_id, now)
            if found is None:
                return None
            event, index = found
            return _send_status_view(event["history"][index], event["event_id"])

    def set_send_status(self, op_id, status, now):
        """Set the send status of op_id's latest accepted dispatch; its view, or None."""
        with self.lock:
            found = self._latest_dispatch(op_id, now)
            if found is None:
                return None
            event, index = found
            history = event["history"]
            dispatch = history[index]
            dispatch = dispatch[:_D_SEND_STATUS] + ((status, now),) + dispatch[_D_SEND_STATUS + 1:]
            if type(history) is tuple:
                event["history"] = history[:index] + (dispatch,) + history[index + 1:]
            else:
                history[index] = dispatch
            self._events[event["event_id"]] = _pack(event)
        self.changed.notify()
        return _send_status_view(dispatch, event["event_id"])

    def get(self, event_id):
        with self.lock:
            record = self._events.get(event_id)
            record = None if record is None else _frozen(record)
        return None if record is None else _event_view(record)

    def find(self, channel_id=None, thing_id=None, state=None):
        """The records that pass every given filter, oldest first, frozen."""
        with self.lock:
            return [_frozen(record) for record in self._events.values()
                    if (channel_id is None or record[_CHANNEL] == channel_id)
                    and (thing_id is None or record[_THING] == thing_id)
                    and (state is None or record[_STATE] == state)]

    def views(self, channel_id=None, thing_id=None, state=None):
        """The events that pass every given filter, oldest first, as views (built
        outside the lock)."""
        return [_event_view(record) for record in self.find(channel_id, thing_id, state)]


# Request journal ###############################################################
#
# Every request the gateway answers (or drops), but those to /__admin/..., /,
# /favicon.ico, /healthz and /readyz, is recorded once answered, broken HTTP
# included, and the last max_requests are kept.  seq counts from 1 and never restarts, so that
# ?after=SEQ polls without gaps.  An entry is kept as a tuple in JOURNAL_KEYS
# order with the request's raw headers and body; its view, built only when
# read, masks them: the authorization header's credentials, a top-level
# password, and the value of any top-level key the event routes do not know
# (a mistyped "password" key still holds a password).  A body that does not
# parse as a JSON object is never shown, only its length.

JOURNAL_KEYS = ("seq", "received_at", "method", "path", "query", "headers", "body",
                "body_bytes", "status", "error_code", "error", "response", "request_id", "op_id",
                "event_id", "channel_id", "fault", "note", "duration_ms")
_SEQ, _J_METHOD, _J_PATH, _J_STATUS, _J_CODE, _J_CHANNEL = (JOURNAL_KEYS.index(key) for key in (
    "seq", "method", "path", "status", "error_code", "channel_id"))
# After the shown keys, each entry keeps the answer's headers, for a recording.
_J_ANSWER_HEADERS = len(JOURNAL_KEYS)
MASK = "***"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization"})


# The authentication schemes of HTTP's registry (and "Token", common in APIs), by
# their lower-case names: the only first words of an Authorization value that the
# journal shows.  Any other first word may be the token itself, sent without a
# scheme, so it is masked with the rest.
AUTH_SCHEMES = frozenset({
    "basic", "bearer", "digest", "dpop", "gnap", "hoba", "mutual", "negotiate", "ntlm",
    "oauth", "privatetoken", "scram-sha-1", "scram-sha-256", "token", "vapid"})


def _masked_credentials(value):
    """"Bearer ***" for "Bearer <token>": a known scheme followed by a space is kept,
    the credentials never; anything else (a bare token, a tab after the scheme, an
    unknown first word) is "***" whole."""
    scheme, space, _ = value.lstrip(OWS).partition(" ")
    return "%s %s" % (scheme, MASK) if space and scheme.lower() in AUTH_SCHEMES else MASK


def _masked_headers(headers):
    """The request's headers with every credential masked."""
    return {name: _masked_credentials(value) if name in _SECRET_HEADERS else value
            for name, value in headers.items()}


def _holds_a_secret(key):
    """A top-level body key whose value is masked (journal) or replaced (recording):
    password, and any key the event routes do not know (a mistyped "pasword")."""
    return key == "password" or key not in EVENT_FIELDS


def _masked_body(body):
    """The body as the journal shows it: a JSON object with its secrets masked, or None."""
    if not body:
        return None
    try:
        doc = parse_json_body(body, _SHOWN_DECODERS)
    except GatewayError:
        return None
    return {key: MASK if _holds_a_secret(key) else value
            for key, value in doc.items()}


def _masked_response(payload):
    """An answer's body as the journal shows it: parsed, a password masked, or None."""
    if not payload:
        return None
    doc = json.loads(payload)
    if isinstance(doc, dict) and "password" in doc:
        doc["password"] = MASK
    return doc


# A note is kept as (code, arguments) and written out only when it is read, so
# that a request pays nothing for a sentence nobody reads.  The notes say what
# the answer does not: what production would have done, what was ignored.
NOTE_TEXTS = MappingProxyType({
    "replay": "replay of seq %s; nothing applied",
    "replay_unseen": "replay of an earlier request that the journal no longer holds; "
                     "nothing applied",
    "unknown_channel": "no channel %s is registered; registered: %s",
    "ignored_fields": "ignored unknown field%s %s, as production %s does",
    "rate_limit": "production 1.3 would answer 429 rate_limited: %s",
    "lenient": "production %s would accept this (it no longer checks %s); this gateway keeps "
               "the page's rule",
    "client_op_id": "production %s refuses a client op_id (400 op_id_not_allowed); this "
                    "gateway keeps the page's rule",
})


def _note_text(note):
    """The sentences of a request's notes (a tuple of (code, arguments)), or None."""
    if note is None:
        return None
    texts = []
    for code, *args in note:
        if code == "replay":
            seq = args[0][0]        # the replayed request's seq, once it was journaled
            texts.append(NOTE_TEXTS["replay_unseen"] if seq is None else NOTE_TEXTS[code] % seq)
        elif code == "rate_limit":
            texts.append(NOTE_TEXTS[code] % (RATE_LIMIT_REASONS[len(args)] % tuple(args)))
        elif code == "ignored_fields":
            unknown, line = args
            texts.append(NOTE_TEXTS[code] % ("s" if len(unknown) > 1 else "",
                                             _named_unknown(unknown, EVENT_FIELDS), line))
        else:
            texts.append(NOTE_TEXTS[code] % tuple(args))
    return "; ".join(texts)


def _request_view(entry):
    view = dict(zip(JOURNAL_KEYS, entry))
    view["headers"] = _masked_headers(view["headers"])
    view["body"] = _masked_body(view["body"])
    view["response"] = _masked_response(view["response"])
    view["note"] = _note_text(view["note"])
    view["fault"] = None if view["fault"] is None else view["fault"]._asdict()
    view["duration_ms"] = round(view["duration_ms"], 3)
    return view


class RequestJournal:
    """The last max_requests answered requests, oldest first (the rules above).

    changed is notified after every record, for waits; its version is the
    last seq given (never reset), and its lock the journal's own, held only to
    append or copy the entries."""

    def __init__(self, max_requests=DEFAULT_MAX_REQUESTS):
        self.max_requests = max_requests
        self.changed = _Signal()
        self._entries = collections.deque(maxlen=max_requests)

    def record(self, *fields):
        """Append one entry (the fields of JOURNAL_KEYS after seq); returns its seq."""
        changed = self.changed
        with changed.lock:
            changed.version += 1
            self._entries.append((changed.version,) + fields)
            if changed.waiting:
                changed.condition.notify_all()
            return changed.version

    def find(self, method=None, path=None, status=None, error_code=None, channel_id=None,
                 after=None):
        """The entries that pass every given filter (status STATUS_DROPPED: no answer sent)."""
        with self.changed.lock:
            entries = list(self._entries)
        answered = None if status == STATUS_DROPPED else status
        return [entry for entry in entries
                if (method is None or entry[_J_METHOD] == method)
                and (path is None or entry[_J_PATH] == path)
                and (status is None or entry[_J_STATUS] == answered)
                and (error_code is None or entry[_J_CODE] == error_code)
                and (channel_id is None or entry[_J_CHANNEL] == channel_id)
                and (after is None or entry[_SEQ] > after)]

    def clear(self):
        with self.changed.lock:
            count = len(self._entries)
            self._entries.clear()
            return count


# The filters of the test-support lists (GET /__admin/events and
# /__admin/requests, and the Python methods events(), requests() and the
# waits), checked the same way for HTTP and Python.

def _whole_number(name, value, low, high, code="invalid_filter", text=False):
    """A whole number from low to high (with text, also as decimal digits), or an error."""
    if text and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise GatewayError(code, "%s must be a whole number from %d to %d" % (name, low, high))
    return value


def _channel_filter(value):
    canonical = canonical_channel_id(value)
    if canonical is None:
        raise GatewayError("invalid_filter", "channel_id filter is not a channel id")
    return canonical


def _event_filters(channel_id=None, thing_id=None, state=None):
    """The checks of GET /__admin/events' filters, for HTTP and Python alike."""
    if state is not None and state not in ("ongoing", "closed"):
        raise GatewayError("invalid_filter", "state filter must be ongoing or closed")
    if thing_id is not None and not isinstance(thing_id, str):
        raise GatewayError("invalid_filter", "thing_id filter must be a string")
    return {"channel_id": None if channel_id is None else _channel_filter(channel_id),
            "thing_id": thing_id, "state": state}


def _request_filters(method=None, path=None, status=None, error_code=None, channel_id=None,
                     after=None):
    """The checks of GET /__admin/requests' filters, for HTTP and Python alike: a
    filter that could match nothing is an error, not an empty list."""
    for name, value in (("method", method), ("path", path), ("error_code", error_code)):
        if value is not None and not isinstance(value, str):
            raise GatewayError("invalid_filter", "%s filter must be a string" % name)
    if path is not None and not path.startswith("/"):
        raise GatewayError("invalid_filter", "path filter must start with / (a path such as "
                           "/event/create); this one does not")
    if method is not None and method != method.upper():
        raise GatewayError("invalid_filter", "method filter is case-sensitive, as HTTP methods "
                           "are: use %s" % _printable(method.upper()[:20]))
    if error_code is not None and error_code not in ERRORS:
        raise GatewayError("invalid_filter", "error_code filter is not a code this gateway "
                           "answers (see its ERRORS table)")
    if status is not None and status != STATUS_DROPPED:
        status = _whole_number("status", status, 100, 599, text=True)
    return {"method": method, "path": path, "error_code": error_code, "status": status,
            "channel_id": None if channel_id is None else _channel_filter(channel_id),
            "after": None if after is None else _whole_number("after", after, 0, 10 ** 18, text=True)}


def _query(query, names):
    """A query string as {name: value} of known names, or invalid_filter."""
    params = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in names:
            raise GatewayError("invalid_filter", "unknown query parameter `%s`; use %s"
                               % (_printable(name[:64]), ", ".join(names)))
        params[name] = value
    return params


def _shown_filters(filters):
    given = ", ".join("%s=%s" % item for item in filters.items() if item[1] is not None)
    return given or "no filter"


def _wait_params(params):
    """?wait_ms= and ?count= of an admin list, taken out of params."""
    wait_ms = _whole_number("wait_ms", params.pop("wait_ms", "0"), 0, MAX_WAIT_MS, text=True)
    count = _whole_number("count", params.pop("count", "1"), 1, MAX_WAIT_COUNT, text=True)
    return wait_ms, count


# Channels ######################################################################

# A dummy to compare a password with when the channel is unknown, so that an
# unknown channel and a wrong password take the same time (step 10).
_DUMMY_PASSWORD = "x" * PASSWORD_MAX_BYTES


class Channels:
    """The registered channels, id -> password, with their own lock: at most
    MAX_CHANNELS, the start-up ones included, which a reset puts back.  Passwords
    are compared in constant time, never shown, logged or stored elsewhere."""

    def __init__(self, channels):
        self._lock = threading.Lock()
        self._passwords = {}
        for channel_id, password in channels.items():
            self.register(channel_id, password)
        self._start = dict(self._passwords)

    def register(self, channel_id, password):
        """Add a channel, or replace its password; returns the canonical id."""
        channel_id, password = check_channel_id(channel_id), check_password(password)
        with self._lock:
            if channel_id not in self._passwords and len(self._passwords) >= MAX_CHANNELS:
                raise GatewayError("too_many_channels", "at most %d channels can be registered; "
                                   "reset the gateway to drop the added ones" % MAX_CHANNELS)
            self._passwords[channel_id] = password
        return channel_id

    def ids(self):
        with self._lock:
            return list(self._passwords)

    def passwords(self):
        """Every registered password: a recording replaces any it finds in a broken body."""
        with self._lock:
            return list(self._passwords.values())

    def password_of(self, channel_id):
        """The channel's password, or None: only a recording asks, to say whether a
        password it replaces was the registered one."""
        return self._passwords.get(channel_id)

    def reset(self):
        with self._lock:
            self._passwords = dict(self._start)

    def authenticate(self, channel_id, password, request):
        """Step 10's lookup: an unknown channel is 404, a known one with another
        password 403, as production tells them apart; returns the channel id.  Both
        compare a password (a dummy for an unknown channel), so they take the same
        time; the journal's note of an unknown channel names some registered ids."""
        expected = self._passwords.get(channel_id)
        matches = _same_secret(password, _DUMMY_PASSWORD if expected is None else expected)
        if expected is None:
            with self._lock:
                known = list(itertools.islice(self._passwords, 3))
                more = len(self._passwords) > 3
            request.add_note("unknown_channel", channel_id,
                             ", ".join(known) + (", ..." if more else "") if known else "none")
            raise GatewayError("channel_not_found", "no channel with this channel_id is "
                               "registered; register it or use a registered one")
        if not matches:
            raise GatewayError("password_mismatch", "password does not match this channel's")
        return _shared_label(channel_id)    # stored with each event: one copy, not one per event


# Faults ########################################################################
#
# A test queues faults to see how its client copes when the gateway fails.  What
# a fault does, in one place:
# - route: the action it strikes, /event/create, /event/update, /event/close, or
#   "*" for any of the three; a thing-scoped route strikes as its action.
# - It strikes right after steps 1-3 (path, token, method): a request those steps
#   refuse is not struck and uses up nothing; every other request of its route is
#   struck, also one that a later step would refuse.  Faults are matched in queue
#   order; each strike uses up one of its count, and the entry goes when none is
#   left.  With probability < 1 a matching request is struck by chance (drawn
#   from the queue's generator, seeded by --seed, so a run repeats); a request not
#   struck passes on to the next queued fault, or is handled.
# - kind "status", when "before": after delay_ms, the request is answered with
#   status (and the code production uses for it, FAULT_CODES) and nothing changes.
# - kind "status", when "after": the request is handled in full, and applied if
#   valid; then, after delay_ms, its answer is replaced by the fault's.  The
#   answer is lost: a retry with the same op_id and body gets the original 200,
#   byte for byte, and nothing is applied twice.
# - kind "drop": as "status", but the connection is closed with no answer at all,
#   as a crashed proxy would; "before" applies nothing, "after" applies it.
# - kind "slow": the request waits delay_ms, then is handled as usual.
# - A client that retries a struck create twice meets a fault of count 3 three
#   times: the create and both retries are struck.
# The queue holds at most MAX_FAULTS entries; a request whose route no entry names
# pays one dictionary look-up, and nothing at all while the queue is empty.

# A queued fault: its route, kind, status, when, strikes left, delay,
# Retry-After and the probability that a matching request is struck.
# Its fields are FAULT_DEFAULTS' keys, written out so that type checkers can read them.
Fault = collections.namedtuple("Fault", ("route", "kind", "status", "when", "count", "delay_ms",
                                         "retry_after_s", "probability"))


class _Drop(Exception):
    """A fault of kind "drop" struck: the answer is no answer at all."""


def _fault_error(fault):
    """The answer of a fault of kind "status"."""
    headers = _AUTH_CHALLENGE if fault.status == 401 else ()
    if fault.retry_after_s is not None:
        headers = (("Retry-After", str(fault.retry_after_s)),)
    return GatewayError(FAULT_CODES[fault.status], "injected fault: this request was failed on "
                        "purpose by a fault queued on the gateway", headers=headers)


def _check_fault(doc):
    """A fault as POST /__admin/faults and add_fault() take it, or invalid_fault naming
    the field.  null means the field's default."""
    fault = {name: (FAULT_DEFAULTS[name] if doc.get(name) is None else doc[name])
             for name in FAULT_DEFAULTS}
    if fault["route"] not in EVENT_ROUTES + ("*",):
        raise GatewayError("invalid_fault", "route must be /event/create, /event/update, "
                           "/event/close or *")
    if fault["kind"] not in ("status", "drop", "slow"):
        raise GatewayError("invalid_fault", "kind must be status, drop or slow")
    if fault["kind"] == "status":
        if not _is_number(fault["status"]) or fault["status"] not in FAULT_CODES:
            raise GatewayError("invalid_fault", "status must be 401, 429, 500 or 503")
        fault["status"] = int(fault["status"])
    elif fault["status"] is not None:
        raise GatewayError("invalid_fault", "status must be left out for kind %s" % fault["kind"])
    if fault["when"] not in ("before", "after"):
        raise GatewayError("invalid_fault", "when must be before or after")
    if fault["kind"] == "slow" and fault["when"] == "after":
        raise GatewayError("invalid_fault", "when cannot be after for kind slow (it fails nothing)")
    _whole_number("count", fault["count"], 1, 10 ** 9, code="invalid_fault")
    _whole_number("delay_ms", fault["delay_ms"], 0, MAX_FAULT_DELAY_MS, code="invalid_fault")
    if fault["retry_after_s"] is not None:
        if fault["status"] not in (429, 503):
            raise GatewayError("invalid_fault", "retry_after_s goes only with status 429 or 503")
        _whole_number("retry_after_s", fault["retry_after_s"], 1, MAX_RETRY_AFTER_S,
                      code="invalid_fault")
    probability = fault["probability"]
    if not (_is_number(probability) and _is_finite(probability) and 0 < probability <= 1):
        raise GatewayError("invalid_fault", "probability must be a number above 0 and at most 1")
    return Fault(**fault)


class FaultQueue:
    """The queued faults, in order, with their own lock (the rules above).

    stopping is an Event that ends every delay at once when the gateway stops."""

    def __init__(self, seed=0, stopping=None):
        self._lock = threading.Lock()
        self._faults = []                          # [Fault], count = strikes left
        # Route -> queued entries: a request whose route is not here skips the queue,
        # and while it is empty (read as false) every request does.
        self.routes = collections.Counter()
        self._random = random.Random(seed)
        self._stopping = stopping or threading.Event()


    def add(self, doc):
        """Queue the fault doc describes (its fields, None for a default); returns the
        strikes queued in all.  A bad field is invalid_fault, one too many entries
        too_many_faults."""
        fault = _check_fault(doc)
        with self._lock:
            if len(self._faults) >= MAX_FAULTS:
                raise GatewayError("too_many_faults", "at most %d faults can be queued; clear "
                                   "them with DELETE /__admin/faults" % MAX_FAULTS)
            self._faults.append(fault)
            self.routes[fault.route] += 1
            return sum(f.count for f in self._faults)

    def view(self):
        with self._lock:
            return [fault._asdict() for fault in self._faults]

    def clear(self):
        """Empty the queue; returns how many strikes were left."""
        with self._lock:
            cleared = sum(f.count for f in self._faults)
            self._faults.clear()
            self.routes.clear()
            return cleared

    def strike(self, action, request):
        """After step 3: the first queued fault for action that strikes.  A "before"
        fault answers now (raises its GatewayError, or _Drop); an "after" one is
        kept on the request for lost_answer(); a "slow" one waits, then lets the
        request go on."""
        with self._lock:
            if not (self.routes[action] or self.routes["*"]):
                return
            fault = self._take(action)
        if fault is None:
            return
        request.fault = fault
        if fault.kind == "slow" or fault.when == "after":
            if fault.kind == "slow":
                self.pause(fault.delay_ms)
            return
        self.pause(fault.delay_ms)
        if fault.kind == "drop":
            raise _Drop()
        raise _fault_error(fault)

    def lost_answer(self, fault):
        """What an "after" fault makes of a handled request's answer, once its delay
        has passed: None for a dropped connection, else the fault's GatewayError."""
        self.pause(fault.delay_ms)
        return None if fault.kind == "drop" else _fault_error(fault)

    def _take(self, action):
        """The first queued fault for action that strikes, one strike used (lock held)."""
        for index, fault in enumerate(self._faults):
            if fault.route not in (action, "*"):
                continue
            if fault.probability < 1 and self._random.random() >= fault.probability:
                continue        # not struck: on to the next queued fault
            if fault.count > 1:
                self._faults[index] = fault._replace(count=fault.count - 1)
            else:
                del self._faults[index]
                self.routes[fault.route] -= 1
                if not self.routes[fault.route]:
                    del self.routes[fault.route]
            return fault._replace(count=1)
        return None

    def pause(self, delay_ms):
        if delay_ms:
            self._stopping.wait(delay_ms / 1000)


# Sans-I/O core #################################################################
#
# EventGateway maps one request to one answer, with no socket: the HTTP shell
# below moves the bytes, and tests call handle() directly.  The class reads as:
# its settings and the embedding API (what a test calls in Python), then one
# request's path through the processing order (a map opens that part), the
# answer's bookkeeping, and last the routes that are not event routes.

def _lower_headers(headers):
    """Header names lower-cased once; accepts a mapping or (name, value) pairs."""
    items = headers.items() if hasattr(headers, "items") else headers
    return {name.lower(): value for name, value in items}


_CONTENT_LENGTH = re.compile(r"[0-9]+")


def _length_value(digits):
    """A Content-Length's digits as a number, at most one past any limit, so that
    no length (4300 digits and more included) makes int() raise or take long."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10 ** 18


def _declared_length(headers):
    """The body length a request head declares: 0 for a chunked body (decoded up
    to the limit by the shell), None for none, 0 for a malformed Content-Length
    (the shell refuses it before asking)."""
    if headers.get("transfer-encoding", "").strip(OWS).lower() == "chunked":
        return 0
    declared = headers.get("content-length")
    if declared is None:
        return None
    declared = declared.strip(OWS)
    return _length_value(declared) if _CONTENT_LENGTH.fullmatch(declared) else 0


class _Request:
    """One request as the core handles it, and what handling it learned that
    the journal and the log line show."""

    __slots__ = ("method", "path", "query", "authority", "headers", "client", "received_at",
                 "route", "segment", "doc", "body_bytes", "channel_id", "op_id", "event_id",
                 "note", "fault", "seq")

    def __init__(self, method, target, headers, client=None):
        self.method, self.headers, self.client = method, headers, client
        self.path, self.query, self.authority = _split_target(target)
        self.received_at = self.route = self.segment = self.doc = self.channel_id = None
        self.body_bytes = 0
        self.op_id = self.event_id = self.note = self.fault = self.seq = None

    def add_note(self, *note):
        """Keep a note for the journal as (code, arguments): see NOTE_TEXTS."""
        self.note = (note,) if self.note is None else self.note + (note,)


# What a route answers that is sent as it is, not in the envelope (the page, the
# icon, the OpenAPI document, a recording): no Content-Type is added.
_AnswerAsIs = collections.namedtuple("_AnswerAsIs", "status headers body")


def _refused(request, error):
    """The steps of refuse(): the shell's own refusal, as the first failure."""
    raise error


class EventGateway:
    """The gateway's logic with no I/O: handle() maps one request to one response.

    gateway_version  the production line to answer as: "1.2" or "1.3" (LINES)
    token            gateway bearer token, or None for no auth (step 2)
    channels         {channel_id: password}; None registers the page's example channel
    max_events       events kept (Store)
    max_history      dispatches kept per event, the create included (Store)
    max_store_mb     the store's memory as a whole, in MiB, as the bound counts it (Store)
    max_requests     entries kept by the request journal; 0 turns it off
    rate_limit       answer production 1.3's rate limit with 429 (step 2a); needs
                     line 1.3 and no token
    allow_hosts      names besides IP literals, localhost and *.localhost that may
                     reach the page and /__admin/ (step 1a); "*" among them allows any
    seed             seed of the generator that draws faults' probabilities
    clock            returns the time in Unix seconds (tests pin it); kept in milliseconds
    log              a text stream for one line per request, or None for silence
    """

    def __init__(self, token=None, channels=None, max_events=DEFAULT_MAX_EVENTS,
                 max_history=DEFAULT_MAX_HISTORY, max_requests=DEFAULT_MAX_REQUESTS, seed=0,
                 clock=time.time, log=None, gateway_version=DEFAULT_LINE, rate_limit=False,
                 allow_hosts=(), max_store_mb=DEFAULT_MAX_STORE_MB, record=None):
        if channels is None:
            channels = {EXAMPLE_CHANNEL_ID: EXAMPLE_CHANNEL_PASSWORD}
        if gateway_version not in LINES:
            raise ValueError("gateway_version must be one of %s" % ", ".join(LINES))
        if max_events < 1 or max_history < 2 or max_requests < 0 or max_store_mb < 1:
            raise ValueError("max_events must be at least 1, max_history at least 2 (the "
                             "create and one more), max_requests at least 0, max_store_mb "
                             "at least 1")
        line = self.line = LINES[gateway_version]
        if rate_limit and (line.rate_limit is None or token is not None):
            raise ValueError("rate_limit needs a line with a rate limit (1.3) and no token: "
                             "production limits only requests without a gateway token")
        self.token = token
        names = {name.strip().lower().rstrip(".") for name in allow_hosts}
        self.allowed_hosts = None if "*" in names else frozenset(names)   # None: any Host
        self.store = EventStore(max_events, max_history, line=line, max_store_mb=max_store_mb)
        self.journal = RequestJournal(max_requests)
        self.clock = clock
        self.log = log
        self.internal_errors = []       # tracebacks of unexpected exceptions (a 500 each)
        self.idle_timeout_s = IDLE_TIMEOUT_S     # the HTTP shell's, shown by info()
        self.channels = Channels(channels)
        self._stopping = threading.Event()
        self.fault_queue = FaultQueue(seed, self._stopping)
        # Step 2a: production counts only when it has no token.
        self.rate_limit = bool(rate_limit)
        self._rate = (None if line.rate_limit is None or token is not None
                      else _RateCounter(*line.rate_limit))
        # Step 1 finds a route among this line's, step 3 its method's answerer.
        self._routes = {path: route for path, route in ROUTES.items()
                        if route.line_field is None or getattr(line, route.line_field)}
        self._handlers = {path: {method: getattr(self, name) for method, name in
                                 route.methods.items()} for path, route in self._routes.items()}
        self._event_route_names = ", ".join(
            path for path, route in self._routes.items() if route.action is not None)
        self._openapi = None            # the OpenAPI document, made when first asked for
        # record: a writable text stream that every exchange, reset and admin line is
        # appended to (section "Comparing with another gateway"); the caller owns it.
        self.recorder = None if record is None else Recorder(record)

    # -- the embedding API ---------------------------------------------------------

    def register_channel(self, channel_id, password):
        """What POST /__admin/channels does: add a channel, or replace its password;
        returns the canonical id."""
        channel_id = self.channels.register(channel_id, password)
        self._record_admin("POST", "/__admin/channels", {"channel_id": channel_id,
                                                         "password": "<password:registered>"})
        return channel_id

    def channel_ids(self):
        """The registered channel ids (never their passwords)."""
        return self.channels.ids()

    def events(self, channel_id=None, thing_id=None, state=None):
        """The stored events, oldest first, as GET /__admin/events shows them."""
        return self.store.views(**_event_filters(channel_id, thing_id, state))

    def event(self, event_id):
        """One stored event as GET /__admin/events/{event_id} shows it, or None."""
        return self.store.get(event_id)

    def requests(self, path=None, status=None, error_code=None, channel_id=None, after=None,
                 method=None):
        """The request journal, oldest first, as GET /__admin/requests shows it;
        status="dropped" selects the requests whose connection was dropped."""
        filters = _request_filters(method, path, status, error_code, channel_id, after)
        return [_request_view(entry) for entry in self.journal.find(**filters)]

    def wait_for_events(self, count=1, timeout=5.0, channel_id=None, thing_id=None, state=None):
        """Wait until count events match the filters; returns them, or raises
        AssertionError after timeout seconds with what the gateway did store."""
        filters = _event_filters(channel_id, thing_id, state)
        found = self._wait(self.store, lambda: self.store.find(**filters), count, timeout)
        views = [_event_view(record) for record in found]
        if len(views) < count:
            raise AssertionError("waited %gs for %d event(s) with %s; the gateway stores %d: %s" % (
                timeout, count, _shown_filters(filters), len(views),
                json.dumps([{k: v[k] for k in ("event_id", "state", "title", "status")}
                            for v in self.store.views()])))
        return views

    def wait_for_requests(self, count=1, timeout=5.0, path=None, status=None, error_code=None,
                          channel_id=None, after=None, method=None):
        """Wait until count journal entries match the filters; returns them, or
        raises AssertionError after timeout seconds with what the gateway did receive."""
        filters = _request_filters(method, path, status, error_code, channel_id, after)
        found = self._wait(self.journal, lambda: self.journal.find(**filters), count, timeout)
        if len(found) < count:
            raise AssertionError("waited %gs for %d request(s) with %s; the gateway received: %s" % (
                timeout, count, _shown_filters(filters), "; ".join(
                    "%s %s %s %s" % (entry[2], entry[3], entry[8], entry[9] or "")
                    for entry in self.journal.find()) or "nothing"))
        return [_request_view(entry) for entry in found]

    def clear_events(self):
        """What DELETE /__admin/events does: drop every event and op_id record."""
        self._record_admin("DELETE", "/__admin/events", None)
        return self.store.clear()

    def clear_requests(self):
        """What DELETE /__admin/requests does: empty the journal (seq goes on)."""
        self._record_admin("DELETE", "/__admin/requests", None)
        return self.journal.clear()

    def reset(self):
        """What POST /__admin/reset does: back to how the gateway started.

        Drops every event, op_id record, journal entry, queued fault, recorded
        internal error and rate-limit count, and puts back the start-up
        channels.  seq and the fault generator's state go on."""
        self.channels.reset()
        del self.internal_errors[:]
        if self._rate is not None:
            self._rate.clear()
        if self.recorder is not None:
            self.recorder.reset(int(self.clock() * 1000))
        return {"events": self.store.clear(), "requests": self.journal.clear(),
                "faults": self.fault_queue.clear()}

    def add_fault(self, route, status=None, count=1, delay_ms=0, when="before", kind="status",
                  retry_after_s=None, probability=1):
        """What POST /__admin/faults does, with the same checks; returns strikes queued.

        Any argument may be None, meaning its default (as null in JSON).  What a
        fault does: the section "Faults" of this module."""
        fault = {"route": route, "status": status, "count": count, "delay_ms": delay_ms,
                 "when": when, "kind": kind, "retry_after_s": retry_after_s,
                 "probability": probability}
        queued = self.fault_queue.add(fault)
        self._record_admin("POST", "/__admin/faults", fault)
        return queued

    def send_status(self, op_id):
        """What GET /send_status/{op_id} shows (in either line), or None."""
        return self.store.send_status(check_op_id_segment(op_id), int(self.clock() * 1000))

    def set_send_status(self, op_id, status):
        """What POST /__admin/send_status/{op_id} does; the send status, or None."""
        op_id = check_op_id_segment(op_id)
        if status not in SEND_STATUSES:
            raise GatewayError("invalid_filter", "status must be one of %s" % ", ".join(SEND_STATUSES))
        found = self.store.set_send_status(op_id, status, int(self.clock() * 1000))
        if found is not None:
            self._record_admin("POST", "/__admin/send_status/" + urllib.parse.quote(op_id),
                               {"status": status})
        return found

    def info(self):
        """What GET /__admin/info shows: the line, the version, auth and every bound."""
        return {"gateway_version": self.line.name, "module_version": __version__,
                "auth": self.token is not None,
                "rate_limit": self.rate_limit,
                "limits": {"max_events": self.store.max_events,
                           "max_history": self.store.max_history,
                           "max_requests": self.journal.max_requests,
                           "max_store_mb": self.store.max_store_bytes >> 20,
                           "max_channels": MAX_CHANNELS, "max_faults": MAX_FAULTS,
                           "max_body_bytes": MAX_BODY_BYTES,
                           "idle_timeout_s": self.idle_timeout_s,
                           "rate_limit_per_ip": RATE_LIMIT_PER_IP,
                           "rate_limit_total": RATE_LIMIT_TOTAL},
                "store_bytes": self.store.stored_bytes}

    def faults(self):
        """What GET /__admin/faults shows: the queued faults, count as strikes left."""
        return self.fault_queue.view()

    def clear_faults(self):
        """What DELETE /__admin/faults does; returns how many strikes were left."""
        self._record_admin("DELETE", "/__admin/faults", None)
        return self.fault_queue.clear()

    def recording(self, **filters):
        """The journal as recording lines (dicts; section "Comparing with another
        gateway"), oldest first, with the filters of requests(): exchanges only,
        since the journal keeps no test-support request."""
        return [self._exchange_of(entry) for entry in self.journal.find(
            **_request_filters(**filters))]

    def _exchange_of(self, entry):
        view = dict(zip(JOURNAL_KEYS, entry))
        target = view["path"] + ("?" + view["query"] if view["query"] else "")
        return exchange_line(view["seq"], view["received_at"], self.line.name, view["method"],
                             target, view["headers"], view["body"], view["status"],
                             entry[_J_ANSWER_HEADERS], view["response"] or b"", view["fault"],
                             view["note"], self.channels, self.token)

    def _record_admin(self, method, target, body):
        if self.recorder is not None:
            self.recorder.admin(method, target, body, int(self.clock() * 1000))

    def stop_waiting(self, stopping=True):
        """End every wait now (the server stops), or let waits wait again."""
        if not stopping:
            self._stopping.clear()
            return
        self._stopping.set()
        for source in (self.store, self.journal):
            source.changed.wake_all()

    def _wait(self, source, select, count, timeout_s):
        """select() until it finds count items, source changes having woken us, or
        timeout_s passes; holds no lock while it sleeps."""
        deadline = time.monotonic() + timeout_s
        while True:
            version = source.changed.version
            found = select()
            remaining = deadline - time.monotonic()
            if len(found) >= count or remaining <= 0 or self._stopping.is_set():
                return found
            source.changed.sleep(version, remaining)

    # -- one request ---------------------------------------------------------------
    #
    # The call path of one request reads down from here, in the numbered order of
    # the module's docstring, each step a method:
    #   handle()                  the entry, for the HTTP shell and for embedders
    #     _answer()               runs _steps(), then journals, logs and answers
    #       _steps()              the order itself:
    #         _steps_1_to_3()     1 _find_route, 1a _check_local_safety, 2 _check_token,
    #                             3 _check_method
    #         _count_and_strike() 2a _count_rate, then a queued fault's strike
    #         _steps_4_and_5()    4 _check_content_type, 5 the body's length
    #         parse_json_body()   6-7 (section "Strict JSON and small helpers")
    #         the route's method  for an event route _event_steps(): 8 _known_fields,
    #                             8a _path_thing, 9 _check_forbidden_fields,
    #                             10 _authenticate_channel, 11 _check_required_fields,
    #                             12 _checked_fields, then EventStore.dispatch() does
    #                             13-16 under the store's lock (section "Store")
    #   check_head()              steps 1-5 from a request's head (_steps_from_head)
    #   refuse()                  the shell's own refusal of broken HTTP framing
    # After the steps: _answer()'s bookkeeping (the error body, the journal, the log
    # line), then the routes that are not event routes.
    #
    # handle() can block: a queued fault's delay_ms, the waits of the test-support
    # lists (?wait_ms=), and the store's lock while another request holds it.  The
    # HTTP shell calls it from one thread per connection.

    def handle(self, method, target, headers, body, client=None):
        """One request through the processing order; returns (status, headers, body).

        target is the request target: a path with its query string, or the
        absolute form (http://host/path?query).  headers is a mapping or
        (name, value) pairs, names in any case.  body is the request body as
        bytes, or None when the request had neither a Content-Length nor a
        chunked body.  client is the client's address (the TCP peer's IP),
        which only production 1.3's rate limit reads (step 2a); without it
        every request counts as one client's.  The answer's headers are (name,
        value) pairs; a HEAD answer has an empty body and the Content-Length
        the GET would have.

        A dropped answer (a queued fault of kind "drop") is (None, [], b""):
        the HTTP shell must then close the connection without sending a byte,
        as a crashed proxy would.  Embedders that call handle() directly see
        the same None.  It can block: see the map above.
        """
        request = _Request(method, target, _lower_headers(headers), client)
        return self._answer(request, self._steps, body, body,
                            None if body is None else len(body))

    def check_head(self, method, target, headers, client=None):
        """Steps 1-5 from the request head alone, before any body is read.

        Returns None when the body should be read and handle() called, or the
        final answer to send instead, as handle() returns it: a refusal of
        steps 1-5, or a queued fault that strikes before step 4 of a request
        that steps 4-5 refuse.  The HTTP shell calls it for a declared body over
        MAX_BODY_BYTES, so as to answer without reading it, and for "Expect:
        100-continue", so as to send the final answer instead of 100.
        """
        request = _Request(method, target, _lower_headers(headers), client)
        declared = _declared_length(request.headers)
        return self._answer(request, self._steps_from_head, declared, None, declared)

    def refuse(self, code, message, method="", target="", headers=None):
        """An error answer that the HTTP shell decides itself (broken HTTP framing)."""
        request = _Request(method, target, headers or {})
        return self._answer(request, _refused, GatewayError(code, message), None, 0)

    def _steps(self, request, body):
        """Steps 1 to 12, the first failure answering, then the store's 13 to 16;
        returns the route's answer: the 200 body's bytes, or an _AnswerAsIs."""
        handler = self._steps_1_to_3(request)
        self._count_and_strike(request)                         # step 2a, and a fault
        self._steps_4_and_5(request, None if body is None else len(body))
        if request.method == "POST" and request.route.json_body:
            request.doc = parse_json_body(body)                 # steps 6-7
            request.body_bytes = len(body)
        result = handler(request)                               # steps 8-16: the route's
        return _success_body(result) if type(result) is dict else result

    def _steps_from_head(self, request, declared):
        """Steps 1-5 as check_head() runs them; None when the body should be read."""
        self._steps_1_to_3(request)
        try:
            self._steps_4_and_5(request, declared)
        except GatewayError:
            # Refused from the head: handle() will not see this request, so it is
            # counted (and may be rate limited, or struck) here.
            self._count_and_strike(request)
            raise
        return None

    def _steps_1_to_3(self, request):
        """Steps 1, 1a, 2 and 3; returns the method that answers the route."""
        route = self._find_route(request)                       # 1
        if route.guard is not None:
            self._check_local_safety(request, route.guard)      # 1a
        if self.token is not None and not route.public:
            self._check_token(request.headers.get("authorization"))     # 2
        return self._check_method(request, route)               # 3

    def _find_route(self, request):
        """Step 1: the route of the path among this line's (no token needed to learn this)."""
        route, request.segment = _match_route(request.path, self._routes)
        if route is None:
            raise GatewayError("route_not_found", "no route %s; the event routes are POST %s"
                               % (_printable(request.path[:100]), self._event_route_names))
        request.route = route
        return route

    def _check_local_safety(self, request, guard):
        """Step 1a: the page and the test-support routes only for this machine's
        names, and the test-support routes ("site") never for another web site."""
        self._check_host(request)
        if guard == "site":
            self._check_same_origin(request)

    def _check_host(self, request):
        """Step 1a: a Host that is not an IP literal, localhost, *.localhost or a name
        given with --allow-host is refused: a site that makes its own name resolve to
        127.0.0.1 (DNS rebinding) would otherwise read the journal as its own."""
        host = request.authority if request.authority is not None else request.headers.get("host")
        if host is None or self.allowed_hosts is None:
            return                      # HTTP/1.0 without a Host; or --allow-host '*'
        name = _host_name(host)
        if name is not None and (_is_local_name(name) or name in self.allowed_hosts):
            return
        shown = _printable(host.strip(OWS)[:100])
        raise GatewayError("host_not_allowed", "Host `%s` may not reach the page or /__admin/ "
                           "(a guard against DNS rebinding); if you reach the gateway by this "
                           "name, start it with --allow-host %s" % (
                               shown, _printable((name or "NAME")[:100])))

    @staticmethod
    def _check_same_origin(request):
        """Step 1a: a request to /__admin/ that another web site made the browser send
        (an Origin other than the gateway's own, "null" included, or Sec-Fetch-Site
        cross-site or same-site) is refused, whatever its method: no preflight
        guards a form or a no-cors fetch.  Clients that send no Origin pass."""
        headers = request.headers
        site = headers.get("sec-fetch-site", "").strip(OWS).lower()
        origin = headers.get("origin")
        if origin is not None:
            host = request.authority if request.authority is not None else headers.get("host")
            if host is not None and origin.strip(OWS).lower() == "http://" + host.strip(OWS).lower():
                origin = None           # the page's own
        if origin is not None or site in ("cross-site", "same-site"):
            raise GatewayError("cross_site_request", "the test-support routes do not answer "
                               "requests that another web site made a browser send; use the "
                               "page this gateway serves, or a client that sends no Origin")

    def _check_token(self, authorization):
        """Step 2: exactly "Bearer <token>", compared in constant time."""
        parts = (authorization or "").split(" ")
        if (len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1]
                or len(parts[1]) > MAX_TOKEN_CHARS or not _same_secret(parts[1], self.token)):
            raise GatewayError("authentication_failed", "send the gateway token as "
                               "'Authorization: Bearer <token>'", headers=_AUTH_CHALLENGE)

    def _check_method(self, request, route):
        """Step 3: a method the route takes; returns the method that answers it."""
        handler = self._handlers[route.path].get(request.method)
        if handler is None:
            raise GatewayError("method_not_allowed", "%s takes %s" % (route.path, route.allow),
                               headers=[("Allow", route.allow)])
        return handler

    def _count_and_strike(self, request):
        """Right after step 3, on an event route: step 2a (production 1.3's rate
        limit), then a queued fault's strike (section "Faults")."""
        action = request.route.action
        if action is None:
            return
        if self._rate is not None:
            self._count_rate(request)
        if self.fault_queue.routes:
            self.fault_queue.strike(action, request)

    def _count_rate(self, request):
        """Step 2a: production 1.3's rate limit, when no token is set.  Answered
        with 429 under rate_limit; otherwise noted for the tester."""
        note = self._rate.over(request.client, request.received_at)
        if note is None:
            return
        if self.rate_limit:
            raise GatewayError("rate_limited", "production's rate limit: %s; wait for the next "
                               "minute" % (RATE_LIMIT_REASONS[len(note) - 1] % note[1:]))
        # Kept as the counter made it, and written out only when read.
        request.note = (note,) if request.note is None else request.note + (note,)

    def _steps_4_and_5(self, request, length):
        """Steps 4 and 5: for a POST that takes JSON, its Content-Type and a body
        length; for every request, a body no larger than MAX_BODY_BYTES.  length
        is the body's, or from the head the declared one; None: no body."""
        if request.method == "POST" and request.route.json_body:
            self._check_content_type(request.headers)           # 4
            if length is None:                                  # 5
                raise GatewayError("length_required", "send the body with a Content-Length "
                                   "header or chunked transfer encoding")
        if length is not None and length > MAX_BODY_BYTES:     # 5, also where a body is ignored
            raise GatewayError("payload_too_large",
                               "body is larger than %d bytes" % MAX_BODY_BYTES)

    @staticmethod
    def _check_content_type(headers):
        """Step 4: application/json, parameters allowed, any case."""
        sent = headers.get("content-type")
        media_type = (sent or "").split(";", 1)[0].strip(OWS).lower()
        if media_type != "application/json":
            raise GatewayError("missing_json_content_type", "Content-Type must be "
                               "application/json; this request sent %s" % (
                                   "none" if sent is None else "`%s`" % _printable(sent[:80])))

    # -- the event routes: steps 8 to 12, then the store ----------------------------

    def _route_event_create(self, request):
        return self._event_steps(CREATE, request)

    def _route_event_update(self, request):
        return self._event_steps(UPDATE, request)

    def _route_event_close(self, request):
        return self._event_steps(CLOSE, request)

    def _event_steps(self, action, request):
        """Steps 8 to 12 of an event route on its parsed body, then steps 13 to 16 in
        EventStore.dispatch(); returns the 200 body's bytes."""
        doc = request.doc
        line = self.line
        if line.refuses_client_op_id and not _is_blank(doc.get("op_id")):
            request.add_note("client_op_id", line.name)      # the page's rule is kept
        doc = self._known_fields(request, doc)                                  # 8
        path_thing = (None if request.segment is None
                      else self._path_thing(request.segment, doc))            # 8a
        self._check_forbidden_fields(action, doc)                               # 9
        channel_id = request.channel_id = self._authenticate_channel(doc, request)  # 10
        self._check_required_fields(action, doc)                                # 11
        fields = self._checked_fields(doc)                                      # 12
        if path_thing is not None:
            fields["thing_id"] = path_thing
        # Steps 13-16 happen in EventStore.dispatch(), under the store's lock, so that
        # a request is replayed, refused or applied whole (section "Store").
        op_id = fields.pop("op_id", None)
        digest = None if op_id is None else _request_digest(action, path_thing, doc)
        body, request.op_id, request.event_id, seq, replayed = self.store.dispatch(
            action, channel_id, op_id, digest, fields, request.received_at, request.body_bytes)
        if replayed:
            request.add_note("replay", seq)
        else:
            request.seq = seq
        return body

    def _known_fields(self, request, doc):
        """Step 8: unknown fields refused, every one named, or (line 1.3) ignored and
        noted; returns the body's known fields."""
        if EVENT_FIELDS.issuperset(doc):
            return doc
        if not self.line.ignore_unknown_fields:
            _reject_unknown(doc, EVENT_FIELDS)
        unknown = doc.keys() - EVENT_FIELDS
        request.add_note("ignored_fields", tuple(sorted(unknown)), self.line.name)
        return {key: value for key, value in doc.items() if key not in unknown}

    @staticmethod
    def _path_thing(segment, doc):
        """Step 8a: the thing named in a thing-scoped route's path, by the thing_id
        rule; a body thing_id that differs from it is refused."""
        if _is_blank(segment):
            raise GatewayError("invalid_thing_id", "the path's thing_id is blank; send "
                               "/thing/{thing_id}/event/... with a thing_id")
        path_thing = check_thing_id(segment)
        body_thing = doc.get("thing_id")
        if isinstance(body_thing, str) and body_thing.strip() and body_thing.strip() != path_thing:
            raise GatewayError("thing_id_mismatch", "the body's thing_id differs from the "
                               "path's; leave it out or send the same thing_id", status=400)
        return path_thing

    def _check_forbidden_fields(self, action, doc):
        """Step 9: fields the route forbids (FORBIDDEN_FIELDS): event_id on create even
        as null; in line 1.3 ended_at on create and update even as null."""
        for field, code in FORBIDDEN_FIELDS[action]:
            if doc.get(field) is not None or (field in doc and (
                    (action == CREATE and field == "event_id")
                    or (field == "ended_at" and self.line.refuse_null_ended_at))):
                raise GatewayError(code, "%s is not allowed on %s%s" % (
                    field, action, "" if doc.get(field) is not None else " (not even as null)"))

    def _authenticate_channel(self, doc, request):
        """Step 10: the credentials, then the lookup."""
        return self.channels.authenticate(*self._credentials(doc), request)

    def _credentials(self, doc):
        """Step 10: channel_id then password, each required and well-formed."""
        if _is_blank(doc.get("channel_id")):
            raise GatewayError("channel_id_required", _required(["channel_id"]))
        channel_id = check_channel_id(doc["channel_id"])
        if _is_blank(doc.get("password")):
            raise GatewayError("password_required", _required(["password"]))
        return channel_id, check_password(doc["password"])

    @staticmethod
    def _check_required_fields(action, doc):
        """Step 11: event_id (but on create), the route's REQUIRED_FIELDS, then
        event_time; the first missing one's code, every missing one named."""
        names, code = REQUIRED_FIELDS[action]
        missing = [name for name in names if _is_blank(doc.get(name))]
        no_event_id = action != CREATE and _is_blank(doc.get("event_id"))
        no_event_time = _is_blank(doc.get("event_time"))
        if missing or no_event_id or no_event_time:
            raise GatewayError(
                "event_id_required" if no_event_id else code if missing else "event_time_required",
                _required((["event_id"] if no_event_id else []) + missing
                          + (["event_time"] if no_event_time else [])))

    @staticmethod
    def _checked_fields(doc):
        """Step 12: the field rules in FIELD_RULES order; returns the fields as stored,
        without those that count as absent."""
        fields = {}
        for name, check in FIELD_RULES:
            value = doc.get(name)
            if value is None:
                if name in NOT_NULL_FIELDS and name in doc:
                    raise GatewayError(NOT_NULL_FIELDS[name], _must_be(
                        name, "an array or an object, not null; leave it out instead"
                        if name == "images" else "an object, not null; leave it out instead"))
                continue
            value = check(value)
            if value is not None:
                fields[name] = value
        return fields

    # -- the answer, the journal and the log line -----------------------------------

    def _answer(self, request, steps, argument, body, body_bytes):
        """Run steps(request, argument); the answer, journaled and logged once.
        None when check_head() finds the body should be read."""
        started = time.perf_counter()
        received_at = request.received_at = int(self.clock() * 1000)    # Unix milliseconds
        outcome = self._outcome(request, steps, argument)
        if outcome is None:
            return None
        status, extra, payload, code, message, as_is = outcome
        fault = request.fault
        if fault is not None and fault.when == "after" and status is not None:
            # The request was handled in full; its answer is now lost (section "Faults").
            lost = self.fault_queue.lost_answer(fault)
            if lost is None:
                status, extra, payload = None, (), b""
            else:
                status, extra, code, message = lost.status, lost.headers, lost.code, lost.message
        request_id = _new_hex_id()
        headers = [("X-Request-Id", request_id)] if as_is or status == 405 else [
            ("Content-Type", "application/json"), ("X-Request-Id", request_id)]
        if code is not None:
            if status is not None:      # a dropped answer keeps its refusal's code for the journal
                payload, locale = self._error_payload(request, code, message, status, request_id)
                headers.append(("Content-Language", locale))
            if code in self.line.lenient_codes:
                rule = _lenient_rule(code, request.doc)
                if rule is not None:
                    request.add_note("lenient", self.line.name, rule)
        headers.extend(extra)
        duration_ms = (time.perf_counter() - started) * 1000
        # The journal's entry (and the recording's line, which a journal of 0 entries
        # still numbers): every answer but those to the routes that are not journaled.
        journaled = ((self.journal.max_requests or self.recorder is not None)
                     and _journaled(request.path, request.route))
        if (journaled or self.log is not None) and (request.event_id is None
                                                     or request.channel_id is None):
            request.op_id, request.event_id, request.channel_id = self._body_ids(request, body)
        if journaled:
            self._record(request, received_at, body, body_bytes, status, code, message,
                         None if request.method == "HEAD" else payload, request_id, duration_ms,
                         () if status is None else headers)
        if self.log is not None:
            self._log_line(request, received_at, status, code, message, request_id, duration_ms)
        if status is None:
            return None, [], b""
        if request.method == "HEAD":
            if status != 204:
                headers.append(("Content-Length", str(len(payload))))
            payload = b""
        return status, headers, payload

    def _outcome(self, request, steps, argument):
        """(status, extra headers, payload, code, message, as_is) of steps(request,
        argument): its answer, a refusal (code and message; the payload is made
        later), a dropped answer (status None), or a bug's 500.  None: read the body."""
        try:
            result = steps(request, argument)
        except GatewayError as error:
            return error.status, error.headers, b"", error.code, error.message, False
        except _Drop:
            return None, (), b"", None, None, False
        except Exception:       # a bug in this module: answer 500 and keep serving
            trace = traceback.format_exc()
            self.internal_errors.append(trace)
            if self.log is not None:
                self.log.write(trace)
            return (500, (), b"", "internal_error", "internal error in the gateway; see its log",
                    False)
        if result is None:
            return None
        if type(result) is bytes:
            return 200, (), result, None, None, False
        return result.status, result.headers, result.body, None, None, True

    def _error_payload(self, request, code, message, status, request_id):
        """(body, locale) of an error answer: production's envelope with problem; a 405
        has no body, and an unknown path is answered before the request is read (en,
        no request_id), as production answers them."""
        if status == 405:
            return b"", "en"            # production's 405 has no body
        if request.route is None:
            # Production answers an unknown path before it reads the request (no
            # request_id either), and broken HTTP is refused before it is routed.
            return _error_body(code, message, status, "en",
                               None if code == "route_not_found" else request_id), "en"
        locale = _locale(request.headers.get("accept-language"), self.line.locales)
        return _error_body(code, message, status, locale, request_id), locale

    def _body_ids(self, request, body):
        """(op_id, event_id, channel_id) the journal and the log line show: the
        answer's, else the body's (parsed for this when no step parsed it)."""
        doc = request.doc
        if doc is None and body and request.route is not None and request.route.action:
            try:
                doc = parse_json_body(body)
            except GatewayError:
                pass
        op_id, event_id, channel_id = request.op_id, request.event_id, request.channel_id
        if doc is not None:
            op_id = op_id or _text_or_none(doc.get("op_id"))
            event_id = event_id or _text_or_none(doc.get("event_id"))
            channel_id = channel_id or canonical_channel_id(doc.get("channel_id"))
        return op_id, event_id, channel_id

    def _record(self, request, received_at, body, body_bytes, status, code, message,
                payload, request_id, duration_ms, answer_headers):
        seq = self.journal.record(
            received_at, request.method, request.path, request.query, request.headers, body,
            body_bytes or 0, status, code, message, payload or None, request_id,
            request.op_id, request.event_id, request.channel_id, request.fault, request.note,
            duration_ms, answer_headers)
        if request.seq is not None:
            request.seq[0] = seq        # a replay of this request names it by this seq
        if self.recorder is not None:
            target = request.path + ("?" + request.query if request.query else "")
            self.recorder.write(exchange_line(
                seq, received_at, self.line.name, request.method, target, request.headers,
                body, status, answer_headers, payload, request.fault, request.note,
                self.channels, self.token, request.doc))

    def _log_line(self, request, received_at, status, code, message, request_id, duration_ms):
        """One printable line of at most MAX_LOG_LINE_CHARS: never a header or body.

        time, method, path, status, code and message, op_id and event_id, note,
        milliseconds, request id.  A line too long loses its middle (the method
        and path are shortened, then the message, ids and note), never the
        time, the status, the milliseconds or the request id, so that an
        answer's X-Request-Id always finds its line."""
        stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(received_at / 1000))
                 + ".%03dZ" % (received_at % 1000))
        head = "%s %s %s %s" % (stamp, _cut(_printable(request.method or "-"), 24),
                                _cut(_printable(request.path or "-"), 160),
                                "dropped" if status is None else status)
        middle = []
        if code is not None:
            middle.append("%s: %s" % (code, message))
        for name in ("op_id", "event_id"):
            value = getattr(request, name)
            if value is not None:
                middle.append("%s=%s" % (name, value))
        if request.note is not None:
            middle.append("(%s)" % _note_text(request.note))
        tail = "%.1fms %s" % (duration_ms, request_id)
        room = MAX_LOG_LINE_CHARS - len(head) - len(tail) - 2
        middle = _cut(_printable(" ".join(middle)), room - 1)
        self.log.write(" ".join(part for part in (head, middle, tail) if part) + "\n")
        self.log.flush()

    # -- the other routes: send status, liveness, the page, test support -----------

    def _route_healthz(self, request):
        return {"status": "ok"}

    def _route_page(self, request):
        return _AnswerAsIs(200, _PAGE_HEADERS, PAGE_BYTES)

    def _route_favicon(self, request):
        return _AnswerAsIs(204, (), b"")

    def _listing(self, request, names, check_filters, source, view, params=None):
        """An admin list (events or requests): its filters checked, its wait waited."""
        params = _query(request.query, names) if params is None else params
        wait_ms, count = _wait_params(params)
        filters = check_filters(**params)
        found = self._wait(source, lambda: source.find(**filters), count, wait_ms / 1000)
        return [view(item) for item in found]

    def _route_admin_events_get(self, request):
        return {"events": self._listing(request, EVENT_FILTERS, _event_filters, self.store,
                                        _event_view)}

    def _route_send_status(self, request):
        # The op_id is checked right after step 3; only the gateway token guards this
        # route (no channel password, as in production), and no rate limit counts it.
        found = self.send_status(request.segment)
        if found is None:
            raise GatewayError("send_status_not_found", "no accepted dispatch with this op_id "
                               "(unknown, dropped, or older than %d days)"
                               % (SEND_STATUS_RETENTION_MS // 86400000))
        return found

    def _route_admin_send_status(self, request):
        _reject_unknown(request.doc, ADMIN_SEND_STATUS_FIELDS)
        found = self.set_send_status(request.segment, request.doc.get("status"))
        if found is None:
            raise GatewayError("send_status_not_found", "no accepted dispatch with this op_id")
        return found

    def _route_admin_info(self, request):
        return self.info()

    def _route_admin_openapi(self, request):
        # The document of this gateway's line, made on first use and kept as the
        # bytes around its server URL, which names the address it was fetched from
        # (the Host that step 1a let through).
        if self._openapi is None:
            text = json.dumps(openapi_document(self.line, _OPENAPI_SERVER_MARK),
                              ensure_ascii=False).encode()
            self._openapi = text.split(json.dumps(_OPENAPI_SERVER_MARK).encode(), 1)
        host = request.authority if request.authority is not None else request.headers.get("host")
        server = "http://%s" % host.strip(OWS) if host else "http://127.0.0.1:%d" % DEFAULT_PORT
        before, after = self._openapi
        return _AnswerAsIs(200, (("Content-Type", "application/json"),),
                    before + json.dumps(server).encode() + after)

    def _route_admin_event_get(self, request):
        event = self.event(request.segment)
        if event is None:
            raise GatewayError("event_not_found", "no event with this event_id")
        return event

    def _route_admin_events_delete(self, request):
        return {"deleted": self.clear_events()}

    def _route_admin_requests_get(self, request):
        params = _query(request.query, REQUEST_FILTERS + ("format",))
        form = params.pop("format", None)
        if form is None:
            return {"requests": self._listing(request, REQUEST_FILTERS, _request_filters,
                                              self.journal, _request_view, params)}
        if form != "jsonl":
            raise GatewayError("invalid_filter", "format must be jsonl (a recording), or left "
                                                 "out (the journal's JSON)")
        lines = self._listing(request, REQUEST_FILTERS, _request_filters, self.journal,
                              self._exchange_of, params)
        return _AnswerAsIs(200, (("Content-Type", "application/x-ndjson"),),
                    "".join(_recording_text(line) for line in lines).encode("utf-8"))

    def _route_admin_requests_delete(self, request):
        return {"deleted": self.clear_requests()}

    def _route_admin_reset(self, request):
        return self.reset()

    def _route_admin_channels_get(self, request):
        return {"channels": self.channel_ids()}

    def _route_admin_channels_post(self, request):
        _reject_unknown(request.doc, ADMIN_CHANNEL_FIELDS)
        return {"channel_id": self.register_channel(*self._credentials(request.doc))}

    def _route_admin_faults_get(self, request):
        return {"faults": self.faults()}

    def _route_admin_faults_post(self, request):
        _reject_unknown(request.doc, FAULT_DEFAULTS.keys())
        return {"queued": self.add_fault(**dict(FAULT_DEFAULTS, **request.doc))}

    def _route_admin_faults_delete(self, request):
        return {"cleared": self.clear_faults()}


# The OpenAPI description #######################################################
#
# GET /__admin/openapi.json (and --openapi) answers an OpenAPI 3.1 document of the
# running line, built from the tables above (ROUTES, the limits of the field
# rules and FIELD_CODES, ERRORS, LINES), never written out by hand: a change to a
# rule changes the document.  It is built once per gateway, when first asked for.

# What any request may be answered, whatever its route: broken HTTP (the shell),
# and a bug in this module.
_ANY_ROUTE_CODES = ("bad_request", "uri_too_long", "header_fields_too_large",
                    "http_version_not_supported", "internal_error")
_JSON_BODY_CODES = ("missing_json_content_type", "payload_too_large", "length_required",
                    "invalid_json_syntax", "invalid_json_data")
_LOCAL_SAFETY_CODES = ("host_not_allowed", "cross_site_request")

# What each route but the event routes answers besides its 200 (and the codes above).
ROUTE_CODES = MappingProxyType({
    ("/send_status/{op_id}", "GET"): ("invalid_op_id", "send_status_not_found"),
    ("/__admin/events", "GET"): ("invalid_filter",),
    ("/__admin/events/{event_id}", "GET"): ("event_not_found",),
    ("/__admin/requests", "GET"): ("invalid_filter",),
    ("/__admin/reset", "POST"): ("payload_too_large",),
    ("/__admin/channels", "POST"): _JSON_BODY_CODES + FIELD_CODES["channel_id"]
    + FIELD_CODES["password"] + ("too_many_channels",),
    ("/__admin/faults", "POST"): _JSON_BODY_CODES + ("invalid_fault", "too_many_faults"),
    ("/__admin/send_status/{op_id}", "POST"): _JSON_BODY_CODES + (
        "invalid_op_id", "invalid_filter", "send_status_not_found"),
})


def _event_route_codes(line, action, thing_scoped):
    """Every code an event route of line can answer, in step order."""
    codes = ["authentication_failed"] + list(_JSON_BODY_CODES)
    if line.rate_limit is not None:
        codes.append("rate_limited")                              # step 2a
    if thing_scoped:
        codes += ["invalid_thing_id", "thing_id_mismatch"]        # step 8a
    codes += [code for _, code in FORBIDDEN_FIELDS[action]]       # step 9
    codes += list(FIELD_CODES["channel_id"] + FIELD_CODES["password"])
    codes += ["channel_not_found", "password_mismatch"]           # step 10
    codes.append(REQUIRED_FIELDS[action][1])                      # step 11
    forbidden = {name for name, _ in FORBIDDEN_FIELDS[action]}
    for name, _ in FIELD_RULES:                                   # steps 11-12
        if name in forbidden:
            continue            # step 9 refuses the field before its rule could
        codes += [code for code in FIELD_CODES[name]
                  if code != "event_id_required" or action != CREATE]
    codes.append(line.op_id_conflict)                             # step 13
    if action != CREATE:
        codes += ["event_not_found", "event_closed", "thing_id_mismatch"]   # step 14
    else:
        codes.append("store_full")                                # step 15
    codes += list(FAULT_CODES.values()) + list(_ANY_ROUTE_CODES)  # faults, broken HTTP, bugs
    return list(dict.fromkeys(codes))


def route_codes(line, path, method):
    """Every code the route can answer in line: what its document lists."""
    route = ROUTES[path]
    if route.action is not None:
        return _event_route_codes(line, route.action, path != route.action)
    if method == "HEAD":
        method = "GET"
    codes = [] if route.public else ["authentication_failed"]
    if route.guard is not None:
        codes += list(_LOCAL_SAFETY_CODES)
    codes += list(ROUTE_CODES.get((path, method), ()))
    return list(dict.fromkeys(codes + list(_ANY_ROUTE_CODES)))


def _text(max_chars=None, min_chars=None, max_bytes=None, min_bytes=None, pattern=None,
          nullable=False, description=None):
    """A string schema; a limit in UTF-8 bytes is maxLength of that number, with the
    x-max-utf8-bytes extension and a description that says it counts bytes."""
    schema = {"type": ["string", "null"] if nullable else "string"}
    if min_chars is not None:
        schema["minLength"] = min_chars
    if max_chars is not None:
        schema["maxLength"] = max_chars
    if max_bytes is not None:
        schema["maxLength"] = max_bytes
        schema["x-max-utf8-bytes"] = max_bytes
    if min_bytes is not None:
        schema["x-min-utf8-bytes"] = min_bytes
    if pattern is not None:
        schema["pattern"] = pattern
    notes = [description] if description else []
    if max_bytes is not None:
        notes.append("At most %d bytes of UTF-8 after trimming (maxLength counts bytes here)."
                     % max_bytes)
    if min_bytes is not None:
        notes.append("At least %d bytes of UTF-8 after trimming." % min_bytes)
    if notes:
        schema["description"] = " ".join(notes)
    return schema


_ID_PATTERN = "^%s$" % _ID_CHARS.pattern


def _trimmed_text(max_chars=None, max_bytes=None, min_bytes=None, id_chars=False,
                  optional=False, nullable=False, description=None):
    """The schema of a string that its rule trims before it checks it.

    Its limits count the trimmed text, which maxLength cannot say (a value padded
    with spaces passes the rule), so the pattern says them: white space, then the
    text (at most max_chars characters, or max_bytes for a limit in bytes, which
    is never fewer characters), then white space.  An optional field that is empty
    after trimming counts as absent.  The limit is also stated as an x- keyword.
    """
    most = max_chars if max_chars is not None else max_bytes
    if id_chars:
        text = "%s{1,%d}" % (_ID_CHARS.pattern[:-1], most)      # the class without its +
    else:
        text = "\\S" if most == 1 else "\\S([\\s\\S]{0,%d}\\S)?" % (most - 2)
    schema = {"type": ["string", "null"] if nullable else "string",
              "pattern": "^\\s*(%s)%s\\s*$" % (text, "?" if optional else "")}
    notes = [description] if description else []
    if max_chars is not None:
        schema["x-max-chars-after-trimming"] = max_chars
        notes.append("At most %d characters after trimming." % max_chars)
    if max_bytes is not None:
        schema["x-max-utf8-bytes"] = max_bytes
        notes.append("At most %d bytes of UTF-8 after trimming." % max_bytes)
    if min_bytes is not None:
        schema["x-min-utf8-bytes"] = min_bytes
        notes.append("At least %d bytes of UTF-8 after trimming." % min_bytes)
    notes.append("Empty after trimming: absent." if optional else "Not empty after trimming.")
    schema["description"] = " ".join(notes)
    return schema


_TIMESTAMP = {"type": "integer", "minimum": 0, "exclusiveMaximum": MILLISECONDS_BELOW,
              "description": "Unix seconds below %d, Unix milliseconds from there; a whole "
                             "number (no fraction, no string)" % SECONDS_BELOW}


def _field_schemas():
    """Each field of the event routes as its rule checks it, from the rule's limits."""
    return {
        "channel_id": _text(min_chars=CROCKFORD_SYMBOLS, description=(
            "Crockford base32 of 128 bits: %d symbols of %s, any case; '-' and spaces are "
            "ignored, O reads as 0, I and L as 1" % (CROCKFORD_SYMBOLS, CROCKFORD_ALPHABET))),
        "password": _trimmed_text(max_bytes=PASSWORD_MAX_BYTES, min_bytes=PASSWORD_MIN_BYTES),
        "op_id": _trimmed_text(max_chars=OP_ID_MAX_CHARS, id_chars=True, optional=True,
                               nullable=True, description="Idempotency key; absent: the "
                                                          "gateway generates one."),
        "thing_id": _trimmed_text(max_chars=THING_ID_MAX_CHARS, id_chars=True, optional=True,
                                  nullable=True, description="Absent: no thing (on update "
                                                             "and close: the event's)."),
        "ciphertext": {"type": ["string", "null"], "description": "End-to-end encrypted "
                       "payload; kept with the dispatch. Empty after trimming: absent."},
        "event_id": _trimmed_text(max_chars=EVENT_ID_MAX_CHARS, id_chars=True),
        "title": _trimmed_text(max_chars=TITLE_MAX_CHARS),
        "description": _trimmed_text(max_chars=DESCRIPTION_MAX_CHARS, optional=True,
                                     nullable=True),
        "status": _trimmed_text(max_chars=STATUS_MAX_CHARS),
        "message": _trimmed_text(max_chars=MESSAGE_MAX_CHARS),
        "severity": {"type": "string", "enum": list(SEVERITIES),
                     "description": "Any case; stored lower-case"},
        "event_time": dict(_TIMESTAMP),
        "started_at": dict(_TIMESTAMP, type=["integer", "null"]),
        "ended_at": dict(_TIMESTAMP, type=["integer", "null"]),
        "tags": {"type": ["array", "null"], "maxItems": TAGS_MAX_ITEMS,
                 "items": _trimmed_text(max_bytes=TAG_MAX_BYTES)},
        "images": {"type": "array", "maxItems": IMAGES_MAX_ITEMS,
                   "items": _trimmed_text(max_bytes=IMAGE_MAX_BYTES)},
        "attrs": {"type": "object", "description": "A patch: a scalar sets a key, null deletes "
                  "it, a one-level object of scalars replaces it",
                  "additionalProperties": {"anyOf": [
                      {"type": ["string", "number", "boolean", "null"]},
                      {"type": "object", "additionalProperties": {
                          "type": ["string", "number", "boolean", "null"]}}]}},
        "metadata": {"type": ["object", "null"],
                     "propertyNames": _trimmed_text(max_bytes=METADATA_KEY_MAX_BYTES),
                     "additionalProperties": {"anyOf": [
                         _trimmed_text(max_bytes=METADATA_VALUE_MAX_BYTES),
                         {"type": ["number", "boolean"]}]}},
    }


# A {thing_id} or {op_id} path segment: an empty one is an unknown path, a blank one
# is refused by the field's rule.
_PATH_SEGMENT_SCHEMAS = MappingProxyType({
    "thing_id": _trimmed_text(max_chars=THING_ID_MAX_CHARS, id_chars=True),
    "op_id": _trimmed_text(max_chars=OP_ID_MAX_CHARS, id_chars=True),
})


def _request_schema(line, action):
    """The body of an event route of line: its fields, the required ones, and what
    the route forbids (false: must be absent; null: may be null)."""
    fields = _field_schemas()
    names, _ = REQUIRED_FIELDS[action]
    required = ["channel_id", "password"] + ([] if action == CREATE else ["event_id"])
    required += list(names) + ["event_time"]
    properties = {name: fields[name] for name in ["channel_id", "password"]
                  + [name for name, _ in FIELD_RULES]}
    for name, _ in FORBIDDEN_FIELDS[action]:
        null_allowed = not (name == "event_id" and action == CREATE) and not (
            name == "ended_at" and line.refuse_null_ended_at)
        properties[name] = {"type": "null"} if null_allowed else False
    return {"type": "object", "required": required, "properties": properties,
            "additionalProperties": line.ignore_unknown_fields}


def _success_schema(data):
    return {"type": "object", "required": ["success", "data"], "additionalProperties": False,
            "properties": {"success": {"const": True}, "data": data}}


def _dispatch_data_schema(line):
    ids = _text(pattern=_ID_PATTERN)
    generated = ("the receive time in Unix ms as 13 hex digits, '-', 32 hex digits"
                 if line.op_id_time_prefix else "32 lowercase hex digits")
    properties = {"channel_id": _text(description="canonical, upper case"),
                  "op_id": dict(ids, description="the request's, or generated: " + generated),
                  "event_id": ids, "thing_id": ids, "accepted": {"const": True}}
    return {"type": "object", "additionalProperties": False,
            "required": [key for key in line.success_keys if key != "thing_id"],
            "properties": {key: properties[key] for key in line.success_keys}}


_ERROR_SCHEMA = {"type": "object", "additionalProperties": False,
                 "required": ["success", "error", "error_code", "problem"],
                 "properties": {
                     "success": {"const": False},
                     "error": {"type": "string"},
                     "error_code": {"type": "string"},
                     "problem": {"$ref": "#/components/schemas/Problem"}}}


def _error_schema(codes):
    """The error envelope, its error_code one of codes."""
    return {"allOf": [{"$ref": "#/components/schemas/Error"},
                      {"properties": {"error_code": {"enum": codes}}}]}


def _problem_schema(line):
    return {"type": "object", "additionalProperties": False,
            "required": ["code", "category", "status", "title", "detail", "localized_message",
                         "locale", "retryable"],
            "properties": {
                "code": {"type": "string"},
                "category": {"type": "string", "enum": sorted(set(
                    category for category, _ in _PROBLEM_OF.values()))},
                "status": {"type": "integer"},
                "title": {"type": "string"},
                "detail": {"type": "string"},
                "localized_message": {"type": "string"},
                "locale": {"type": "string", "enum": list(line.locales)},
                "retryable": {"type": "boolean"},
                "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                               "description": "= X-Request-Id; absent on route_not_found"}}}


_SEND_STATUS_SCHEMA = {"type": "object", "additionalProperties": False,
                       "required": ["op_id", "status", "model", "entity_id", "accepted_at",
                                    "updated_at", "expires_at"],
                       "properties": {"op_id": {"type": "string"},
                                      "status": {"type": "string", "enum": list(SEND_STATUSES)},
                                      "model": {"const": "event"},
                                      "entity_id": {"type": "string"},
                                      "accepted_at": {"type": "integer"},
                                      "updated_at": {"type": "integer"},
                                      "expires_at": {"type": "integer"}}}

# Stands for the server URL in the kept bytes of GET /__admin/openapi.json.
_OPENAPI_SERVER_MARK = "<the address the document was fetched from>"

_HEADER_DOCS = MappingProxyType({
    "X-Request-Id": "32 lowercase hex digits; the request's line in the log and the journal",
    "Content-Language": "the locale of problem.localized_message",
    "WWW-Authenticate": "Bearer",
    "Retry-After": "seconds, when a queued fault sets retry_after_s",
    "Allow": "the methods a path takes, on the bodiless 405 that any other method gets",
})


def _responses(line, path, method):
    """The responses of one operation: its 200 (or 204) and each error status with
    the codes it can carry, every one with its headers."""
    head = method == "HEAD"
    request_id = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    if ROUTES[path].action is not None:
        ok = {"$ref": "#/components/schemas/DispatchAnswer"}
    elif path == "/send_status/{op_id}":
        ok = _success_schema({"$ref": "#/components/schemas/SendStatus"})
    elif path in ("/healthz", "/readyz"):
        ok = _success_schema({"type": "object", "required": ["status"],
                              "properties": {"status": {"const": "ok"}}})
    else:
        ok = _success_schema({"type": "object"})
    if path == "/favicon.ico":
        responses = {"204": {"description": "no icon", "headers": request_id}}
    elif path == "/":
        responses = {"200": {"description": "the live page", "headers": request_id,
                             "content": {} if head else {"text/html": {"schema": {
                                 "type": "string"}}}}}
    else:
        responses = {"200": {"description": "success", "headers": request_id,
                             "content": {} if head else {"application/json": {"schema": ok}}}}
    by_status = {}
    for code in route_codes(line, path, method):
        by_status.setdefault(ERRORS[code], []).append(code)
    if "thing_id_mismatch" in by_status.get(409, ()) and path.startswith(THING_PREFIX):
        by_status.setdefault(400, []).append("thing_id_mismatch")     # step 8a's status
    for status in sorted(by_status):
        headers = dict(request_id, **{"Content-Language": {
            "$ref": "#/components/headers/Content-Language"}})
        if status == 401:
            headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        responses[str(status)] = {
            "description": ", ".join(by_status[status]), "headers": headers,
            "content": {} if head else {"application/json": {
                "schema": _error_schema(by_status[status])}}}
    for response in responses.values():
        if not response.get("content"):
            response.pop("content", None)
    return responses


def _example_bodies():
    """The public page's curl example, in seconds as the page first had it and in
    milliseconds as it has it now."""
    seconds = {"channel_id": EXAMPLE_CHANNEL_ID, "password": EXAMPLE_CHANNEL_PASSWORD,
               "title": "Database lag", "status": "ongoing", "message": "Replica delay > 30s",
               "severity": "high", "event_time": 1713750000, "started_at": 1713750000,
               "tags": ["db", "replica"]}
    millis = dict(seconds, event_time=1713750000000, started_at=1713750000000)
    return {"seconds": {"summary": "the page's example, in seconds", "value": seconds},
            "milliseconds": {"summary": "the same, in milliseconds", "value": millis}}


def openapi_document(line, server="http://127.0.0.1:%d" % DEFAULT_PORT):
    """The OpenAPI 3.1 description of line (a LINES record), as a dict; server is
    the base URL it names (GET /__admin/openapi.json names the one it was fetched from)."""
    paths = {}
    for path, route in ROUTES.items():
        if route.line_field is not None and not getattr(line, route.line_field):
            continue
        item = paths[path] = {}
        if "{" in path:
            name = path.split("{", 1)[1].split("}", 1)[0]
            item["parameters"] = [{"name": name, "in": "path", "required": True,
                                   "schema": _PATH_SEGMENT_SCHEMAS.get(name) or _text(min_chars=1)}]
        for method in sorted(route.methods):
            operation = {
                "operationId": (method.lower() + path.replace("{", "").replace("}", "")
                                .replace("/", "_").replace(".", "_")).rstrip("_"),
                "tags": ["test-support" if path.startswith(ADMIN_PREFIX)
                         else "events" if route.action is not None else "gateway"],
                "parameters": [{"$ref": "#/components/parameters/Accept-Language"}],
                "responses": _responses(line, path, method)}
            if not route.public:
                operation["security"] = [{}, {"bearer": []}]
            action = route.action
            if action is not None:
                operation["summary"] = {CREATE: "open an event", UPDATE: "change an open event",
                                        CLOSE: "close an open event"}[action]
                operation["description"] = (
                    "Without a gateway token, production %s answers 429 rate_limited past %d "
                    "requests per client IP and %d in all per calendar minute." % (
                        line.name, line.rate_limit[0], line.rate_limit[1])
                    if line.rate_limit else
                    "Production %s has no rate limit; a 429 comes only from a queued fault."
                    % line.name)
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/%sRequest" % action.rsplit(
                        "/", 1)[1].capitalize()},
                    **({"examples": _example_bodies()} if action == CREATE else {})}}}
            elif method == "POST" and route.json_body:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"type": "object"}}}}
            item[method.lower()] = operation
    schemas = {"%sRequest" % action.rsplit("/", 1)[1].capitalize(): _request_schema(line, action)
               for action in EVENT_ROUTES}
    schemas["DispatchAnswer"] = _success_schema(_dispatch_data_schema(line))
    schemas["SendStatus"] = _SEND_STATUS_SCHEMA
    schemas["Problem"] = _problem_schema(line)
    schemas["Error"] = _ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {"title": "PushGo Event API, as production %s answers it" % line.name,
                 "version": __version__,
                 "description": "Generated by event_gateway %s from the tables that its "
                                "checks use; production line %s (%s)."
                                % (__version__, line.name, line.releases)},
        "servers": [{"url": server}],
        "tags": [{"name": "events", "description": "the Event API"},
                 {"name": "gateway", "description": "probes, send status, the live page"},
                 {"name": "test-support", "description": "this gateway's own routes for "
                                                         "tests; not part of the PushGo API"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "parameters": {"Accept-Language": {
                "name": "Accept-Language", "in": "header", "required": False,
                "schema": {"type": "string"},
                "description": "the locale of an error's problem.localized_message: %s; "
                               "anything else is en" % ", ".join(line.locales)}},
            "headers": {name: {"description": text, "schema": {"type": "string"}}
                        for name, text in _HEADER_DOCS.items()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the gateway token, when it has one"}}},
    }


# HTTP shell ####################################################################

_REASONS = MappingProxyType({status.value: status.phrase for status in http.HTTPStatus})

_HTTP_VERSION = re.compile(r"HTTP/[0-9]+\.[0-9]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110 token

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
        if transfer_encoding.strip(OWS).lower() != "chunked":
            raise _BadFraming("Transfer-Encoding must be chunked")
        if content_length is not None:
            raise _BadFraming("send Content-Length or chunked encoding, not both")
        return None, True
    if content_length is None:
        return None, False
    length = content_length.strip(OWS)
    if "," in length:           # repeated headers, joined: all must agree
        lengths = set(value.strip(OWS) for value in length.split(","))
        if len(lengths) > 1:
            raise _BadFraming("conflicting Content-Length headers")
        length = lengths.pop()
    if not _CONTENT_LENGTH.fullmatch(length):
        raise _BadFraming("Content-Length must be a whole number of bytes")
    return _length_value(length), False


def _tokens(value):
    """The lower-cased tokens of a comma-separated header value."""
    return {token.strip(OWS).lower() for token in value.split(",")}


def _kernel_idle_timeout(connection, seconds):
    """Have the kernel end any read or write on connection that waits over seconds;
    False where it cannot, and then the socket's own timeout is set instead.

    A Python socket with a timeout polls before every recv() and send(): two more
    system calls per request, each of which lets other threads take the
    interpreter, and under many clients they do.  SO_RCVTIMEO and SO_SNDTIMEO
    keep the same timeout in the kernel: a wait that runs out fails with EAGAIN,
    which _Reader and _Writer raise as TimeoutError, as the socket's own timeout
    would.  Windows takes these options in another form."""
    if os.name == "nt":
        return False
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1000000))
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except (AttributeError, OSError):
        return False
    return True


class _Reader(io.RawIOBase):
    """A connection's reading end (under a buffer); an idle timeout is TimeoutError."""

    def __init__(self, connection):
        self._connection = connection

    def readable(self):
        return True

    def readinto(self, buffer):
        try:
            return self._connection.recv_into(buffer)
        except BlockingIOError:
            raise TimeoutError("no byte came within the idle timeout") from None


class _Writer(io.RawIOBase):
    """A connection's writing end, unbuffered; an idle timeout is TimeoutError."""

    def __init__(self, connection):
        self._connection = connection

    def writable(self):
        return True

    def write(self, data):
        try:
            self._connection.sendall(data)
        except BlockingIOError:
            raise TimeoutError("the client read nothing within the idle timeout") from None
        return len(data)


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
        # A request is under way from its first line to its answer: a server that stops
        # lets it answer (close_connections).  One that ends without an answer closes.
        self.server.busy[self.connection] = True
        self.command, self.path, self.headers = None, "", {}
        self.request_version = "HTTP/1.1"     # what an answer sent before the version says
        self.close_connection = True
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) != 3 or not all(words):
            self.send_error(400)
            return False
        method, target, version = words
        self.command, self.path = method, target     # a refusal's journal entry shows them
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505 if _HTTP_VERSION.fullmatch(version) else 400)
            return False
        self.request_version = version
        headers = self.headers = {}
        head_bytes = 0
        for _ in range(MAX_HEADER_LINES + 1):
            head_line = self.rfile.readline(MAX_HEAD_LINE_BYTES + 1)
            if head_line in (b"\r\n", b"\n"):
                break
            if not head_line:
                return False                   # the client went away mid-head
            head_bytes += len(head_line)
            if len(head_line) > MAX_HEAD_LINE_BYTES or head_bytes > MAX_HEAD_BYTES:
                self.send_error(431)
                return False
            name, colon, value = head_line.decode("latin-1").partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                self.send_error(400)
                return False
            # Only SP and HTAB are optional whitespace: "\x0bchunked" is not "chunked".
            name, value = name.lower(), value.rstrip("\r\n").strip(OWS)
            headers[name] = headers[name] + ", " + value if name in headers else value
        else:
            self.send_error(431)
            return False
        connection = _tokens(headers.get("connection", ""))
        if version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        if version == "HTTP/1.1" and headers.get("expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def setup(self):
        # In place of StreamRequestHandler.setup(), for the idle timeout's sake
        # (see _kernel_idle_timeout).
        self.connection = connection = self.request
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)    # Nagle off
        if not _kernel_idle_timeout(connection, self.server.idle_timeout):
            connection.settimeout(self.server.idle_timeout)
        self.rfile = io.BufferedReader(_Reader(connection))
        self.wfile = _Writer(connection)

    def __getattr__(self, name):
        # The stdlib answers a method with no do_<METHOD> with an HTML 501; here
        # every method (PUT, PATCH, BREW...) reaches the gateway, which says 405.
        if name.startswith("do_"):
            return self._relay
        raise AttributeError(name)

    def _relay(self):
        """Read the body the head declares, hand the request to the gateway, send its answer."""
        gateway = self.server.gateway
        headers = self.headers
        try:
            length, chunked = _framing(headers.get("transfer-encoding"),
                                       headers.get("content-length"))
        except _BadFraming as problem:
            self.close_connection = True
            self._send(gateway.refuse("bad_request", str(problem), self.command, self.path,
                                      headers))
            return
        if length is not None and length > MAX_BODY_BYTES:
            # Refuse before reading (413, or whatever comes first of steps 1-5); the
            # unread body makes the connection unusable.  Any smaller body is read,
            # and handle() runs the same steps with it.
            refusal = gateway.check_head(self.command, self.path, headers, self.client_address[0])
            if refusal is not None:
                self.close_connection = True
                self._send(refusal)
                return
        if chunked:
            try:
                body = self._read_chunked()
            except _BadFraming as problem:
                self.close_connection = True
                self._send(gateway.refuse("bad_request", str(problem), self.command, self.path,
                                          headers))
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
        self._send(gateway.handle(self.command, self.path, headers, body,
                                           self.client_address[0]))

    # The methods the routes take, found without a call to __getattr__.
    do_GET = do_HEAD = do_POST = do_DELETE = _relay

    def _read_chunked(self):
        """A chunked body, decoded up to one byte over MAX_BODY_BYTES."""
        body = bytearray()
        while True:
            size_line = self.rfile.readline(MAX_CHUNK_LINE_BYTES)
            if not size_line.endswith(b"\n"):
                raise _BadFraming("chunk size line is missing or too long")
            size_text = size_line.split(b";", 1)[0].strip()
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
        # Refuse before the client sends the body (curl sends Expect for bodies over 1 KiB).
        refusal = self.server.gateway.check_head(self.command, self.path, self.headers,
                                                 self.client_address[0])
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
                                              self.command or "", getattr(self, "path", ""),
                                              getattr(self, "headers", None)))

    def _send(self, response):
        """The whole response in one write; a dropped answer (status None) closes."""
        status, headers, body = response
        if status is None:
            self.close_connection = True
            return
        head = ["%s %d %s\r\n" % (self.protocol_version, status, _REASONS.get(status, ""))]
        head.extend("%s: %s\r\n" % pair for pair in headers)
        if self.command != "HEAD" and status != 204:     # a HEAD answer carries its own
            head.append("Content-Length: %d\r\n" % len(body))
        head.append("Date: %s\r\nServer: %s\r\n" % (self.server.http_date(), self.server_version))
        if self.server.stopping:
            self.close_connection = True        # the server stops: this is the last answer
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        self.wfile.write("".join(head).encode("latin-1") + body)
        self.server.busy[self.connection] = False
        if self.server.stopping:
            self.server.answered()          # close_connections() waits for this answer

    def log_message(self, format, *args):
        pass    # the gateway writes the one log line per request


def _shut(connection):
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass        # already closed by its client


class _Server(http.server.ThreadingHTTPServer):
    """A thread per connection (daemon threads), so a slow client stalls nobody.

    It knows its open connections, so that close_connections() can end every
    one of them when the server stops, and it backs off when the process is
    out of file descriptors instead of spinning on accept()."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, gateway, idle_timeout):
        self.gateway = gateway
        self.idle_timeout = idle_timeout
        self._date = (0, "")
        self._connections = set()
        # Connections with a request under way: a dict store at each request's start
        # and answer, no lock; only a server that stops waits on _idle for them.
        self.busy = {}
        self._connections_lock = threading.Lock()
        self._idle = threading.Condition(self._connections_lock)
        self.closing = threading.Event()
        self.stopping = False
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

    def get_request(self):
        try:
            return super().get_request()
        except OSError as error:
            # Out of descriptors, the listening socket stays readable: without a
            # pause, serve_forever() would call accept() again at once, forever.
            if error.errno in (errno.EMFILE, errno.ENFILE):
                self.closing.wait(ACCEPT_BACKOFF_S)
            raise

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
            self.busy.pop(request, None)
            self._idle.notify_all()
        super().shutdown_request(request)

    def answered(self):
        with self._connections_lock:
            self._idle.notify_all()

    def stop(self):
        """Make serve_forever() return now, not after its poll interval: shutdown()
        only sets a flag that the serving loop reads when its wait ends, so a
        connection to the listening socket ends the wait (again, until the loop
        has seen the flag).  Call it from another thread than the serving one."""
        stopping = threading.Thread(target=self.shutdown, name="event-gateway stop")
        stopping.start()
        while stopping.is_alive():
            try:
                with socket.create_connection(self.server_address[:2], timeout=1):
                    pass
            except OSError:
                pass        # the listening socket is gone or full: the poll interval ends it
            stopping.join(0.002)

    def close_connections(self):
        """End every wait and every open connection (keep-alive ones included).

        A request under way answers first, with what there is (a wait ends at
        once), for at most STOP_GRACE_S; an idle connection is closed at once."""
        self.stopping = True
        self.closing.set()
        self.gateway.stop_waiting()
        deadline = time.monotonic() + STOP_GRACE_S
        with self._connections_lock:
            for connection in self._connections:
                if not self.busy.get(connection):
                    _shut(connection)
            while (any(self.busy.get(connection) for connection in self._connections)
                   and time.monotonic() < deadline):
                self._idle.wait(deadline - time.monotonic())
            connections = list(self._connections)
        for connection in connections:
            _shut(connection)
        # A handler thread then reads EOF, answers nothing more and closes its socket.

    def handle_error(self, request, client_address):
        # A client that resets or times out its connection is no error of ours.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        self.gateway.internal_errors.append(traceback.format_exc())
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(gateway, host=DEFAULT_HOST, port=DEFAULT_PORT, idle_timeout=IDLE_TIMEOUT_S):
    """A listening (not yet serving) HTTP server for gateway; .url is its base URL
    (with its trailing slash, which is also the live page's address)."""
    server_class = _Server6 if ":" in host else _Server
    server = server_class((host, port), gateway, idle_timeout)
    bound_host, bound_port = server.server_address[:2]
    server.url = "http://%s:%d/" % ("[%s]" % bound_host if ":" in bound_host else bound_host,
                                    bound_port)
    gateway.stop_waiting(False)
    gateway.idle_timeout_s = idle_timeout
    return server


# Test support ##################################################################

Served = collections.namedtuple("Served", "url gateway")


@contextlib.contextmanager
def serve_in_thread(gateway=None, host=DEFAULT_HOST, port=0, idle_timeout=IDLE_TIMEOUT_S):
    """Serve gateway on a background thread; yields Served(url, gateway).

    url is the base URL without its trailing slash ("http://127.0.0.1:PORT"),
    so that url + "/event/create" reads as it should.  The socket listens
    before this yields, so no readiness poll is needed.  On exit, also when the
    block raised, the server stops, every connection it accepted is closed
    (a pooled keep-alive client cannot talk on to a stopped gateway) and every
    wait ends.
    """
    if gateway is None:
        gateway = EventGateway()
    server = make_server(gateway, host, port, idle_timeout)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="event-gateway %s" % server.url, daemon=True)
    thread.start()
    try:
        yield Served(server.url.rstrip("/"), gateway)
    finally:
        server.stop()
        server.close_connections()
        server.server_close()
        thread.join()


# Comparing with another gateway ################################################
#
# A double is only as good as its agreement with the gateway it stands in for,
# and production moves.  This section records a client's traffic and replays it
# against another gateway (or this one as the other line), and says of each
# difference whether the contract states it (STATED_REASONS, beside LINES) or
# something drifted.  It reads as three parts: the recording format and its
# placeholders, the judge (a pure function of two answers and the table), and
# the replay loop of `python event_gateway.py compare RECORDING`.
#
# The recording (JSON Lines, UTF-8, oldest first; stable: a later format gets a
# new number).  Every line carries "recording": 1.  An exchange:
#   {"recording": 1, "seq", "received_at", "line", "method", "target",
#    "headers": {RECORDED_REQUEST_HEADERS, lower-case, as received},
#    "body": the body as text, or null with "body_base64" when it is not UTF-8,
#            or null alone when the gateway answered before reading it,
#    "answer": {"status" (null: dropped), "headers": {RECORDED_ANSWER_HEADERS},
#               "body": as sent, text},
#    "fault": the fault that struck or null, "note": the journal's note or null}
# A reset: {"recording": 1, "reset": true, "received_at"}.  Any other
# test-support request that changes state: {"recording": 1, "admin": {"method",
# "target", "body"}, "received_at"}, so that a replay rebuilds the state the
# recorded answers depended on.
#
# No secret is written, in any form: a channel password and the gateway token
# are replaced where they stood by a placeholder that keeps what the answer
# depended on: "<password:registered>" (it was the channel's password),
# "<password:other:N>" (it was not; N its UTF-8 bytes after trimming, and a
# replay sends N ASCII characters), "Bearer <token:valid>" or "Bearer
# <token:invalid>" ("<token:invalid>" alone without a scheme) when the gateway
# had a token, and "<token:unchecked>" when it had none.  In a body, the
# top-level "password" and every top-level key the event routes do not know
# (_holds_a_secret: a mistyped "pasword" holds a password too) are replaced when
# their value is a string; in a body that did not parse, every "key": "string"
# pair with such a key is, and any registered password or the token found
# anywhere else.  A placeholder keeps the breakage of what it replaced (a byte
# that is not UTF-8, a bad or lone surrogate escape), so the replay fails where
# the original failed.

RECORDING_FORMAT = 1
RECORDED_REQUEST_HEADERS = ("content-type", "content-length", "accept-language",
                            "authorization", "origin", "sec-fetch-site", "host", "expect")
RECORDED_ANSWER_HEADERS = ("content-type", "content-language", "allow", "retry-after",
                           "www-authenticate", "x-request-id")
_PASSWORD_PLACEHOLDER = re.compile(rb"<password:registered>|<password:other:(\d{1,4})>")
# A "key": "string" pair in a body's bytes; the string may run to the end (cut short).
_VALUE_STRING = rb'"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)("|$)'
_KEY_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)' + _VALUE_STRING, re.S)


@functools.lru_cache(maxsize=64)
def _pairs_of(keys):
    """_KEY_STRING for these keys only, as an encoder writes them (made once a key set)."""
    names = b"|".join(re.escape(json.dumps(key)[1:-1].encode()) for key in keys)
    return re.compile(b'"(' + names + b')' + _VALUE_STRING, re.S)


def _json_string(raw):
    """The text of a JSON string's raw bytes (between the quotes), or None when
    they are not valid UTF-8 or not a valid JSON string."""
    if b"\\" not in raw and raw.isascii():
        text = raw.decode("ascii")
        if text.isprintable():
            return text                     # the usual key or value: nothing to decode
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return None


def _placeholder_of(secret, registered):
    """The placeholder bytes for a secret string: step 10 compares it trimmed."""
    trimmed = secret.strip()
    if registered is not None and trimmed == registered:
        return b"<password:registered>"
    return b"<password:other:%d>" % len(trimmed.encode("utf-8", "surrogatepass"))


def _password_placeholder(raw, registered):
    """The placeholder bytes for a secret's raw bytes (as they stood in the body).

    A secret that breaks the JSON (a byte that is not UTF-8, a bad or lone
    surrogate escape, a raw control character) keeps a breakage of that kind after
    its placeholder, so that the replayed body is refused as the recorded one was."""
    text = _json_string(raw)
    if text is not None and not _has_lone_surrogate(text):
        return _placeholder_of(text, registered)
    readable = raw.decode("utf-8", "replace")
    size = len(readable.strip().encode("utf-8"))
    not_utf8 = "\ufffd" in readable and b"\xef\xbf\xbd" not in raw
    return b"<password:other:%d>" % size + (b"\xff" if not_utf8 else b"\\ud800")


def _is_secret_key(raw_key):
    key = _json_string(raw_key)
    return _holds_a_secret(raw_key.decode("utf-8", "replace") if key is None else key)


_CHANNEL_ID_PAIR = re.compile(rb'"channel_id"\s*:\s*"([^"\\]{1,64})"')


def _channel_in(body):
    """The canonical channel_id a body names, read without parsing it, or None."""
    found = body and _CHANNEL_ID_PAIR.search(body)
    return found and canonical_channel_id(found.group(1).decode("utf-8", "replace"))


def scrubbed_body(body, registered_password, doc=None, known_secrets=()):
    """body (bytes) with every password it carried replaced by its placeholder.

    registered_password(channel_id) is the channel's password or None; doc is the
    body as the core parsed it, when it did.  In a body that parses, only
    top-level string values of "password" and of unknown keys are secrets (a
    nested one is data), replaced where they stand as that key's value; in one
    that does not, every "key": "string" pair whose key is such a key is, and any
    registered password that stands anywhere else in it."""
    if not body:
        return body
    if doc is None:
        try:
            doc = parse_json_body(body, _SHOWN_DECODERS)
        except GatewayError:
            doc = None
    if doc is not None:
        secrets = {key: value for key, value in doc.items()
                   if isinstance(value, str) and _holds_a_secret(key)}
        if not secrets:
            return body
        channel_id = canonical_channel_id(doc.get("channel_id"))
        registered = None if channel_id is None else registered_password(channel_id)
    else:
        secrets = None
        channel_id = _channel_in(body)
        registered = registered_password(channel_id) if channel_id else None

    def replace(match):
        raw_key, raw_value, closing = match.group(1), match.group(2), match.group(3)
        if secrets is not None:
            key = _json_string(raw_key)
            if key not in secrets or _json_string(raw_value) != secrets[key]:
                return match.group(0)
        elif not _is_secret_key(raw_key):
            return match.group(0)
        start = match.start(2) - match.start(0)
        return match.group(0)[:start] + _password_placeholder(raw_value, registered) + closing
    if secrets is not None:
        # The usual body: its secret keys as plain JSON text; one search for them.
        scrubbed, found = _pairs_of(tuple(sorted(secrets))).subn(replace, body)
        body = scrubbed if found >= len(secrets) else _KEY_STRING.sub(replace, body)
    else:
        body = _KEY_STRING.sub(replace, body)
    # Whatever a broken body holds: a registered password or the token, anywhere.
    for secret, placeholder in known_secrets:
        raw = secret.encode("utf-8", "surrogatepass")
        if raw and raw in body and (secrets is None or placeholder == b"<token:valid>"):
            body = body.replace(raw, placeholder)
    return body


def token_placeholder(value, token):
    """What a recording shows of an Authorization value: never the value."""
    if token is None:
        return "<token:unchecked>"
    scheme, space, credentials = value.lstrip(OWS).partition(" ")
    if space and scheme.lower() in AUTH_SCHEMES:
        valid = (scheme.lower() == "bearer" and credentials and " " not in credentials
                 and _same_secret(credentials, token))
        return "%s <token:%s>" % (scheme, "valid" if valid else "invalid")
    return "<token:invalid>"


def exchange_line(seq, received_at, line, method, target, headers, body, status,
                  answer_headers, payload, fault, note, channels, token, doc=None):
    """One exchange of a recording, as a dict (the format above), secrets replaced;
    channels is the gateway's Channels, token its token or None."""
    registered_password = channels.password_of
    known_secrets = []
    if body and doc is None:        # not parsed by the core: perhaps broken
        known_secrets = [(password, b"<password:registered>") for password in channels.passwords()]
    if body and token:
        known_secrets.append((token, b"<token:valid>"))
    shown = {}
    for name in RECORDED_REQUEST_HEADERS:
        value = headers.get(name)
        if value is not None:
            shown[name] = token_placeholder(value, token) if name == "authorization" else value
    line_doc = {"recording": RECORDING_FORMAT, "seq": seq, "received_at": received_at,
                "line": line, "method": method, "target": target, "headers": shown}
    if body is None:
        line_doc["body"] = None
    else:
        body = scrubbed_body(body, registered_password, doc, known_secrets)
        try:
            line_doc["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            line_doc["body"] = None
            line_doc["body_base64"] = base64.b64encode(body).decode("ascii")
    kept = {}
    for name, value in answer_headers:
        lowered = name.lower()
        if lowered in RECORDED_ANSWER_HEADERS:
            kept[lowered] = value
    answer = (payload or b"").decode("utf-8", "replace")
    # No answer of this gateway echoes a secret; should one ever, it goes too.
    for secret, placeholder in ((token, "<token:valid>"),
                                (registered_password(_channel_in(body)), "<password:registered>")):
        if secret and secret in answer:
            answer = answer.replace(secret, placeholder)
    line_doc["answer"] = {"status": status, "headers": kept, "body": answer}
    line_doc["fault"] = None if fault is None else fault._asdict()
    line_doc["note"] = _note_text(note)
    return line_doc


def _recording_text(line_doc):
    # Strict JSON, one line; a value a double cannot hold never gets this far.
    return json.dumps(line_doc, ensure_ascii=False, allow_nan=False) + "\n"


class Recorder:
    """Appends recording lines to a text stream as they happen, one write and one
    flush a line (a crash loses at most the line being written); unbounded by
    --max-requests, as a file is the user's to keep."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.failed = None          # the error that stopped the recording (a full disk)

    def write(self, line_doc):
        text = _recording_text(line_doc)
        with self.lock:
            if self.failed is not None:
                return
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError) as error:
                # The requests are still answered; the recording ends here, short.
                self.failed = error

    def admin(self, method, target, body, received_at):
        self.write({"recording": RECORDING_FORMAT, "admin": {
            "method": method, "target": target, "body": body}, "received_at": received_at})

    def reset(self, received_at):
        self.write({"recording": RECORDING_FORMAT, "reset": True, "received_at": received_at})


# -- The judge ------------------------------------------------------------------
#
# Two answers agree when their statuses and error codes are equal, their bodies
# have the same shape (the same keys at every level, the same JSON types, equal
# values, but generated values compared by format and texts for people by
# presence), and the headers a client reads agree.  A disagreement has a kind,
# then a verdict: "stated" with the first reason of STATED_REASONS that explains
# it, or "unstated": drift in the target, or a defect here.

KINDS = ("target_accepts", "target_refuses", "status", "code", "shape", "no_answer")
GENERATED_KEYS = frozenset({"op_id", "event_id", "entity_id", "request_id"})
PEOPLE_TEXTS = frozenset({"/error", "/problem/detail", "/problem/title",
                          "/problem/localized_message"})
# The headers a client reads, and when: (name, the statuses it matters on, or None: all).
CLIENT_HEADERS = (("content-type", None), ("content-language", None), ("allow", {405}),
                  ("www-authenticate", {401}), ("retry-after", None))
_FORMATS = (("hex32", re.compile(r"[0-9a-f]{32}")),
            ("time-hex", re.compile(r"[0-9a-f]{13}-[0-9a-f]{32}")),
            ("id", _ID_CHARS))


def _format_of(value):
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return next((name for name, pattern in _FORMATS if pattern.fullmatch(value)), "text")
    return type(value).__name__


def _json_type(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "null")


def _shape_differences(recorded, answered, where=""):
    """The places (JSON pointers) where two parsed bodies differ, by the rules above."""
    if where in PEOPLE_TEXTS:
        return []           # present on both sides: that is all a client may rely on
    name = where.rsplit("/", 1)[-1]
    if _json_type(recorded) != _json_type(answered):
        return [where or "/"]
    if isinstance(recorded, dict):
        places = []
        for key in list(recorded) + [key for key in answered if key not in recorded]:
            if key not in recorded or key not in answered:
                places.append("%s/%s" % (where, key))
            else:
                places += _shape_differences(recorded[key], answered[key],
                                             "%s/%s" % (where, key))
        return places
    if isinstance(recorded, list):
        if len(recorded) != len(answered):
            return [where]
        places = []
        for index, (left, right) in enumerate(zip(recorded, answered)):
            places += _shape_differences(left, right, "%s/%d" % (where, index))
        return places
    if name in GENERATED_KEYS or name.endswith("_at"):
        return [] if _format_of(recorded) == _format_of(answered) else [where]
    return [] if recorded == answered else [where]


def _parsed(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


def _code_in(status, doc):
    """The error_code of an error answer, from its body as _parsed() gave it."""
    if status is not None and status >= 400 and isinstance(doc, dict):
        return doc.get("error_code")
    return None


def _code_of(status, body):
    return _code_in(status, _parsed(body) if status is not None and status >= 400 and body
                    else None)


def disagreement(recorded, answered):
    """(kind or None, places) of two answers, each {"status", "headers", "body"}
    (answered None: no answer).  places name where a shape differs."""
    right = None if answered is None else _parsed(answered["body"])
    return _disagreement(recorded, answered, _parsed(recorded["body"]), right)


def _disagreement(recorded, answered, left, right):
    """disagreement() with the two bodies parsed once, by the caller (left: the
    recorded answer's, right: the target's)."""
    if answered is None:
        return (None if recorded["status"] is None else "no_answer"), []
    status, other = recorded["status"], answered["status"]
    accepted = status is not None and status < 300
    target_accepted = other is not None and other < 300
    if accepted != target_accepted:
        return ("target_refuses" if accepted else "target_accepts"), []
    if status != other:
        return "status", []
    if _code_in(status, left) != _code_in(other, right):
        return "code", []
    places = []
    if (left is None) != (right is None) or (left is None and recorded["body"] != answered["body"]):
        places.append("/")
    elif left is not None:
        places += _shape_differences(left, right)
    for name, statuses in CLIENT_HEADERS:
        if statuses is None or status in statuses:
            mine, theirs = recorded["headers"].get(name), answered["headers"].get(name)
            if name == "content-type":
                mine, theirs = (value and value.split(";")[0].strip().lower()
                                for value in (mine, theirs))
            if mine != theirs:
                places.append("/headers/" + name)
    return ("shape" if places else None), places


def stated_reasons(kind, places, exchange, target_line, answered, codes):
    """The names of the reasons that state this disagreement ("V3, V4"), or None.

    codes are the error codes of the recorded answer and of the target's.  A
    disagreement of status or code takes the first reason that explains it; one
    of shape is stated only when each place where it differs has a reason."""
    if kind != "shape":
        reason = _stated_reason(kind, places, exchange, target_line, answered, codes)
        return None if reason is None else reason.name
    names = []
    for place in places:
        reason = _stated_reason(kind, [place], exchange, target_line, answered, codes)
        if reason is None:
            return None
        if reason.name not in names:
            names.append(reason.name)
    return ", ".join(names)


def _has_code(answer, code, codes):
    """Whether an answer carries one of codes; a bodiless answer (HEAD, a 405) by
    its status, since it has no error_code to show."""
    if answer is None or answer["status"] is None:
        return False
    if code is None and not answer["body"]:
        return any(ERRORS.get(known) == answer["status"] for known in codes)
    return code in codes


def _stated_reason(kind, places, exchange, target_line, answered, codes):
    """The first reason of STATED_REASONS that explains this disagreement, or None."""
    recorded = exchange["answer"]
    recorded_code, target_code = codes
    path = exchange["target"].split("?", 1)[0]
    for reason in STATED_REASONS:
        if kind not in reason.kinds:
            continue
        if reason.across_lines and exchange["line"] == target_line:
            continue
        if reason.target_line is not None and reason.target_line != target_line:
            continue
        if reason.fault and exchange.get("fault") is None and exchange["answer"]["status"] is not None:
            continue
        if reason.codes is not None and not any(
                _has_code(answer, code, reason.codes) for answer, code in
                {"recorded": ((recorded, recorded_code),), "target": ((answered, target_code),),
                 "either": ((recorded, recorded_code), (answered, target_code))}[reason.side]):
            continue
        if reason.path is not None and not re.search(reason.path, path):
            continue
        if reason.places is not None and not all(re.search(reason.places, place)
                                                 for place in places):
            continue
        return reason
    return None


# -- The replay -------------------------------------------------------------------

class RecordingError(Exception):
    """A recording that cannot be read: the line number and why."""


_SKIPPED_CODES = frozenset({"bad_request", "uri_too_long", "header_fields_too_large",
                            "http_version_not_supported"})


def _checked_line(number, text):
    """One recording line, parsed and checked, or RecordingError naming it."""
    if not text.endswith("\n"):
        raise RecordingError("line %d is cut short (no newline at its end)" % number)
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise RecordingError("line %d is not JSON: %s" % (number, error)) from None
    if not isinstance(doc, dict) or "recording" not in doc:
        raise RecordingError("line %d is not a recording line (no \"recording\" key)" % number)
    if doc["recording"] != RECORDING_FORMAT:
        raise RecordingError("line %d is of recording format %r; this module reads format %d"
                             % (number, doc["recording"], RECORDING_FORMAT))
    if doc.get("reset") is True:
        return doc
    if "admin" in doc:
        admin = doc["admin"]
        if not (isinstance(admin, dict) and isinstance(admin.get("method"), str)
                and isinstance(admin.get("target"), str)):
            raise RecordingError("line %d: admin needs a method and a target" % number)
        return doc
    answer = doc.get("answer")
    if not (isinstance(doc.get("method"), str) and isinstance(doc.get("target"), str)
            and isinstance(doc.get("headers"), dict) and isinstance(answer, dict)
            and isinstance(answer.get("headers"), dict) and isinstance(answer.get("body"), str)
            and (answer.get("status") is None or isinstance(answer.get("status"), int))
            and doc.get("line") in LINES
            and (doc.get("body") is None or isinstance(doc.get("body"), str))
            and (doc.get("body_base64") is None or isinstance(doc.get("body_base64"), str))):
        raise RecordingError("line %d is not an exchange: it needs method, target, headers, "
                             "line (1.2 or 1.3) and answer {status, headers, body}" % number)
    if doc.get("body_base64") is not None:
        try:
            base64.b64decode(doc["body_base64"], validate=True)
        except ValueError:
            raise RecordingError("line %d: body_base64 is not base64" % number) from None
    return doc


def read_recording(path):
    """Check a whole recording before anything is sent; returns what the replay
    needs to know first: exchanges, channel ids, token placeholders seen."""
    seen = {"exchanges": 0, "channels": set(), "token": False, "lines": 0}
    registered_by_admin = set()       # channels an admin line registered since the last reset
    try:
        stream = open(path, encoding="utf-8", newline="")
    except OSError as error:
        raise RecordingError("cannot open %s: %s" % (path, error.strerror or error)) from None
    with stream:
        try:
            for number, text in enumerate(stream, 1):
                doc = _checked_line(number, text)
                seen["lines"] = number
                if doc.get("reset") is True:
                    registered_by_admin.clear()
                elif "admin" in doc:
                    body = doc["admin"].get("body")
                    if isinstance(body, dict) and canonical_channel_id(body.get("channel_id")):
                        registered_by_admin.add(canonical_channel_id(body["channel_id"]))
                else:
                    # A channel the recording's gateway had from its start: one whose
                    # password matched, or did not match (so it was known), before
                    # any admin line registered it.
                    body = doc.get("body") or ""
                    channel_id = _channel_in(body.encode("utf-8", "surrogatepass"))
                    if channel_id and channel_id not in registered_by_admin and (
                            "<password:registered>" in body or _code_of(
                                doc["answer"]["status"], doc["answer"]["body"])
                            == "password_mismatch"):
                        seen["channels"].add(channel_id)
                if "answer" in doc:
                    seen["exchanges"] += 1
                    authorization = doc["headers"].get("authorization", "")
                    seen["token"] = seen["token"] or "<token:valid>" in authorization or (
                        "<token:invalid>" in authorization)
        except UnicodeDecodeError as error:
            raise RecordingError("the recording is not UTF-8 (%s)" % error) from None
    if seen["lines"] == 0:
        raise RecordingError("the recording is empty")
    return seen


def _recording_lines(path):
    with open(path, encoding="utf-8", newline="") as stream:
        for number, text in enumerate(stream, 1):
            yield number, json.loads(text)


class _InProcessTarget:
    """A gateway of a line in this process: handle() directly, no socket."""

    is_gateway = True

    def __init__(self, gateway):
        self.gateway = gateway
        self.line = gateway.line.name

    def send(self, method, target, headers, body, retry=True):
        status, answer_headers, payload = self.gateway.handle(method, target, headers, body)
        if status is None:
            return None
        return {"status": status, "headers": {name.lower(): value
                                              for name, value in answer_headers},
                "body": payload.decode("utf-8", "replace")}

    def close(self):
        pass


class _HttpTarget:
    """Another gateway at a URL, over one keep-alive connection (a new one after a close)."""

    def __init__(self, url, timeout):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RecordingError("--url must be http://HOST[:PORT] or https://...")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.connection = None
        self.is_gateway = False
        self.line = None

    def _connect(self):
        factory = (http.client.HTTPSConnection if self.scheme == "https"
                   else http.client.HTTPConnection)
        return factory(self.host, self.port, timeout=self.timeout)

    def send(self, method, target, headers, body, retry=True):
        for _ in (1, 2):
            reused = self.connection is not None
            if not reused:
                self.connection = self._connect()
            try:
                # Only the recorded headers, Host the target's own and Content-Length
                # that of the body sent: no body, no Content-Length, as recorded.
                self.connection.putrequest(method, self.prefix + target,
                                           skip_accept_encoding=True)
                for name, value in headers.items():
                    self.connection.putheader(name, value)
                if body is not None:
                    self.connection.putheader("Content-Length", str(len(body)))
                self.connection.endheaders(body)
                response = self.connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if reused and retry:
                    continue    # a kept connection the server closed meanwhile: once more
                return None
            if response.will_close:
                self.close()
            return {"status": response.status,
                    "headers": {name.lower(): value for name, value in response.getheaders()},
                    "body": payload.decode("utf-8", "replace")}
        return None

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _other_secret(size, registered):
    value = "x" * size
    return value if value != registered else "y" * size


class Replay:
    """What the replay keeps while it runs: the secrets the placeholders become,
    the ids the target gave in place of the recording's, and the stretch number
    that keeps a suite's reused op_ids apart on a target that cannot be reset."""

    def __init__(self, target, passwords, token):
        self.target = target
        self.passwords = passwords          # channel_id -> password for the target
        self.token = token
        self.ids = {}                       # recorded generated id -> the target's id
        self.unmapped = {}                  # recorded generated id -> seq of its exchange
        self.stretch = 1

    def _password_bytes(self, size, channel_id):
        """What a password placeholder becomes, JSON-escaped: the channel's password
        (size None), or size ASCII characters that are not it."""
        registered = self.passwords.get(channel_id)
        if size is None:
            value = registered if registered is not None else "x" * PASSWORD_MIN_BYTES
        else:
            value = _other_secret(int(size), registered)
        return json.dumps(value)[1:-1].encode()

    def body_bytes(self, text, base64_text, content_length):
        """The request body to send: placeholders and ids replaced."""
        if text is None and base64_text is None:
            if content_length and content_length.strip().isdigit():
                return b"x" * min(int(content_length), MAX_BODY_BYTES + 1)
            return None
        data = base64.b64decode(base64_text) if text is None else text.encode("utf-8")
        channel_id = _channel_in(data)
        data = _PASSWORD_PLACEHOLDER.sub(
            lambda match: self._password_bytes(match.group(1), channel_id), data)
        return self._with_ids(data)

    def _with_ids(self, data):
        # The recording's generated ids, and client op_ids of later stretches.
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return data
        if not isinstance(doc, dict):
            return data
        for key in ("event_id", "op_id"):
            value = doc.get(key)
            if isinstance(value, str) and value:
                new = self.ids.get(value)
                if new is None and key == "op_id" and self.stretch > 1 and not (
                        self.target.is_gateway):
                    new = self.stretched(value)
                if new is not None:
                    data = data.replace(json.dumps(value).encode(), json.dumps(new).encode())
        return data

    def stretched(self, op_id):
        suffix = ":r%d" % self.stretch
        text = op_id.strip() + suffix
        return text[-OP_ID_MAX_CHARS:]

    def target_path(self, target):
        # An id in the path (/send_status/{op_id}, /__admin/events/{id}).
        path, sep, query = target.partition("?")
        head, _, last = path.rpartition("/")
        new = self.ids.get(urllib.parse.unquote(last))
        if new is not None:
            path = head + "/" + urllib.parse.quote(new)
        return path + sep + query

    def follows_from(self, exchange, doc):
        """The seq of the exchange whose id this request (doc: its parsed body) names
        but the target never gave."""
        names = [exchange["target"].split("?", 1)[0].rsplit("/", 1)[-1]]
        if isinstance(doc, dict):
            names += [doc.get("event_id"), doc.get("op_id")]
        for name in names:
            if isinstance(name, str) and name in self.unmapped:
                return self.unmapped[name]
        return None

    def headers(self, recorded):
        """The request headers to send: placeholders replaced, Host the target's own."""
        headers = {}
        for name, value in recorded.items():
            if name in ("host", "content-length", "expect"):
                continue        # the target's own Host; the length of what is sent
            if name == "authorization":
                if "<token:valid>" in value:
                    if self.token is None:
                        continue    # no token was given for the target: left out
                    value = value.replace("<token:valid>", self.token)
                value = value.replace("<token:invalid>", "not-the-token").replace(
                    "<token:unchecked>", "unchecked-dummy")
            headers[name] = value
        return headers

    def learn(self, exchange, recorded, theirs, seq, body):
        """Ids the recording's gateway generated, mapped to the target's; recorded,
        theirs and body are the recorded answer's, the target's and the request's
        bodies, parsed (None: none, or not JSON)."""
        if not (isinstance(recorded, dict) and isinstance(recorded.get("data"), dict)):
            return
        theirs = theirs.get("data") if isinstance(theirs, dict) else None
        sent_op_id = body.get("op_id") if isinstance(body, dict) else None
        for key in ("event_id", "op_id"):
            value = recorded["data"].get(key)
            if not isinstance(value, str) or (key == "op_id" and isinstance(sent_op_id, str)
                                              and sent_op_id.strip()):
                continue
            if key == "event_id" and not exchange["target"].split("?")[0].endswith("/create"):
                continue
            if isinstance(theirs, dict) and isinstance(theirs.get(key), str):
                self.ids[value] = theirs[key]
                self.unmapped.pop(value, None)
            else:
                self.unmapped[value] = seq


def _wait_for_next_minute(now=time.time, sleep=time.sleep):
    sleep(60 - now() % 60 + 0.05)


def replay(path, target, passwords, token, pace=None, progress=None, sleep=time.sleep):
    """Replay a checked recording against target; yields one verdict dict per exchange:
    {"seq", "line", "method", "target", "route", "recorded", "answered", "kind",
    "verdict", "reason", "follows_from"} (kind None and verdict "agree" when they agree;
    verdict "skipped" for an exchange whose bytes were not kept)."""
    state = Replay(target, passwords, token)
    verdicts = {}           # seq -> (verdict, reason), for refusals that follow from one
    interval = 60.0 / pace if pace else 0
    for number, doc in _recording_lines(path):
        if doc.get("reset") is True:
            if target.is_gateway:
                target.send("POST", "/__admin/reset", {}, None)
            state.stretch += 1
            continue
        if "admin" in doc:
            if target.is_gateway:
                admin = doc["admin"]
                body = admin.get("body")
                data = None if body is None else state.body_bytes(
                    json.dumps(body, ensure_ascii=False), None, None)
                target.send(admin["method"], state.target_path(admin["target"]),
                            {"content-type": "application/json"} if data is not None else {},
                            data)
            continue
        yield _judged(state, target, doc, verdicts, sleep)
        if progress is not None:
            progress(number)
        if interval:
            sleep(interval)


def _judged(state, target, exchange, verdicts, sleep):
    seq = exchange.get("seq")
    recorded = exchange["answer"]
    recorded_doc = _parsed(recorded["body"])        # each body is parsed once, in this function
    route = exchange["target"].split("?", 1)[0]
    result = {"seq": seq, "line": exchange["line"], "method": exchange["method"],
              "target": exchange["target"], "route": route,
              "recorded": [recorded["status"], _code_in(recorded["status"], recorded_doc)],
              "answered": None, "kind": None, "verdict": "agree", "reason": None,
              "follows_from": None}
    if (not exchange["method"] or not route
            or result["recorded"][1] in _SKIPPED_CODES or recorded["status"] in (414, 431, 505)):
        result["verdict"] = "skipped"
        return result
    headers = state.headers(exchange["headers"])
    body = state.body_bytes(exchange.get("body"), exchange.get("body_base64"),
                            exchange["headers"].get("content-length"))
    for retries in range(4):
        answered = target.send(exchange["method"], state.target_path(exchange["target"]),
                               headers, body, retry=recorded["status"] is not None)
        if not (answered is not None and answered["status"] == 429
                and _code_of(429, answered["body"]) == "rate_limited"
                and recorded["status"] != 429):
            break
        if retries == 3:
            answered = None             # still limited after 3 minutes: no answer
            break
        _wait_for_next_minute(sleep=sleep)      # the target's rate limit: not a disagreement
    sent = _parsed(exchange.get("body") or "")         # the recorded request
    answered_doc = answered_code = None
    if answered is not None:
        answered_doc = _parsed(answered["body"])
        answered_code = _code_in(answered["status"], answered_doc)
        result["answered"] = [answered["status"], answered_code]
        if target.line is None:
            target.line = _line_of_success(answered["status"], answered_doc)
    state.learn(exchange, recorded_doc, answered_doc, seq, sent)
    kind, places = _disagreement(recorded, answered, recorded_doc, answered_doc)
    if kind is None:
        return result
    result["kind"] = kind
    follows = state.follows_from(exchange, sent)
    if follows is not None and follows in verdicts:
        result["follows_from"] = follows
        result["verdict"], result["reason"] = verdicts[follows]
    else:
        reason = stated_reasons(kind, places, exchange, target.line or DEFAULT_LINE, answered,
                                (result["recorded"][1], answered_code))
        result["verdict"] = "unstated" if reason is None else "stated"
        result["reason"] = reason
        if reason is None:
            result["places"] = places
    if seq is not None:
        verdicts[seq] = (result["verdict"], result["reason"])
        if len(verdicts) > 100000:          # bounded: the oldest verdicts go first
            verdicts.pop(next(iter(verdicts)))
    return result


def _line_of_success(status, doc):
    """A target's line from a success's data (V3; doc: its body, parsed): line 1.2
    says "accepted"."""
    data = doc.get("data") if status == 200 and isinstance(doc, dict) else None
    if isinstance(data, dict) and "event_id" in data:
        return "1.2" if "accepted" in data else "1.3"
    return None


def _target_line(target, given):
    """--target-line, else what GET /__admin/info says, else None (learned later)."""
    if given is not None:
        return given
    if isinstance(target, _InProcessTarget):
        return target.line
    answered = target.send("GET", "/__admin/info", {}, None)
    info = _parsed(answered["body"]) if answered is not None and answered["status"] == 200 else None
    data = info.get("data") if isinstance(info, dict) else None
    if isinstance(data, dict) and data.get("gateway_version") in LINES:
        target.is_gateway = True
        return data["gateway_version"]
    return None


def _summary_table(groups, out):
    rows = [("route", "kind", "verdict", "reason", "recorded -> target", "count", "first seq")]
    for (route, kind, verdict, reason, change), (count, first) in sorted(
            groups.items(), key=lambda item: (item[0][2] != "unstated", item[1][1] or 0)):
        rows.append((route, kind or "-", verdict, reason or "-", change, str(count),
                     "-" if first is None else str(first)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def _answer_text(pair):
    if pair is None:
        return "no answer"
    status, code = pair
    return "dropped" if status is None else ("%s %s" % (status, code) if code else str(status))


def run_compare(path, target, target_line=None, passwords=None, token=None, fail_on=KINDS,
                json_path=None, pace=None, out=sys.stdout, err=sys.stderr, sleep=time.sleep,
                seen=None):
    """Replay and judge a recording; prints the table and the summary line; returns the
    exit status (0, 1, 3; a recording that cannot be read raises RecordingError).
    seen is what read_recording() said of it, when the caller has already read it."""
    seen = read_recording(path) if seen is None else seen
    target.line = _target_line(target, target_line)
    counts = collections.Counter()
    groups = {}
    answered_any = False
    report = None
    if json_path is not None:
        report = open(json_path, "w", encoding="utf-8")
        report.write('{"exchanges": [\n')
    progress = None
    if seen["exchanges"] > 1000 and getattr(err, "isatty", lambda: False)():
        def progress(number):
            if number % 1000 == 0:
                err.write("\rcompare: line %d of %d" % (number, seen["lines"]))
                err.flush()
    first = True
    try:
        for result in replay(path, target, passwords or {}, token, pace, progress, sleep):
            counts["exchanges"] += 1
            verdict = result["verdict"]
            counts[verdict] += 1
            if result["answered"] is not None:
                answered_any = True
            if verdict in ("stated", "unstated"):
                change = "%s -> %s" % (_answer_text(result["recorded"]),
                                       _answer_text(result["answered"]))
                key = (result["route"], result["kind"], verdict, result["reason"], change)
                count, first_seq = groups.get(key, (0, result["seq"]))
                groups[key] = (count + 1, first_seq)
                if verdict == "unstated" and result["kind"] in fail_on:
                    counts["failing"] += 1
            if report is not None:
                report.write(("" if first else ",\n") + json.dumps(result))
                first = False
    finally:
        if progress is not None:
            err.write("\n")
        if report is not None:
            summary = {key: counts[key] for key in ("exchanges", "agree", "stated", "unstated",
                                                    "skipped")}
            report.write('\n], "summary": %s}\n' % json.dumps(summary))
            report.close()
        target.close()
    if groups:
        _summary_table(groups, out)
    out.write("compare: %d exchanges, %d agree, %d stated, %d unstated, %d skipped\n" % (
        counts["exchanges"], counts["agree"], counts["stated"], counts["unstated"],
        counts["skipped"]))
    if counts["exchanges"] > counts["skipped"] and not answered_any:
        return 3
    return 1 if counts["failing"] else 0


# Command line ##################################################################

_EXAMPLES = """examples:
  python event_gateway.py
  python event_gateway.py --port 0 --quiet
  python event_gateway.py --token s3cret --channel 06J0FZG1Y8XGG14VTQ4Y3G10MR:pass-1234
  python event_gateway.py --record traffic.jsonl
  python event_gateway.py compare traffic.jsonl --gateway-version 1.2

then open the printed URL in a browser to watch requests and events arrive, and
send the public page's curl example to it (with http://127.0.0.1:6666 as its host).
"""


def _port(text):
    port = _int_option(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be from 0 to 65535 (0 picks a free port)")
    return port


def _int_option(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number, not %r" % text[:40]) from None


def _at_least(low):
    def parse(text):
        value = _int_option(text)
        if value < low:
            raise argparse.ArgumentTypeError("must be at least %d" % low)
        return value
    return parse


def _idle_timeout(text):
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_IDLE_TIMEOUT_S:       # also refuses nan and inf
        raise argparse.ArgumentTypeError("must be a number of seconds above 0 and at most %d"
                                         % MAX_IDLE_TIMEOUT_S)
    return seconds


class _Parser(argparse.ArgumentParser):
    """A bad option value is one line on stderr and exit status 2, never a traceback."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def build_parser():
    parser = _Parser(
        prog="event_gateway.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A local PushGo Event API gateway for testing clients: POST /event/create, "
                    "/event/update and /event/close, events kept in memory, a live page at /, "
                    "test-support routes under /__admin/. Not a production server.",
        epilog=_EXAMPLES)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one and prints it "
                             "(default %(default)s)")
    parser.add_argument("--token", default=None,
                        help="require 'Authorization: Bearer TOKEN' (default: env PUSHGO_TOKEN; "
                             "none = auth off)")
    parser.add_argument("--channel", action="append", metavar="ID:PASSWORD", default=[],
                        help="register a channel (repeatable; default: the API page's example "
                             "channel %s with password %s)"
                             % (EXAMPLE_CHANNEL_ID, EXAMPLE_CHANNEL_PASSWORD))
    parser.add_argument("--max-events", type=_at_least(1), default=DEFAULT_MAX_EVENTS,
                        help="events kept in memory; closed ones are dropped first "
                             "(default %(default)s)")
    parser.add_argument("--max-history", type=_at_least(2), default=DEFAULT_MAX_HISTORY,
                        help="dispatches kept per event, the create included; older updates "
                             "are dropped (default %(default)s)")
    parser.add_argument("--max-store-mb", type=_at_least(1), default=DEFAULT_MAX_STORE_MB,
                        help="the store's memory as a whole, in MiB: past it, closed events "
                             "and then the oldest updates are dropped (default %(default)s)")
    parser.add_argument("--max-requests", type=_at_least(0), default=DEFAULT_MAX_REQUESTS,
                        help="requests kept by the journal (GET /__admin/requests, the page); "
                             "0 turns it off (default %(default)s)")
    parser.add_argument("--idle-timeout", type=_idle_timeout, default=IDLE_TIMEOUT_S,
                        help="seconds without a byte before a connection is closed "
                             "(default %%(default)s, at most %d)" % MAX_IDLE_TIMEOUT_S)
    parser.add_argument("--seed", type=_int_option, default=0,
                        help="seed of the faults' probability draws (default %(default)s)")
    parser.add_argument("--gateway-version", choices=tuple(LINES), default=DEFAULT_LINE,
                        help="the production line to answer as: 1.2 (v1.2.9) or 1.3 (v1.3.0-"
                             "v1.3.3, with thing-scoped routes and /send_status) "
                             "(default %(default)s)")
    parser.add_argument("--rate-limit", action="store_true",
                        help="line 1.3 without a token: answer production's rate limit "
                             "(%d requests per client IP, %d in all, per minute) with 429 "
                             "rate_limited; without it, the journal only notes the excess"
                             % (RATE_LIMIT_PER_IP, RATE_LIMIT_TOTAL))
    parser.add_argument("--allow-host", action="append", metavar="NAME", default=[],
                        help="a name (besides IP addresses, localhost and *.localhost) by "
                             "which browsers and clients may reach the page and /__admin/, "
                             "such as a container's service name; repeatable; '*' allows any "
                             "(the guard against DNS rebinding is then off)")
    parser.add_argument("--ready-file", metavar="PATH", default=None,
                        help="once the socket listens, write the base URL (such as "
                             "http://127.0.0.1:41234) to PATH, and remove it on exit: how a "
                             "test in any language learns the port of --port 0")
    parser.add_argument("--openapi", action="store_true",
                        help="print the OpenAPI 3.1 description of the line (--gateway-version) "
                             "and exit: the document GET /__admin/openapi.json answers")
    parser.add_argument("--record", metavar="FILE", default=None,
                        help="append every exchange, reset and test-support change to FILE as "
                             "a recording (JSON Lines, no secrets), for "
                             "'python event_gateway.py compare FILE'")
    parser.add_argument("--quiet", action="store_true",
                        help="no request log lines (and no start-up line unless --port 0)")
    return parser


_COMPARE_EXAMPLES = """examples:
  python event_gateway.py compare traffic.jsonl --gateway-version 1.2
  python event_gateway.py compare traffic.jsonl --url https://staging.example \\
      --channel 06J0FZG1Y8XGG14VTQ4Y3G10MR:pass-1234 --token "$PUSHGO_TOKEN"

exit status: 0 no unstated disagreement, 1 some, 2 a usage error or a recording
it cannot read, 3 the target never answered.
"""


def _kinds(text):
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError("must be a comma list of %s" % ", ".join(KINDS))
    return frozenset(kinds)


def _positive_number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be above 0 and at most 3600")
    return value


def build_compare_parser():
    parser = _Parser(
        prog="event_gateway.py compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay a recording (--record, or GET /__admin/requests?format=jsonl)\n"
                    "against a target and judge every pair of answers: agree, stated (a\n"
                    "difference the contract states, with its reason) or unstated (drift in\n"
                    "the target, or a defect here).",
        epilog=_COMPARE_EXAMPLES)
    parser.add_argument("recording", metavar="RECORDING", help="the recording file")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a gateway to replay against (another event_gateway, a "
                                     "staging or production PushGo gateway)")
    where.add_argument("--gateway-version", choices=tuple(LINES),
                       help="replay against a gateway of this line in this process (no socket)")
    parser.add_argument("--target-line", choices=tuple(LINES), default=None,
                        help="the target's production line (default: what its "
                             "/__admin/info says, else its first success's data, else 1.3)")
    parser.add_argument("--channel", action="append", metavar="ID:PASSWORD", default=[],
                        help="the password <password:registered> becomes for that channel")
    parser.add_argument("--token", default=None,
                        help="what <token:valid> becomes (default: env PUSHGO_TOKEN)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="write every exchange's verdict and the summary to FILE")
    parser.add_argument("--fail-on", type=_kinds, default=frozenset(KINDS), metavar="KINDS",
                        help="the kinds whose unstated disagreements fail the run (a comma "
                             "list of %s; default: all)" % ", ".join(KINDS))
    parser.add_argument("--pace", type=_at_least(1), default=None, metavar="N",
                        help="send at most N requests a minute")
    parser.add_argument("--timeout", type=_positive_number, default=10.0, metavar="S",
                        help="seconds to wait for each answer (default 10)")
    return parser


def compare_main(argv):
    """python event_gateway.py compare RECORDING ...; returns the exit status."""
    parser = build_compare_parser()
    args = parser.parse_args(argv)
    passwords = _parse_channels(parser, args.channel) or {}
    token = args.token if args.token is not None else os.environ.get("PUSHGO_TOKEN") or None
    out = _Unstoppable(sys.stdout)
    try:
        seen = read_recording(args.recording)
        if args.url is not None:
            target = _HttpTarget(args.url, args.timeout)
        else:
            # In process: the channels the recording's gateway started with, each with
            # the given password or a generated one; a token only when the recording
            # shows that its gateway had one.
            for channel_id in seen["channels"]:
                passwords.setdefault(channel_id, "replay-" + _new_hex_id())
            if seen["token"] and token is None:
                token = "replay-" + _new_hex_id()
            target = _InProcessTarget(EventGateway(
                token=token if seen["token"] else None,
                channels=dict(passwords) or {EXAMPLE_CHANNEL_ID: EXAMPLE_CHANNEL_PASSWORD},
                gateway_version=args.gateway_version, max_requests=0))
        return run_compare(args.recording, target, args.target_line, passwords, token,
                           args.fail_on, args.json, args.pace, out, sys.stderr, seen=seen)
    except RecordingError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error("cannot write --json %s: %s" % (args.json, error.strerror or error))
    return 2


def _parse_channels(parser, specs):
    channels = {}
    for spec in specs:
        channel_id, sep, password = spec.partition(":")
        try:
            if not sep:
                raise GatewayError("invalid_password", "give the channel as ID:PASSWORD")
            canonical = check_channel_id(channel_id)     # the id first, as in step 10
            channels[canonical] = check_password(password)
        except GatewayError as error:
            # The message names the rule, never the password.
            parser.error("--channel %s%s: %s" % (_printable(channel_id[:40]),
                                                 ":..." if sep else "", error.message))
    if len(channels) > MAX_CHANNELS:
        parser.error("at most %d --channel options" % MAX_CHANNELS)
    return channels or None


def _remove_stale_ready_file(path):
    """Before listening: a file left at path by an earlier run names a dead URL."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _write_ready_file(path, url):
    """Write the base URL to path, whole or not at all (a reader that sees the file
    sees the URL): written beside it, then renamed into place; a write that fails
    leaves nothing behind."""
    partial = path + ".partial"
    try:
        with open(partial, "w", encoding="utf-8") as ready:
            ready.write(url + "\n")
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


class _Unstoppable(io.TextIOBase):
    """A text stream that loses what it cannot write: a stdout or stderr that nobody
    reads (``| true``) or that is closed must never stop the gateway."""

    def __init__(self, stream):
        self.stream = stream
        try:
            self.descriptor = stream.fileno()
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            self.descriptor = None

    def writable(self):
        return True

    def write(self, text):
        if self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError, AttributeError):    # a broken pipe, or closed
                self._lose_the_rest()
        return len(text)

    def flush(self):
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError, AttributeError):
                self._lose_the_rest()

    def _lose_the_rest(self):
        # What the stream still buffers would fail once more when the interpreter
        # flushes it at exit (and turn exit status 0 into 120): its descriptor is
        # pointed at the null device, so that flush succeeds and writes nowhere.
        self.stream = None
        if self.descriptor is not None:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self.descriptor)
                os.close(null)


def _raise_descriptor_limit():
    """Let the gateway hold as many connections as the system allows it."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass        # not on this system (Windows), or not allowed: keep the limit there is


def _calm_garbage_collector():
    """Make full passes of CPython's garbage collector rare.

    The store keeps up to --max-events events for the life of the process, and
    a full pass walks all of them: with the default thresholds one came every
    few thousand creates, a 10-25 ms pause each, more often and longer as the
    store grew.  The gateway makes no reference cycles that outlive a request,
    so full passes come after 1000 middle-generation passes instead of 10, and
    the objects of start-up are frozen out of them.  Young objects are collected
    as usual.  Only main() does this: it owns the process; an embedding test
    suite does not.  PyPy's collector is another design and has neither call.
    """
    if hasattr(gc, "freeze"):
        gc.freeze()
    if hasattr(gc, "set_threshold") and platform.python_implementation() == "CPython":
        gc.set_threshold(700, 10, 1000)


def main(argv=None):
    """Run the gateway until Ctrl-C or SIGTERM; returns the exit status.
    python event_gateway.py compare ... replays a recording instead (compare_main)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.openapi:
        try:
            print(json.dumps(openapi_document(LINES[args.gateway_version]), ensure_ascii=False,
                             indent=1), flush=True)
        except BrokenPipeError:         # piped into head, say: that is no error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    token = args.token if args.token is not None else os.environ.get("PUSHGO_TOKEN") or None
    if token is not None and (not token or len(token) > MAX_TOKEN_CHARS
                              or any(c.isspace() for c in token)):
        parser.error("the token must be 1-%d characters with no spaces" % MAX_TOKEN_CHARS)
    channels = _parse_channels(parser, args.channel)
    if args.rate_limit and (LINES[args.gateway_version].rate_limit is None or token):
        parser.error("--rate-limit goes with --gateway-version 1.3 and no token: production "
                     "limits only requests without a gateway token")
    stdout, stderr = _Unstoppable(sys.stdout), _Unstoppable(sys.stderr)
    record = None
    if args.record is not None:
        try:
            record = open(args.record, "a", encoding="utf-8")
        except OSError as error:
            parser.error("cannot open --record %s: %s"
                         % (_printable(args.record[:200]), error.strerror or error))
    try:
        return _serve_until_stopped(parser, args, token, channels, stdout, stderr, record)
    finally:
        if record is not None:
            record.close()


def _serve_until_stopped(parser, args, token, channels, stdout, stderr, record):
    gateway = EventGateway(token=token, channels=channels, max_events=args.max_events,
                           max_history=args.max_history, max_requests=args.max_requests,
                           seed=args.seed, log=None if args.quiet else stderr,
                           gateway_version=args.gateway_version, rate_limit=args.rate_limit,
                           allow_hosts=args.allow_host, max_store_mb=args.max_store_mb,
                           record=record)
    if args.ready_file is not None:
        try:
            _remove_stale_ready_file(args.ready_file)
        except OSError as error:
            parser.error("cannot write --ready-file %s: %s"
                         % (_printable(args.ready_file[:200]), error.strerror or error))
    try:
        server = make_server(gateway, args.host, args.port, args.idle_timeout)
    except socket.gaierror as error:
        parser.error("--host %s does not resolve (%s); give an address such as 127.0.0.1 or ::1"
                     % (_printable(args.host[:80]), error.strerror))
    except OSError as error:
        hint = (" (try another --port, or --port 0)" if error.errno == errno.EADDRINUSE else "")
        print("event_gateway: cannot listen on %s port %d: %s%s"
              % (_printable(args.host[:80]), args.port, error.strerror or error, hint),
              file=stderr)
        return 1

    if args.ready_file is not None:
        try:
            _write_ready_file(args.ready_file, server.url.rstrip("/"))
        except OSError as error:
            server.server_close()
            parser.error("cannot write --ready-file %s: %s"
                         % (_printable(args.ready_file[:200]), error.strerror or error))

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, so it cannot run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    # Both signals are taken, not left as they came: a shell script's background job
    # starts with SIGINT ignored, and Ctrl-C or kill -INT must stop it all the same.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _raise_descriptor_limit()
    _calm_garbage_collector()
    if not args.quiet or args.port == 0:
        page = ("open it in a browser to watch" if server.server_port not in BROWSER_REFUSED_PORTS
                else "browsers refuse port %d, so for the live page start with --port 8666"
                % server.server_port)
        print("event_gateway %s: listening on %s as production %s (auth %s; channels: %s); "
              "%s; Ctrl-C to stop" % (__version__, server.url, gateway.line.name,
                                      "on" if token else "off",
                                      ", ".join(gateway.channel_ids()), page),
              file=stdout, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.close_connections()
        server.server_close()
        if args.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(args.ready_file)
        if gateway.recorder is not None and gateway.recorder.failed is not None:
            print("event_gateway: the recording in %s stopped early: %s"
                  % (_printable(args.record[:200]), gateway.recorder.failed), file=stderr)
    return 0



# The live page ################################################################
#
# GET / serves this one self-contained page, for the person running the gateway
# on a laptop: open http://127.0.0.1:8666/ (with --port 8666) and watch a client work.  It shows
# the request journal newest first (refused, dropped and faulted requests stand
# out; a click shows an entry's masked headers and body) and the events with
# their histories; it can reset the gateway and queue and clear faults.  It
# learns of changes by long-polling GET /__admin/requests?after=SEQ&wait_ms=...
# and then fetches the events again.  With a gateway token it asks for the
# token, keeps it in the tab's sessionStorage and sends it as a Bearer token;
# the HTML itself holds no data.  It shows every value with textContent, never
# as HTML, and its Content-Security-Policy lets only its own inline script and
# style run (by their hashes) and connect only to its own origin.

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PushGo event gateway</title>
<style>
[hidden] { display: none !important; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2430; background: #f4f5f7; }
header { display: flex; flex-wrap: wrap; gap: 8px 12px; align-items: center; padding: 10px 16px;
         background: #1d2430; color: #fff; }
header h1 { font-size: 16px; margin: 0; }
header input, header select, header button { font: inherit; max-width: 100%; }
#line { color: #c5cad3; font-size: 13px; }
#openapi { color: #9ecbff; font-size: 13px; }
#state { padding: 2px 8px; border-radius: 10px; background: #2e7d32; }
#state.down { background: #c62828; }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px; padding: 16px; }
@media (max-width: 800px) { main { grid-template-columns: minmax(0, 1fr); padding: 8px; } }
section { background: #fff; border-radius: 6px; padding: 8px 12px; min-width: 0; }
h2 { font-size: 15px; margin: 4px 0 8px; }
input[type=number] { width: 5em; }
.entry { border-top: 1px solid #e3e5e8; padding: 4px 6px; cursor: pointer; overflow-wrap: anywhere; }
.entry .head { display: flex; flex-wrap: wrap; gap: 0 10px; }
.entry .path { font-weight: 600; }
.entry .why { margin-top: 1px; }
.entry.bad { color: #b71c1c; background: #fdecea; }
.entry.faulted { color: #8e24aa; background: #f6e9f8; }
.note { display: block; margin-top: 2px; padding: 1px 6px; border-left: 3px solid #e0a800; color: #5c4400;
        background: #fff8e1; font-size: 13px; }
pre { margin: 4px 0; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; background: #f4f5f7; padding: 6px; }
.event { border: 1px solid #e3e5e8; border-radius: 6px; padding: 6px 10px; margin-bottom: 8px; overflow-wrap: anywhere; }
.event h3 { font-size: 14px; margin: 0 0 4px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; background: #e3e5e8; }
.ongoing { background: #fff3cd; } .closed { background: #d7f0dc; }
.critical, .high { background: #fdecea; color: #b71c1c; }
.muted { color: #68707d; font-size: 12px; }
ol { margin: 4px 0 0; padding-left: 18px; font-size: 12px; }
form { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
code { font-size: 12px; background: #f4f5f7; padding: 0 3px; }
#login { padding: 16px; }
</style>
</head>
<body>
<header>
  <h1>PushGo event gateway</h1>
  <span id="line"></span>
  <a id="openapi" href="/__admin/openapi.json">OpenAPI</a>
  <span id="state">connecting</span>
  <input id="channel" placeholder="filter: channel_id" size="28" aria-label="filter by channel_id">
  <input id="thing" placeholder="filter: thing_id" size="14" aria-label="filter by thing_id">
  <button id="reset" type="button">Reset gateway</button>
</header>
<div id="login" hidden>
  <form id="token-form">
    <label for="token">This gateway wants its token:</label>
    <input id="token" type="password" autocomplete="off">
    <button type="submit">Show</button>
  </form>
</div>
<main id="panes" hidden>
  <section>
    <h2>Requests, newest first <span class="muted">(click one for its headers, body and answer)</span></h2>
    <div id="journal"></div>
    <div id="empty" class="muted">
      <p>No requests yet. Point your client at this gateway, or send the API page's example:</p>
      <pre id="example"></pre>
    </div>
  </section>
  <section>
    <h2>Faults</h2>
    <form id="fault-form">
      <select id="f-route" aria-label="route"><option>/event/create</option><option>/event/update</option>
        <option>/event/close</option><option>*</option></select>
      <select id="f-kind" aria-label="kind"><option>status</option><option>drop</option><option>slow</option></select>
      <select id="f-status" aria-label="status"><option>503</option><option>500</option><option>429</option><option>401</option></select>
      <select id="f-when" aria-label="when"><option>before</option><option>after</option></select>
      <label>count <input id="f-count" type="number" min="1" value="1"></label>
      <label>delay ms <input id="f-delay" type="number" min="0" value="0"></label>
      <button type="submit">Queue</button>
      <button id="f-clear" type="button">Clear faults</button>
    </form>
    <p id="faults" class="muted"></p>
    <h2>Events</h2>
    <div id="events"></div>
  </section>
</main>
<script>
"use strict";
// Everything shown is set with textContent: no data is ever parsed as HTML.
const $ = (id) => document.getElementById(id);
let seq = 0;
let entries = [];
const opened = new Set();

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// Neighbouring labels are separated by spaces, so that they read as words when copied
// or read aloud, not only by their styling.
function words(parent, ...nodes) {
  nodes.filter(Boolean).forEach((node, i) => { if (i) parent.append(" "); parent.append(node); });
  return parent;
}

function clock(ms) {
  return ms === null || ms === undefined ? "" : new Date(ms).toISOString().slice(11, 23);
}

class NeedToken extends Error {}

async function fetchJson(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem("gatewayToken");
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  if (answer.status === 401) throw new NeedToken();
  return answer.json();
}

async function api(method, path, body) {
  const envelope = await fetchJson(method, path, body);
  if (!envelope.success) throw new Error(envelope.error_code + ": " + envelope.error);
  return envelope.data;
}

function why(entry) {
  if (entry.status === null) {
    return "dropped: no answer was sent" + (entry.fault ? " (a queued " + entry.fault.kind +
      " fault, " + entry.fault.when + " handling)" : "");
  }
  if (entry.fault) return "injected fault: " + (entry.error_code || entry.fault.kind);
  return entry.error || "";
}

function showJournal() {
  const rows = $("journal");
  rows.replaceChildren();
  const channel = $("channel").value.replace(/[\s-]/g, "").toUpperCase();
  let shown = 0;
  for (const entry of entries.slice().reverse()) {
    if (channel && entry.channel_id !== channel) continue;
    shown += 1;
    const row = el("div", null, "entry");
    if (entry.fault) row.classList.add("faulted");
    else if (entry.status === null || entry.status >= 400) row.classList.add("bad");
    row.append(words(el("div", null, "head"), el("span", clock(entry.received_at)),
                     el("span", entry.method), el("span", entry.path, "path"),
                     el("span", entry.status === null ? "dropped" : entry.status),
                     entry.error_code ? el("span", entry.error_code) : null));
    const reason = why(entry);
    if (reason) row.append(el("div", reason, "why"));
    if (entry.note) row.append(el("span", "note: " + entry.note, "note"));
    row.addEventListener("click", () => {
      if (opened.has(entry.seq)) opened.delete(entry.seq); else opened.add(entry.seq);
      showJournal();
    });
    if (opened.has(entry.seq)) {
      const detail = {headers: entry.headers, body: entry.body, body_bytes: entry.body_bytes,
                      answer: entry.response, op_id: entry.op_id, event_id: entry.event_id,
                      fault: entry.fault, seq: entry.seq, request_id: entry.request_id};
      row.append(el("pre", JSON.stringify(detail, null, 2)));
    }
    rows.append(row);
  }
  $("empty").hidden = shown > 0;
}

function showEvent(event) {
  const card = el("div", null, "event");
  card.append(words(el("h3"), el("span", event.state, "badge " + event.state),
                    el("span", event.severity, "badge " + event.severity), el("span", event.title)));
  card.append(el("div", event.status + ": " + event.message));
  if (event.tags.length) card.append(el("div", "tags: " + event.tags.join(", "), "muted"));
  if (Object.keys(event.attrs).length) card.append(el("div", "attrs: " + JSON.stringify(event.attrs), "muted"));
  card.append(el("div", "event_id " + event.event_id + (event.thing_id ? ", thing " + event.thing_id : ""), "muted"));
  const history = el("ol");
  for (const dispatch of event.history) {
    const fields = dispatch.fields;
    history.append(el("li", clock(dispatch.received_at) + " " + dispatch.route.slice(7) + " (" +
                      dispatch.send_status + "): " + (fields.status || "") + ": " + (fields.message || "")));
  }
  if (event.history_dropped) history.append(el("li", event.history_dropped + " older updates dropped"));
  card.append(history);
  return card;
}

async function refresh() {
  const query = new URLSearchParams();
  if ($("channel").value.trim()) query.set("channel_id", $("channel").value.trim());
  if ($("thing").value.trim()) query.set("thing_id", $("thing").value.trim());
  let events = [];
  try {
    events = (await api("GET", "/__admin/events?" + query)).events;
  } catch (error) {
    if (error instanceof NeedToken) throw error;
    $("events").replaceChildren(el("p", error.message, "muted"));
    return;
  }
  $("events").replaceChildren(...events.reverse().map(showEvent));
  if (!events.length) $("events").append(el("p", "No events yet.", "muted"));
  const faults = (await api("GET", "/__admin/faults")).faults;
  $("faults").textContent = faults.length ? "Queued: " + faults.map((f) =>
    f.route + " " + (f.kind === "status" ? f.status : f.kind) + " " + f.when + " ×" + f.count).join("; ")
    : "No faults queued.";
}

function showState(text, down) {
  $("state").textContent = text;
  $("state").classList.toggle("down", down);
}

function askToken() {
  $("panes").hidden = true;
  $("login").hidden = false;
  showState("token needed", true);
}

async function showInfo() {
  const info = await api("GET", "/__admin/info");
  $("line").textContent = "answers as production " + info.gateway_version + " · event_gateway " +
    info.module_version + (info.auth ? " · token on" : "");
  // The example is the OpenAPI document's, the API page's own, sent now.
  const document = await fetchJson("GET", "/__admin/openapi.json");
  const body = Object.assign({}, document.paths["/event/create"].post.requestBody
    .content["application/json"].examples.milliseconds.value);
  body.event_time = body.started_at = Date.now();
  $("example").textContent = "curl -X POST " + location.origin + "/event/create \\\n" +
    "  -H 'Content-Type: application/json' \\\n  -d '" + JSON.stringify(body) + "'";
}

async function follow() {
  let waitMs = 0;            // the first look answers at once; later ones wait for news
  for (;;) {
    try {
      if (waitMs === 0) await showInfo();
      const found = (await api("GET", "/__admin/requests?after=" + seq + "&wait_ms=" + waitMs)).requests;
      waitMs = 20000;
      showState("live", false);
      $("login").hidden = true;
      $("panes").hidden = false;
      if (found.length) {
        entries = entries.concat(found).slice(-200);
        seq = found[found.length - 1].seq;
      }
      showJournal();
      await refresh();
    } catch (error) {
      if (error instanceof NeedToken) { askToken(); return; }
      showState("reconnecting…", true);
      seq = 0;               // a restarted gateway counts from 1 again: forget the old rows
      entries = [];
      opened.clear();
      showJournal();
      waitMs = 0;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

async function act(method, path, body) {
  try {
    if (method) await api(method, path, body);
    await refresh();
  } catch (error) {
    if (error instanceof NeedToken) askToken(); else $("faults").textContent = error.message;
  }
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("gatewayToken", $("token").value);
  $("token").value = "";
  $("login").hidden = true;
  follow();
});
$("reset").addEventListener("click", () => {
  entries = [];
  showJournal();
  act("POST", "/__admin/reset");
});
$("fault-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const kind = $("f-kind").value;
  act("POST", "/__admin/faults", {route: $("f-route").value, kind,
      status: kind === "status" ? Number($("f-status").value) : null,
      when: kind === "slow" ? "before" : $("f-when").value,
      count: Number($("f-count").value), delay_ms: Number($("f-delay").value)});
});
$("f-clear").addEventListener("click", () => act("DELETE", "/__admin/faults"));
for (const id of ["channel", "thing"]) {
  $(id).addEventListener("change", () => { showJournal(); act(); });
}
follow();
</script>
</body>
</html>
"""
PAGE_BYTES = PAGE_HTML.encode("utf-8")


def _inline_hash(html, tag):
    """The CSP source that allows exactly the one inline <tag> of html."""
    text = html.split("<%s>" % tag, 1)[1].split("</%s>" % tag, 1)[0]
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


PAGE_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            % (_inline_hash(PAGE_HTML, "script"), _inline_hash(PAGE_HTML, "style")))
_PAGE_HEADERS = (("Content-Type", "text/html; charset=utf-8"),
                 ("Content-Security-Policy", PAGE_CSP),
                 ("X-Content-Type-Options", "nosniff"),
                 ("Cache-Control", "no-store"))


if __name__ == "__main__":
    sys.exit(main())

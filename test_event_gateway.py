"""Tests for event_gateway.py, in the order of the contract's sections (0. production
lines to 11. local safety), then robustness, conformance mode and the README's examples.

Most tests call the sans-I/O core (EventGateway.handle) directly; the tests
under "HTTP shell" and "Command line" use real sockets on ephemeral ports.

Run: python -W error -m pytest -q

Conformance mode runs the same tests over HTTP against a server you started:

    EVENT_GATEWAY_URL=http://127.0.0.1:6666 python -m pytest test_event_gateway.py

with EVENT_GATEWAY_CHANNEL=ID:PASSWORD (default: the page's example channel) and
EVENT_GATEWAY_TOKEN (default: none).  Tests that need the in-process gateway
(its store, its admin helpers, this module's CLI) are skipped with a reason.
Before each test the server's events are dropped with DELETE /__admin/events
where it offers that route (op_ids repeat across tests).
"""

import base64
import contextlib
import errno
import http.client
import http.server
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import event_gateway as eg

# Conformance mode: the server under test, if not this module in-process.
REMOTE_URL = os.environ.get("EVENT_GATEWAY_URL", "").rstrip("/") or None
REMOTE_TOKEN = os.environ.get("EVENT_GATEWAY_TOKEN") or None
LOCAL_ONLY = pytest.mark.skipif(
    REMOTE_URL is not None, reason="tests this module in-process; conformance mode "
    "(EVENT_GATEWAY_URL) runs the tests that go over HTTP")



def _remote_problem(url, token):
    """In conformance mode, one clear line and exit when the server does not answer
    or wants a token that was not given, rather than hundreds of failing tests.
    Returns the problem in one sentence, or None."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    problem = None
    try:
        conn.request("GET", "/__admin/events", headers={
            "Authorization": "Bearer " + token} if token else {})
        if conn.getresponse().status == 401:
            problem = ("the server at %s wants a gateway token: set EVENT_GATEWAY_TOKEN to it"
                       % url if not token else "the server at %s refuses the gateway token "
                       "given in EVENT_GATEWAY_TOKEN" % url)
    except OSError as error:
        problem = ("EVENT_GATEWAY_URL=%s does not answer (%s); start the server first, for "
                   "example: python event_gateway.py --quiet &" % (url, error))
    finally:
        conn.close()
    return problem


@pytest.fixture(scope="session", autouse=True)
def remote_answers():
    """Conformance mode: stop the whole run at once, with one line, when the server
    cannot be tested."""
    problem = REMOTE_URL and _remote_problem(REMOTE_URL, REMOTE_TOKEN)
    if problem:
        pytest.exit("conformance mode: " + problem, returncode=3)

CHANNEL = eg.EXAMPLE_CHANNEL_ID
PASSWORD = eg.EXAMPLE_CHANNEL_PASSWORD
if REMOTE_URL and os.environ.get("EVENT_GATEWAY_CHANNEL"):
    _channel_id, _, PASSWORD = os.environ["EVENT_GATEWAY_CHANNEL"].partition(":")
    CHANNEL = eg.canonical_channel_id(_channel_id)
# The same channel id as a client might write it: lower case, aliases, separators.
ALIASED_CHANNEL = CHANNEL.replace("0", "O").replace("1", "I", 1).replace("1", "l")
SPACED_CHANNEL = " %s-%s-%s %s-%s-%s-%s " % tuple(CHANNEL[i:i + 4] for i in range(0, 26, 4))
JSON_HEADERS = {"Content-Type": "application/json"}
AUTH_HEADERS = {"Authorization": "Bearer " + REMOTE_TOKEN} if REMOTE_TOKEN else {}
HTTP_HEADERS = dict(JSON_HEADERS, **AUTH_HEADERS)     # for requests sent over a socket
# The same token as a raw header line, for requests written byte by byte.
AUTH_LINE = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in AUTH_HEADERS.items())
DROP = object()          # in valid_body(**changes): remove this key
HEX32 = re.compile(r"[0-9a-f]{32}")
T0 = 1713750000          # the page's event_time


def crockford(number):
    """The canonical channel id of a 128-bit number (two zero bits pad it to 130)."""
    value = number << 2
    return "".join(eg.CROCKFORD_ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(26)))


# Two more channels, to reach the password limits with a 200.
CHANNEL_8 = crockford(8)
CHANNEL_128 = crockford(128)
OTHER_CHANNEL = crockford(2 ** 127 + 12345)


class Clock:
    """A pinned clock: each call is one second after the previous one."""

    def __init__(self, start=1800000000.0):
        self.now = start

    def __call__(self):
        self.now += 1.0
        return self.now


# Helpers ##########################################################################

BASE_BODIES = {
    eg.CREATE: {"channel_id": CHANNEL, "password": PASSWORD, "title": "Database lag",
                "status": "ongoing", "message": "Replica delay > 30s", "severity": "high",
                "event_time": T0},
    eg.UPDATE: {"channel_id": CHANNEL, "password": PASSWORD, "event_id": "to-be-set",
                "status": "ongoing", "message": "Replica delay > 60s", "severity": "critical",
                "event_time": T0 + 60},
    eg.CLOSE: {"channel_id": CHANNEL, "password": PASSWORD, "event_id": "to-be-set",
               "status": "resolved", "message": "Replica caught up", "severity": "normal",
               "event_time": T0 + 120},
}


# Every CLI process and HTTP connection a test opens, so that it is stopped and
# closed after the test, however the test ended (the suite runs under python -W error).
STARTED = []
CONNECTIONS = []


def http_connection(url, timeout):
    """An http.client connection to url, closed after the test."""
    conn = http.client.HTTPConnection(*address(url), timeout=timeout)
    CONNECTIONS.append(conn)
    return conn


@pytest.fixture(autouse=True)
def close_what_tests_opened():
    yield
    while CONNECTIONS:
        CONNECTIONS.pop().close()
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def read_text(path):
    with open(path, encoding="utf-8") as text:
        return text.read()


def read_bytes(path):
    with open(path, "rb") as data:
        return data.read()


def valid_body(route, **changes):
    """A body that passes every rule of route, with changes (DROP removes a key)."""
    body = dict(BASE_BODIES[route])
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def call(gw, method, path, body=None, headers=None):
    """handle() one request; body may be a dict (sent as JSON), bytes or None."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    if headers is None:
        headers = JSON_HEADERS
    status, response_headers, payload = gw.handle(method, path, headers, body)
    envelope = assert_envelope(status, response_headers, payload)
    return status, {k.lower(): v for k, v in response_headers}, envelope


# The category and retryable of every error code, as the contract's table of the
# response envelope states them (not read from the module, so that the two are compared).
CATEGORY_ROWS = [
    ("validation", False, [code for code, status in eg.ERRORS.items()
                           if status in (400, 405, 411, 413, 414, 431, 505)]),
    ("auth", False, ["authentication_failed"]),
    ("permission", False, ["host_not_allowed", "cross_site_request"]),
    ("conflict", False, ["password_mismatch", "op_id_conflict", "op_id_payload_conflict",
                         "event_closed", "thing_id_mismatch", "too_many_channels",
                         "too_many_faults"]),
    ("not_found", False, ["route_not_found", "channel_not_found", "event_not_found",
                          "send_status_not_found"]),
    ("rate_limit", True, ["rate_limited"]),
    ("too_busy", True, ["server_busy"]),
    ("too_busy", False, ["store_full"]),
    ("internal", True, ["internal_error"]),
]
CATEGORY_OF = {code: (category, retryable) for category, retryable, codes in CATEGORY_ROWS
               for code in codes}
# One code, two statuses: step 8a's 400 is a validation, the store's 409 a conflict.
CATEGORY_AT = {(code, eg.ERRORS[code]): row for code, row in CATEGORY_OF.items()}
CATEGORY_AT["thing_id_mismatch", 400] = ("validation", False)
PROBLEM_KEYS = ["code", "category", "status", "title", "detail", "localized_message", "locale",
                "retryable", "request_id"]


def assert_no_null_keys(value):
    """Production leaves out every key whose value would be null."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert item is not None, "null key %r" % key
            assert_no_null_keys(item)


def assert_envelope(status, headers, payload):
    """The envelope in production's form: a success is exactly success and data, an
    error success, error, error_code and problem; a 405 has no body; every answer
    an X-Request-Id.  Returns the parsed envelope (None for a 405)."""
    names = {k.lower(): v for k, v in headers}
    assert HEX32.fullmatch(names["x-request-id"])
    if status == 405:
        assert payload == b"" and names["allow"], (status, payload)
        return None
    assert names["content-type"] == "application/json"
    envelope = json.loads(payload)
    assert envelope["success"] is (status == 200)
    if status == 200:
        assert list(envelope) == ["success", "data"]
        return envelope
    assert list(envelope) == ["success", "error", "error_code", "problem"], envelope
    code, message = envelope["error_code"], envelope["error"]
    assert isinstance(message, str) and message
    problem = envelope["problem"]
    keys = PROBLEM_KEYS if code != "route_not_found" else PROBLEM_KEYS[:-1]
    assert list(problem) == keys, problem
    assert (problem["code"], problem["status"], problem["detail"]) == (code, status, message)
    assert (problem["category"], problem["retryable"]) == CATEGORY_AT[code, status]
    assert names["content-language"] == problem["locale"]
    if code != "route_not_found":
        assert problem["request_id"] == names["x-request-id"]
    assert problem["title"] and problem["localized_message"]
    assert_no_null_keys(envelope)
    return envelope


def post(gw, route, body, headers=None):
    return call(gw, "POST", route, body, headers)


def create(gw, **changes):
    """Create an event; returns its event_id."""
    status, _, envelope = post(gw, eg.CREATE, valid_body(eg.CREATE, **changes))
    assert status == 200, envelope
    return envelope["data"]["event_id"]


def body_for(gw, route, changes):
    """valid_body(route, **changes), with a fresh event's id on update and close."""
    if route != eg.CREATE and "event_id" not in changes:
        changes = dict(changes, event_id=create(gw))
    return valid_body(route, **changes)


def assert_error(result, status, code, *words):
    got_status, _, envelope = result
    if status == 405:
        assert (got_status, envelope) == (405, None)     # production's 405 has no body
        return
    assert (got_status, envelope and envelope["error_code"]) == (status, code), envelope
    for word in words:
        assert word in envelope["error"], envelope["error"]


class RemoteGateway:
    """The server at EVENT_GATEWAY_URL behind EventGateway.handle()'s interface.

    In conformance mode the tests' handle() calls go over HTTP to it; anything
    else a test asks of the in-process gateway (events(), check_head(), ...)
    skips that test, with the reason.
    """

    def __init__(self, url, token):
        self.url, self.token = url, token
        self.internal_errors = []
        status, _, payload = self.handle("GET", "/__admin/info", {}, None)
        version = json.loads(payload)["data"]["gateway_version"] if status == 200 else None
        self.line = eg.LINES.get(version, eg.LINES[eg.DEFAULT_LINE])

    def handle(self, method, path, headers, body):
        headers = dict(headers)
        if self.token and not any(name.lower() == "authorization" for name in headers):
            headers["Authorization"] = "Bearer " + self.token
        conn = http_connection(self.url, 30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def reset(self):
        # Best effort: a server without the test-support routes answers 404.
        self.handle("DELETE", "/__admin/events", {}, None)

    def clear_faults(self):
        self.handle("DELETE", "/__admin/faults", {}, None)

    def __getattr__(self, name):
        pytest.skip("needs the in-process EventGateway (gateway.%s); conformance mode runs "
                    "only what goes over HTTP" % name)


def make_gateway(line=eg.DEFAULT_LINE, **options):
    """A fresh in-process gateway of line with the example channel and the two
    password-limit channels."""
    gateway = eg.EventGateway(clock=Clock(), gateway_version=line, **options)
    gateway.register_channel(CHANNEL_8, "p" * 8)
    gateway.register_channel(CHANNEL_128, "p" * 128)
    gateway.register_channel(OTHER_CHANNEL, "other-pass")
    return gateway


def without_internal_errors(gateway):
    """Yield gateway to the test, then fail it on any 500 the gateway made (a bug here)."""
    yield gateway
    assert getattr(gateway, "internal_errors", []) == [], gateway.internal_errors[-1]


@pytest.fixture
def gw():
    """A fresh gateway of the default line (in conformance mode: the server)."""
    if REMOTE_URL:
        remote = RemoteGateway(REMOTE_URL, REMOTE_TOKEN)
        remote.reset()
        yield remote
        return
    yield from without_internal_errors(make_gateway())


@pytest.fixture(params=list(eg.LINES), ids=lambda line: "line-" + line)
def gw_line(request):
    """A fresh gateway of each production line in turn (in conformance mode: the
    server, for the line it runs as)."""
    if REMOTE_URL:
        remote = RemoteGateway(REMOTE_URL, REMOTE_TOKEN)
        if remote.line.name != request.param:
            pytest.skip("the server at EVENT_GATEWAY_URL runs line %s" % remote.line.name)
        remote.reset()
        yield remote
        return
    yield from without_internal_errors(make_gateway(request.param))


# The code of an op_id reused with another body, in each line (V6).
CONFLICT_CODE = {"1.2": "op_id_conflict", "1.3": "op_id_payload_conflict"}

# What each line answers to an accepted dispatch (the contract's table of lines, V3, V4).
SUCCESS_KEYS = {"1.2": ["channel_id", "op_id", "event_id", "thing_id", "accepted"],
                "1.3": ["op_id", "event_id"]}
GENERATED_OP_ID = {"1.2": re.compile(r"[0-9a-f]{32}"),
                   "1.3": re.compile(r"[0-9a-f]{13}-[0-9a-f]{32}")}


def assert_accepted(gw, result, thing_id=None, channel_id=CHANNEL, op_id=None):
    """A 200 to a dispatch, with exactly the data of gw's line; returns the data."""
    status, _, envelope = result
    assert status == 200, envelope
    data = envelope["data"]
    line = gw.line.name
    assert list(data) == [key for key in SUCCESS_KEYS[line]
                          if key != "thing_id" or thing_id is not None], data
    assert HEX32.fullmatch(data["event_id"])
    if op_id is None:
        assert GENERATED_OP_ID[line].fullmatch(data["op_id"]), data
    else:
        assert data["op_id"] == op_id
    expected = {"channel_id": channel_id, "thing_id": thing_id, "accepted": True}
    assert {key: data[key] for key in data if key in expected} == {
        key: expected[key] for key in data if key in expected}
    return data


@pytest.fixture
def gw_auth():
    """A gateway whose token is s3cret-token."""
    if REMOTE_URL:
        pytest.skip("needs a gateway whose token the test chooses")
    yield from without_internal_errors(eg.EventGateway(token="s3cret-token", clock=Clock()))


# 0. Production lines ##############################################################

class ManualClock:
    """A clock the test sets: returns now, in Unix seconds."""

    def __init__(self, now=1800000000.0):
        self.now = now

    def __call__(self):
        return self.now


def line_gateway(line, **options):
    """An in-process gateway of line whose clock the test sets (gateway.clock.now)."""
    return make_gateway(line, **options) if "clock" in options else eg.EventGateway(
        clock=ManualClock(), gateway_version=line, **options)


# Every row of the contract's table of lines, as what a client sees in each line:
# (request, what line 1.2 answers, what line 1.3 answers); an answer is a status
# and an error code (None for a success).
def _thing_create(gw):
    return post(gw, "/thing/db-1/event/create", valid_body(eg.CREATE))


def _send_status(gw):
    op_id = post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-s"))[2]["data"]["op_id"]
    return call(gw, "GET", "/send_status/" + op_id)


def _unknown_field(gw):
    return post(gw, eg.CREATE, valid_body(eg.CREATE, source="ci"))


def _conflict(gw):
    post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-c"))
    return post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-c", title="other"))


def _ended_at_null(gw):
    return post(gw, eg.UPDATE, body_for(gw, eg.UPDATE, {"ended_at": None}))


LINE_ROWS = [
    pytest.param(_thing_create, (404, "route_not_found"), (200, None), id="V1-thing-routes"),
    pytest.param(_send_status, (404, "route_not_found"), (200, None), id="V2-send-status"),
    pytest.param(_unknown_field, (400, "invalid_json_data"), (200, None), id="V5-unknown-fields"),
    pytest.param(_conflict, (409, "op_id_conflict"), (409, "op_id_payload_conflict"),
                 id="V6-conflict-code"),
    pytest.param(_ended_at_null, (200, None), (400, "event_temporal_fields_forbidden_on_update"),
                 id="V9-ended-at-null"),
]


@pytest.mark.parametrize("send, answer_1_2, answer_1_3", LINE_ROWS)
def test_each_row_of_the_lines_table(gw_line, send, answer_1_2, answer_1_3):
    status, _, envelope = send(gw_line)
    expected = {"1.2": answer_1_2, "1.3": answer_1_3}[gw_line.line.name]
    assert (status, envelope["error_code"] if status != 200 else None) == expected, envelope


@LOCAL_ONLY
def test_lines_differ_in_their_success_data_and_locales():
    for line in ("1.2", "1.3"):
        gateway = make_gateway(line)
        assert_accepted(gateway, post(gateway, eg.CREATE, valid_body(eg.CREATE)))    # V3, V4
    assert eg.LINES["1.2"].locales == ("en", "zh-CN")                                 # V7
    assert eg.LINES["1.3"].locales == ("en", "zh-CN", "zh-TW")


@LOCAL_ONLY
def test_the_steps_read_the_lines_table_not_the_version():
    # One record per line, one field per row: no step may test the version itself.
    source = read_text(SCRIPT)
    assert not re.search(r"""(version|line(\.name)?) *[!=]= *["']1\.[23]["']""", source)
    assert set(eg.LINES) == {"1.2", "1.3"} and eg.DEFAULT_LINE == "1.3"
    assert [field for field in eg.Line._fields if getattr(eg.LINES["1.2"], field)
            == getattr(eg.LINES["1.3"], field)] == []


@LOCAL_ONLY
def test_unknown_gateway_version_is_refused():
    with pytest.raises(ValueError, match="gateway_version"):
        eg.EventGateway(gateway_version="1.4")


# -- Thing-scoped routes (line 1.3) --------------------------------------------------

@LOCAL_ONLY
def test_thing_scoped_create_stores_the_paths_thing():
    gw = make_gateway("1.3")
    data = assert_accepted(gw, post(gw, "/thing/db-1/event/create", valid_body(eg.CREATE)))
    event = gw.event(data["event_id"])
    assert event["thing_id"] == "db-1" and event["history"][0]["route"] == eg.CREATE
    assert event["history"][0]["fields"]["status"] == "ongoing"
    assert gw.requests()[-1]["path"] == "/thing/db-1/event/create"     # as requested
    update = valid_body(eg.UPDATE, event_id=data["event_id"])
    assert_accepted(gw, post(gw, "/thing/db-1/event/update", update))
    assert_error(post(gw, "/thing/db-2/event/update", update), 409, "thing_id_mismatch")


def test_ios_apps_thing_scoped_close(gw_line):
    # The official iOS app closes a thing's event with event_time in seconds, attrs: {}
    # and an op_id of 32 hex digits.
    if gw_line.line.name == "1.2":
        assert_error(post(gw_line, "/thing/db-1/event/close", valid_body(eg.CLOSE)), 404,
                     "route_not_found")
        return
    event_id = assert_accepted(gw_line, post(gw_line, "/thing/db-1/event/create",
                                             valid_body(eg.CREATE)))["event_id"]
    op_id = "0123456789abcdef0123456789abcdef"
    body = valid_body(eg.CLOSE, event_id=event_id, event_time=T0 + 300, attrs={}, op_id=op_id)
    assert_accepted(gw_line, post(gw_line, "/thing/db-1/event/close", body), op_id=op_id)


@pytest.mark.parametrize("path, body_thing, status, code", [
    pytest.param("/thing/db-1/event/create", "db-1", 200, None, id="same-thing-in-body"),
    pytest.param("/thing/db-1/event/create", " db-1 ", 200, None, id="body-thing-trimmed"),
    pytest.param("/thing/db-1/event/create", "", 200, None, id="empty-body-thing-is-absent"),
    pytest.param("/thing/db-1/event/create", "db-2", 400, "thing_id_mismatch", id="body-differs"),
    pytest.param("/thing/%20/event/create", DROP, 400, "invalid_thing_id", id="blank-segment"),
    pytest.param("/thing/a%2Fb/event/create", DROP, 400, "invalid_thing_id",
                 id="decoded-slash-breaks-the-rule"),
    pytest.param("/thing/%64b-1/event/create", DROP, 200, None, id="percent-decoded"),
    pytest.param("/thing/" + "t" * 64 + "/event/create", DROP, 200, None, id="64-chars"),
    pytest.param("/thing/" + "t" * 65 + "/event/create", DROP, 400, "invalid_thing_id",
                 id="65-chars"),
    pytest.param("/thing//event/create", DROP, 404, "route_not_found", id="empty-segment"),
    pytest.param("/thing/a/b/event/create", DROP, 404, "route_not_found", id="two-segments"),
])
def test_thing_scoped_path_rules(path, body_thing, status, code):
    if REMOTE_URL:
        pytest.skip("needs a line 1.3 gateway of its own")
    gw = make_gateway("1.3")
    result = post(gw, path, valid_body(eg.CREATE, thing_id=body_thing))
    if code is None:
        data = assert_accepted(gw, result)
        assert gw.event(data["event_id"])["thing_id"] == urllib.parse.unquote(
            path.split("/")[2])
    else:
        assert_error(result, status, code)


@LOCAL_ONLY
def test_thing_scoped_checks_run_before_the_credentials():
    gw = make_gateway("1.3")
    body = valid_body(eg.CREATE, thing_id="db-2", password="wrong-pass-1")
    assert_error(post(gw, "/thing/db-1/event/create", body), 400, "thing_id_mismatch", "path")
    assert_error(call(gw, "GET", "/thing/db-1/event/create"), 405, "method_not_allowed")


@LOCAL_ONLY
def test_a_fault_named_by_its_action_strikes_the_thing_scoped_route():
    gw = make_gateway("1.3")
    gw.add_fault(eg.CREATE, 503)
    assert_error(post(gw, "/thing/db-1/event/create", valid_body(eg.CREATE)), 503, "server_busy")
    assert gw.faults() == []


@LOCAL_ONLY
def test_path_thing_and_body_thing_are_different_requests_for_op_ids():
    gw = make_gateway("1.3")
    assert post(gw, "/thing/A/event/create", valid_body(eg.CREATE, op_id="op-t"))[0] == 200
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-t", thing_id="A")), 409,
                 "op_id_payload_conflict")


# -- Unknown fields (line 1.3 ignores them) ------------------------------------------

# Line 1.3's production refuses a client op_id on the event routes; the page's rule is
# kept, and the journal says so.
CLIENT_OP_ID_NOTE = ("production 1.3 refuses a client op_id (400 op_id_not_allowed); this gateway "
                     "keeps the page's rule")


@LOCAL_ONLY
@pytest.mark.parametrize("line, route, op_id, noted", [
    pytest.param("1.3", eg.CREATE, "op-1", True, id="1.3-create"),
    pytest.param("1.3", eg.UPDATE, "op-1", True, id="1.3-update-refused-later"),
    pytest.param("1.3", "/thing/db-1/event/create", "op-1", True, id="1.3-thing-scoped"),
    pytest.param("1.3", eg.CREATE, "", False, id="1.3-empty-is-absent"),
    pytest.param("1.3", eg.CREATE, DROP, False, id="1.3-no-op-id"),
    pytest.param("1.2", eg.CREATE, "op-1", False, id="1.2"),
])
def test_line_1_3_notes_that_production_refuses_a_client_op_id(line, route, op_id, noted):
    gw = make_gateway(line)
    post(gw, route, valid_body(route.replace("/thing/db-1", ""), op_id=op_id, event_id="e-none")
         if route != eg.CREATE else valid_body(route, op_id=op_id))
    note = gw.requests()[-1]["note"] or ""
    assert (CLIENT_OP_ID_NOTE in note) is noted, note

@LOCAL_ONLY
def test_line_1_3_ignores_unknown_fields_and_notes_them_with_close_names():
    gw = make_gateway("1.3")
    body = valid_body(eg.CREATE, source="ci", eventTime=5, op_id="op-u")
    data = assert_accepted(gw, post(gw, eg.CREATE, body), op_id="op-u")
    event = gw.event(data["event_id"])
    assert "source" not in json.dumps(event) and "eventTime" not in json.dumps(event)
    note = gw.requests()[-1]["note"]
    assert note == (CLIENT_OP_ID_NOTE + "; ignored unknown fields `eventTime` (did you mean "
                    "`event_time`?), `source`, as production 1.3 does")
    # A replay compares the bodies without the fields it ignored.
    again = post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-u", other=1))
    assert again[2] == post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-u"))[2]
    assert len(gw.events()) == 1


@LOCAL_ONLY
def test_a_replay_names_the_seq_it_replays():
    gw = make_gateway("1.3")
    create(gw, op_id="op-r")
    first = gw.requests()[-1]["seq"]
    post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-r"))
    replay = CLIENT_OP_ID_NOTE + "; replay of seq %d; nothing applied"
    assert gw.requests()[-1]["note"] == replay % first
    gw.clear_requests()
    post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-r"))
    assert gw.requests()[-1]["note"] == replay % first


@LOCAL_ONLY
@pytest.mark.parametrize("changes, noted", [
    pytest.param({"status": "x" * 25}, "status", id="status-too-long"),
    pytest.param({"severity": "meh"}, "severity", id="severity"),
    pytest.param({"message": DROP}, "status, message and severity for presence",
                 id="message-missing"),
    pytest.param({"title": DROP, "message": DROP}, None, id="title-missing-too"),
    pytest.param({"images": None}, "images", id="images-null"),
    pytest.param({"attrs": {"a": [1]}}, "attrs", id="attrs-array"),
    pytest.param({"event_time": "soon"}, None, id="event-time-still-checked"),
])
def test_refusals_that_production_1_3_would_let_through_are_noted(changes, noted):
    for line in ("1.2", "1.3"):
        gw = make_gateway(line)
        assert post(gw, eg.CREATE, valid_body(eg.CREATE, **changes))[0] == 400
        note = gw.requests()[-1]["note"]
        if noted is None or line == "1.2":
            assert note is None
        else:
            assert note == ("production 1.3 would accept this (it no longer checks %s); this "
                            "gateway keeps the page's rule" % noted)


@LOCAL_ONLY
def test_started_at_on_update_and_close_is_noted_in_1_3():
    gw = make_gateway("1.3")
    for route in (eg.UPDATE, eg.CLOSE):
        assert post(gw, route, body_for(gw, route, {"started_at": T0}))[0] == 400
        assert "no longer checks started_at on" in gw.requests()[-1]["note"]
    assert post(gw, eg.UPDATE, body_for(gw, eg.UPDATE, {"started_at": T0, "ended_at": T0}))[0] == 400
    assert gw.requests()[-1]["note"] is None          # ended_at: production refuses it too


# -- Rate limit (line 1.3, no token) -------------------------------------------------

def burst(gw, count, client="10.0.0.1"):
    """count creates from client; their statuses."""
    body = json.dumps(valid_body(eg.CREATE)).encode()
    return [gw.handle("POST", eg.CREATE, JSON_HEADERS, body, client=client)[0]
            for _ in range(count)]


@LOCAL_ONLY
def test_rate_limit_answers_the_61st_request_of_a_minute_from_one_ip():
    gw = line_gateway("1.3", rate_limit=True)
    gw.clock.now = 1800000000.0 - 1800000000.0 % 60        # the minute's first second
    assert burst(gw, 60) == [200] * 60
    gw.clock.now += 59.999
    status, headers, payload = gw.handle("POST", eg.CREATE, JSON_HEADERS,
                                         json.dumps(valid_body(eg.CREATE)).encode(),
                                         client="10.0.0.1")
    envelope = assert_envelope(status, headers, payload)
    assert (status, envelope["error_code"], envelope["problem"]["retryable"]) == (
        429, "rate_limited", True)
    assert "retry-after" not in {name.lower() for name, _ in headers}
    assert "over 60 requests from 10.0.0.1" in envelope["error"]
    entry = gw.requests()[-1]
    assert entry["op_id"] is None and entry["channel_id"] == CHANNEL     # the body's ids
    assert len(gw.events()) == 60                                        # nothing applied
    assert burst(gw, 1, client="10.0.0.2") == [200]                      # per IP
    gw.clock.now += 0.001                                                # the next minute
    assert burst(gw, 60) == [200] * 60


@LOCAL_ONLY
def test_a_rate_limited_thing_scoped_request_is_journaled_with_its_bodys_ids():
    gw = line_gateway("1.3", rate_limit=True)
    body = json.dumps(valid_body(eg.CREATE, op_id="op-t")).encode()
    for _ in range(61):
        status = gw.handle("POST", "/thing/db-1/event/create", JSON_HEADERS, body,
                           client="10.0.0.1")[0]
    entry = gw.requests()[-1]
    assert (status, entry["op_id"], entry["channel_id"]) == (429, "op-t", CHANNEL)


@LOCAL_ONLY
def test_rate_limit_counts_1200_in_all():
    gw = line_gateway("1.3", rate_limit=True, max_requests=0)
    gw.clock.now = 1800000000.0 - 1800000000.0 % 60
    for client in range(20):
        assert burst(gw, 60, client="10.0.1.%d" % client) == [200] * 60
    assert burst(gw, 1, client="10.0.2.1") == [429]
    assert "over 1200 requests in all" in gw.handle(
        "POST", eg.CREATE, JSON_HEADERS, b"{}", client="10.0.2.2")[2].decode()
    gw.reset()                                                 # a reset clears the counts
    assert burst(gw, 1, client="10.0.2.1") == [200]


@LOCAL_ONLY
def test_without_rate_limit_the_journal_says_what_production_would_answer():
    gw = line_gateway("1.3", log=io.StringIO())
    gw.clock.now = 1800000000.0 - 1800000000.0 % 60
    assert burst(gw, 61) == [200] * 61
    notes = [entry["note"] for entry in gw.requests()]
    assert notes[:60] == [None] * 60
    assert notes[60] == ("production 1.3 would answer 429 rate_limited: over 60 requests from "
                         "10.0.0.1 this minute")
    assert "production 1.3 would answer 429 rate_limited" in gw.log.getvalue().splitlines()[-1]


@LOCAL_ONLY
@pytest.mark.parametrize("line, token", [("1.2", None), ("1.3", "s3cret-token")])
def test_no_rate_limit_in_line_1_2_or_with_a_token(line, token):
    gw = eg.EventGateway(clock=ManualClock(), gateway_version=line, token=token)
    headers = dict(JSON_HEADERS, Authorization="Bearer " + token) if token else JSON_HEADERS
    body = json.dumps(valid_body(eg.CREATE)).encode()
    statuses = [gw.handle("POST", eg.CREATE, headers, body, client="10.0.0.1")[0]
                for _ in range(61)]
    assert statuses == [200] * 61 and [e["note"] for e in gw.requests()] == [None] * 61
    with pytest.raises(ValueError, match="rate_limit"):
        eg.EventGateway(gateway_version=line, token=token, rate_limit=True)


@LOCAL_ONLY
def test_rate_limit_counts_only_event_routes_past_step_3():
    gw = line_gateway("1.3", rate_limit=True)
    for _ in range(70):
        gw.handle("GET", eg.CREATE, {}, None, client="10.0.0.1")           # 405: not counted
        gw.handle("GET", "/healthz", {}, None, client="10.0.0.1")
    assert burst(gw, 60) == [200] * 60 and burst(gw, 1) == [429]


@LOCAL_ONLY
def test_rate_limit_over_http_reads_the_peer_address():
    gateway = line_gateway("1.3", rate_limit=True)
    gateway.clock.now = 1800000000.0 - 1800000000.0 % 60
    with eg.serve_in_thread(gateway) as served:
        conn = http_connection(served.url, 5)
        body = json.dumps(valid_body(eg.CREATE))
        statuses = []
        for _ in range(61):
            conn.request("POST", eg.CREATE, body, dict(JSON_HEADERS, **{"X-Forwarded-For": "1.2.3.4"}))
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        conn.close()
    assert statuses == [200] * 60 + [429]
    assert "from 127.0.0.1" in gateway.requests()[-1]["error"]      # not X-Forwarded-For


# 1. Routes ########################################################################

def test_healthz_answers_ok(gw):
    status, _, envelope = call(gw, "GET", "/healthz")
    assert (status, envelope["data"]) == (200, {"status": "ok"})


@pytest.mark.parametrize("method, path, allow", [
    pytest.param("POST", "/healthz", "GET, HEAD", id="healthz-post"),
    pytest.param("GET", "/event/create", "POST", id="create-get"),
    pytest.param("PUT", "/event/update", "POST", id="update-put"),
    pytest.param("DELETE", "/event/close", "POST", id="close-delete"),
    pytest.param("PATCH", "/__admin/events", "DELETE, GET, HEAD", id="admin-events-patch"),
    pytest.param("POST", "/__admin/events/abc", "GET, HEAD", id="admin-event-post"),
    pytest.param("POST", "/", "GET, HEAD", id="page-post"),
    pytest.param("DELETE", "/favicon.ico", "GET, HEAD", id="favicon-delete"),
    pytest.param("GET", "/__admin/reset", "POST", id="reset-get"),
])
def test_wrong_method_is_405_with_allow(gw, method, path, allow):
    result = call(gw, method, path, b"{}")
    assert_error(result, 405, "method_not_allowed")
    assert result[1]["allow"] == allow


@pytest.mark.parametrize("path", [
    pytest.param("/event/create/", id="trailing-slash"),
    pytest.param("/event/Create", id="case-differs"),
    pytest.param("/event", id="prefix"),
    pytest.param("/__admin/events/", id="admin-empty-event-id"),
    pytest.param("/__admin/events/a/b", id="admin-event-subpath"),
])
def test_unknown_path_is_404(gw, path):
    assert_error(post(gw, path, valid_body(eg.CREATE)), 404, "route_not_found")


def test_query_string_is_ignored_on_event_routes(gw):
    assert_accepted(gw, post(gw, eg.CREATE + "?x=1", valid_body(eg.CREATE)))


# 2. Request processing order ######################################################

TOKEN_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-token"}

# Each row has two defects (or a defect and a boundary); the first in the processing order wins.
ORDER_CASES = [
    pytest.param("POST", "/nope", {}, b"{", "route_not_found", id="404-before-401"),
    pytest.param("GET", eg.CREATE, {}, b"{", "authentication_failed", id="401-before-405"),
    pytest.param("GET", eg.CREATE, {"Authorization": "Bearer s3cret-token"}, b"{",
                 "method_not_allowed", id="405-before-content-type"),
    pytest.param("POST", eg.CREATE, {"Authorization": "Bearer s3cret-token",
                                     "Content-Type": "text/plain"},
                 b"x" * (eg.MAX_BODY_BYTES + 1), "missing_json_content_type",
                 id="content-type-before-413"),
    pytest.param("POST", eg.CREATE, TOKEN_HEADERS, b"[" * (eg.MAX_BODY_BYTES + 1),
                 "payload_too_large", id="413-before-syntax"),
    pytest.param("POST", eg.CREATE, TOKEN_HEADERS, None, "length_required", id="411-no-body"),
    pytest.param("POST", eg.CREATE, TOKEN_HEADERS, b'{"a": 1, "a": 2} x',
                 "invalid_json_syntax", id="syntax-before-duplicate-key"),
    pytest.param("POST", eg.CREATE, TOKEN_HEADERS, b'[{"a": 1, "a": 2}]',
                 "invalid_json_data", id="top-level-array"),
]


@pytest.mark.parametrize("method, path, headers, body, code", ORDER_CASES)
def test_processing_order_of_transport_steps(gw_auth, method, path, headers, body, code):
    assert_error(call(gw_auth, method, path, body, headers), eg.ERRORS[code], code)


# Body-level competitions: changes applied to a valid body of the route.
BODY_ORDER_CASES = [
    # Line 1.2 refuses unknown fields (step 8); line 1.3 ignores them (V5).
    pytest.param(eg.CREATE, {"foo": 1, "event_id": "x"},
                 {"1.2": ("invalid_json_data", "`foo`"),
                  "1.3": ("event_id_forbidden_on_create", "event_id")},
                 None, id="unknown-before-forbidden"),
    pytest.param(eg.CREATE, {"zeta": 1, "beta": 2, "channel_id": DROP},
                 {"1.2": ("invalid_json_data", "`beta`"),
                  "1.3": ("channel_id_required", "channel_id")},
                 None, id="first-unknown-in-sorted-order"),
    pytest.param(eg.CREATE, {"foo": None, "password": DROP},
                 {"1.2": ("invalid_json_data", "`foo`"), "1.3": ("password_required", "password")},
                 None, id="unknown-even-if-null"),
    pytest.param(eg.CREATE, {"event_id": "x", "ended_at": 1, "channel_id": DROP},
                 "event_id_forbidden_on_create", "event_id", id="forbidden-before-channel"),
    pytest.param(eg.CREATE, {"event_id": "", "ended_at": 1}, "event_id_forbidden_on_create",
                 "event_id", id="forbidden-even-if-empty-string"),
    pytest.param(eg.CREATE, {"event_id": None, "ended_at": 1}, "event_id_forbidden_on_create",
                 "event_id", id="event-id-null-is-forbidden-on-create"),
    # ended_at: null counts as absent in line 1.2; line 1.3 refuses the key (V9).
    pytest.param(eg.CREATE, {"ended_at": None, "channel_id": DROP},
                 {"1.2": ("channel_id_required", "channel_id"),
                  "1.3": ("ended_at_forbidden_on_create", "not even as null")},
                 None, id="forbidden-null-is-absent-in-1.2"),
    pytest.param(eg.UPDATE, {"ended_at": None, "password": DROP},
                 {"1.2": ("password_required", "password"),
                  "1.3": ("event_temporal_fields_forbidden_on_update", "ended_at")},
                 None, id="update-ended-at-null-refused-in-1.3"),
    pytest.param(eg.CLOSE, {"started_at": None, "password": DROP}, "password_required",
                 "password", id="close-started-at-null-is-absent"),
    pytest.param(eg.CREATE, {"ended_at": 5, "channel_id": DROP}, "ended_at_forbidden_on_create",
                 "ended_at", id="ended-at-on-create-before-credentials"),
    pytest.param(eg.UPDATE, {"started_at": 1}, "event_temporal_fields_forbidden_on_update",
                 "started_at", id="update-started-at"),
    pytest.param(eg.UPDATE, {"ended_at": 1}, "event_temporal_fields_forbidden_on_update",
                 "ended_at", id="update-ended-at"),
    pytest.param(eg.CLOSE, {"started_at": 1, "password": DROP}, "started_at_forbidden_on_close",
                 "started_at", id="close-started-at-before-password"),
    pytest.param(eg.CREATE, {"channel_id": "bad", "password": DROP}, "invalid_channel_id",
                 "channel_id", id="channel-before-password"),
    pytest.param(eg.CREATE, {"channel_id": DROP}, "channel_id_required", "channel_id",
                 id="channel-absent"),
    pytest.param(eg.CREATE, {"channel_id": None}, "channel_id_required", "channel_id",
                 id="channel-null"),
    pytest.param(eg.CREATE, {"channel_id": "  "}, "channel_id_required", "channel_id",
                 id="channel-blank"),
    pytest.param(eg.CREATE, {"password": DROP, "title": DROP}, "password_required", "password",
                 id="password-before-required-fields"),
    pytest.param(eg.CREATE, {"password": " \t"}, "password_required", "password",
                 id="password-blank"),
    pytest.param(eg.CREATE, {"password": "wrong-password", "title": DROP}, "password_mismatch",
                 "password", id="lookup-before-required-fields"),
    pytest.param(eg.CREATE, {"channel_id": crockford(99), "title": DROP}, "channel_not_found",
                 "channel", id="unknown-channel-before-required-fields"),
    pytest.param(eg.UPDATE, {"event_id": DROP, "status": DROP}, "event_id_required",
                 "event_id, status", id="event-id-first-and-every-missing-field-named"),
    pytest.param(eg.CLOSE, {"event_id": DROP, "event_time": DROP}, "event_id_required",
                 "missing required fields: event_id, event_time",
                 id="event-id-and-event-time-in-one-answer"),
    pytest.param(eg.CREATE, {"title": DROP, "event_time": None},
                 "event_create_required_fields_missing", "title, event_time",
                 id="title-and-event-time-in-one-answer"),
    pytest.param(eg.CLOSE, {"event_id": "  "}, "event_id_required", "event_id",
                 id="close-event-id-blank"),
    pytest.param(eg.CREATE, {"title": DROP, "status": None, "message": " ", "severity": DROP,
                             "event_time": DROP}, "event_create_required_fields_missing",
                 "title, status, message, severity", id="create-lists-every-missing-field"),
    pytest.param(eg.UPDATE, {"message": DROP, "event_time": DROP},
                 "event_update_required_fields_missing", "message", id="update-missing-message"),
    pytest.param(eg.CLOSE, {"severity": "", "tags": 5}, "event_update_required_fields_missing",
                 "severity", id="close-missing-severity"),
    pytest.param(eg.CREATE, {"event_time": DROP, "title": 5}, "event_time_required",
                 "event_time", id="event-time-before-field-rules"),
    pytest.param(eg.CREATE, {"event_time": " "}, "event_time_required", "event_time",
                 id="event-time-blank-string"),
    pytest.param(eg.CREATE, {"op_id": "bad id", "title": 5}, "invalid_op_id", "op_id",
                 id="op-id-rule-before-title-rule"),
    pytest.param(eg.CREATE, {"metadata": [], "tags": "x"}, "invalid_tags", "tags",
                 id="tags-rule-before-metadata-rule"),
    pytest.param(eg.UPDATE, {"event_id": "no-such-event", "severity": "meh"},
                 "invalid_severity", "severity", id="field-rule-before-event-state"),
]


@pytest.mark.parametrize("route, changes, code, word", BODY_ORDER_CASES)
def test_processing_order_of_body_steps(gw_line, route, changes, code, word):
    if isinstance(code, dict):          # the lines differ here
        code, word = code[gw_line.line.name]
    body = body_for(gw_line, route, changes)
    assert_error(post(gw_line, route, body), eg.ERRORS[code], code, word)


AUTH_CASES = [
    pytest.param(None, 401, id="no-header"),
    pytest.param("Bearer s3cret-token", 200, id="exact"),
    pytest.param("bearer s3cret-token", 200, id="scheme-lower-case"),
    pytest.param("BEARER s3cret-token", 200, id="scheme-upper-case"),
    pytest.param("Bearer s3cret-tokeN", 401, id="wrong-token"),
    pytest.param("Bearer s3cret-toke", 401, id="prefix-of-token"),
    pytest.param("Bearer  s3cret-token", 401, id="two-spaces"),
    pytest.param("Bearer s3cret-token x", 401, id="two-tokens"),
    pytest.param("Basic s3cret-token", 401, id="other-scheme"),
    pytest.param("Bearer", 401, id="scheme-only"),
    pytest.param("s3cret-token", 401, id="token-only"),
    pytest.param("Bearer " + "a" * 4097, 401, id="token-4097-chars"),
    pytest.param("Bearer t\u00e9st", 401, id="non-ascii-token"),
]


@pytest.mark.parametrize("authorization, status", AUTH_CASES)
def test_gateway_token(gw_auth, authorization, status):
    headers = dict(JSON_HEADERS)
    if authorization is not None:
        headers["Authorization"] = authorization
    result = post(gw_auth, eg.CREATE, valid_body(eg.CREATE), headers)
    if status == 200:
        assert result[0] == 200
    else:
        assert_error(result, 401, "authentication_failed")
        assert result[1]["www-authenticate"] == "Bearer"
        assert "s3cret" not in result[2]["error"]


@LOCAL_ONLY
def test_token_of_4096_chars_is_accepted():
    gateway = eg.EventGateway(token="t" * 4096)
    headers = dict(JSON_HEADERS, Authorization="Bearer " + "t" * 4096)
    assert post(gateway, eg.CREATE, valid_body(eg.CREATE), headers)[0] == 200


def test_healthz_ignores_the_token(gw_auth):
    assert call(gw_auth, "GET", "/healthz", headers={"Authorization": "Bearer wrong"})[0] == 200
    assert call(gw_auth, "GET", "/healthz", headers={})[0] == 200


def test_admin_routes_are_behind_the_token(gw_auth):
    assert_error(call(gw_auth, "GET", "/__admin/events", headers={}), 401, "authentication_failed")
    assert call(gw_auth, "GET", "/__admin/events", headers=TOKEN_HEADERS)[0] == 200


@pytest.mark.parametrize("content_type, status", [
    pytest.param("application/json", 200, id="exact"),
    pytest.param("Application/JSON", 200, id="any-case"),
    pytest.param("application/json; charset=utf-8", 200, id="with-charset"),
    pytest.param(" application/json ;charset=UTF-8", 200, id="spaces"),
    pytest.param(None, 400, id="absent"),
    pytest.param("text/plain", 400, id="text-plain"),
    pytest.param("application/json-patch+json", 400, id="other-json-type"),
    pytest.param("application/x-www-form-urlencoded", 400, id="form"),
])
def test_content_type(gw, content_type, status):
    headers = {} if content_type is None else {"Content-Type": content_type}
    result = post(gw, eg.CREATE, valid_body(eg.CREATE), headers)
    if status == 200:
        assert result[0] == 200
    else:
        assert_error(result, 400, "missing_json_content_type", "Content-Type")


def test_get_ignores_content_type(gw):
    assert call(gw, "GET", "/__admin/events", headers={"Content-Type": "text/plain"})[0] == 200


def test_body_size_limit_boundary(gw):
    body = json.dumps(valid_body(eg.CREATE, description="d")).encode()
    padding = eg.MAX_BODY_BYTES - len(body)
    fits = body[:-1] + b" " * padding + b"}"
    assert len(fits) == eg.MAX_BODY_BYTES
    assert post(gw, eg.CREATE, fits)[0] == 200
    assert_error(post(gw, eg.CREATE, fits + b" "), 413, "payload_too_large", "32768")


def test_oversized_declared_length_refused_from_the_head(gw):
    headers = dict(JSON_HEADERS, **{"Content-Length": str(eg.MAX_BODY_BYTES + 1)})
    status, _, payload = gw.check_head("POST", eg.CREATE, headers)
    assert (status, json.loads(payload)["error_code"]) == (413, "payload_too_large")
    headers["Content-Length"] = str(eg.MAX_BODY_BYTES)
    assert gw.check_head("POST", eg.CREATE, headers) is None


def test_missing_length_refused_from_the_head(gw):
    status, _, payload = gw.check_head("POST", eg.CREATE, JSON_HEADERS)
    assert (status, json.loads(payload)["error_code"]) == (411, "length_required")
    chunked = dict(JSON_HEADERS, **{"Transfer-Encoding": "chunked"})
    assert gw.check_head("POST", eg.CREATE, chunked) is None


@LOCAL_ONLY
def test_the_head_and_the_body_agree_on_a_post_that_takes_no_body(gw):
    # The reset takes no body: from the head (Expect: 100-continue) as with the body, a
    # missing length is no refusal (3.1.0 answered 411 from the head only).
    headers = {"Host": "127.0.0.1", "Expect": "100-continue"}
    assert gw.check_head("POST", "/__admin/reset", headers) is None
    assert gw.handle("POST", "/__admin/reset", headers, None)[0] == 200
    # A body over the limit is refused from the head there too, as on every route.
    big = dict(headers, **{"Content-Length": str(eg.MAX_BODY_BYTES + 1)})
    status, _, payload = gw.check_head("POST", "/__admin/reset", big)
    assert (status, json.loads(payload)["error_code"]) == (413, "payload_too_large")


def nested(depth):
    """A valid create body whose deepest value is `depth` levels deep (attrs is level 2)."""
    inner = "[" * (depth - 2) + "1" + "]" * (depth - 2)
    body = json.dumps(valid_body(eg.CREATE))[:-1] + ', "attrs": {"k": %s}}' % inner
    return body.encode()


STRICT_JSON_CASES = [
    pytest.param(b"", "invalid_json_syntax", id="empty-body"),
    pytest.param(b"   ", "invalid_json_syntax", id="whitespace-body"),
    pytest.param(b'{"event_time": NaN}', "invalid_json_syntax", id="nan"),
    pytest.param(b'{"event_time": Infinity}', "invalid_json_syntax", id="infinity"),
    pytest.param(b'{"event_time": -Infinity}', "invalid_json_syntax", id="minus-infinity"),
    pytest.param(b'{} {}', "invalid_json_syntax", id="trailing-document"),
    pytest.param(b'{}x', "invalid_json_syntax", id="trailing-garbage"),
    pytest.param(b'{"title": "\xff"}', "invalid_json_syntax", id="invalid-utf8"),
    pytest.param(b'{"title": "\xed\xa0\x80"}', "invalid_json_syntax", id="utf8-encoded-surrogate"),
    pytest.param(b'\xef\xbb\xbf{}', "invalid_json_syntax", id="bom"),
    pytest.param(b'{"title": "\\ud800"}', "invalid_json_syntax", id="lone-surrogate-escape"),
    pytest.param(b'{"a": 1' + b"0" * 5000 + b'}', "invalid_json_syntax", id="5000-digit-int"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "invalid_json_syntax", id="5000-levels"),
    pytest.param(b'{"a": ' + b"[" * 3000, "invalid_json_syntax", id="3000-levels-truncated"),
    pytest.param(b'{"a"', "invalid_json_syntax", id="truncated"),
    pytest.param(b"{'a': 1}", "invalid_json_syntax", id="single-quotes"),
    pytest.param(b'"text"', "invalid_json_data", id="top-level-string"),
    pytest.param(b"null", "invalid_json_data", id="top-level-null"),
    pytest.param(b'{"a": {"b": 1, "b": 2}}', "invalid_json_data", id="duplicate-key-nested"),
    pytest.param(b'{"title": "x", "title": "x"}', "invalid_json_data", id="duplicate-key-same-value"),
    pytest.param(nested(33), "invalid_json_syntax", id="33-levels"),
]


@pytest.mark.parametrize("body, code", STRICT_JSON_CASES)
def test_strict_json(gw, body, code):
    assert_error(post(gw, eg.CREATE, body), 400, code)


@pytest.mark.parametrize("digits, code", [
    # It parses; then the next step refuses: line 1.2 the unknown field, 1.3 the missing channel.
    pytest.param(4300, {"1.2": "invalid_json_data", "1.3": "channel_id_required"},
                 id="4300-digits-parse"),
    pytest.param(4301, {"1.2": "invalid_json_syntax", "1.3": "invalid_json_syntax"},
                 id="4301-digits-do-not"),
])
def test_integer_length_limit(gw_line, digits, code):
    assert_error(post(gw_line, eg.CREATE, b'{"a": ' + b"7" * digits + b"}"), 400,
                 code[gw_line.line.name])


def test_32_levels_of_nesting_parse(gw):
    # The 32-level body gets past JSON parsing to the attrs rule (arrays are not allowed there).
    assert_error(post(gw, eg.CREATE, nested(32)), 400, "extension_object_arrays_unsupported")


def test_brackets_inside_strings_do_not_count_as_nesting(gw):
    status, _, _ = post(gw, eg.CREATE, valid_body(eg.CREATE, title="[{" * 40))
    assert status == 200


def test_paired_surrogate_escape_is_one_character(gw):
    body = json.dumps(valid_body(eg.CREATE, title="\U0001F600")).encode()   # "\ud83d\ude00"
    assert b"\\ud83d\\ude00" in body
    status, _, envelope = post(gw, eg.CREATE, body)
    assert status == 200
    assert gw.event(envelope["data"]["event_id"])["title"] == "\U0001F600"


@LOCAL_ONLY
@pytest.mark.parametrize("digits", [19, 4300, 4301, 10000])
def test_any_content_length_is_refused_without_an_exception(gw, digits):
    headers = dict(JSON_HEADERS, **{"Content-Length": "9" * digits})
    answer = gw.check_head("POST", eg.CREATE, headers)
    assert answer[0] == 413
    assert eg._framing(None, "9" * digits) == (10 ** 18, False)
    assert gw.internal_errors == []


# -- Messages that help the person fixing a client -----------------------------------

@pytest.mark.parametrize("headers, words", [
    pytest.param({}, ["sent none", "application/json"], id="missing"),
    pytest.param({"Content-Type": "text/plain"}, ["`text/plain`", "application/json"],
                 id="wrong"),
])
def test_content_type_message_names_what_arrived(gw, headers, words):
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE), headers=dict(headers, **AUTH_HEADERS)),
                 400, "missing_json_content_type", *words)


def test_json_syntax_error_gives_line_and_column(gw):
    assert_error(post(gw, eg.CREATE, b'{\n  "title": "x",,\n}'), 400, "invalid_json_syntax",
                 "line 2, column")


@LOCAL_ONLY
def test_unknown_fields_are_all_listed_with_hints():
    body = valid_body(eg.CREATE, eventTime=1, zzz=2, Severity="high")
    assert_error(post(make_gateway("1.2"), eg.CREATE, body), 400, "invalid_json_data",
                 "unknown fields `Severity` (did you mean `severity`?), `eventTime` (did you mean "
                 "`event_time`?), `zzz`")


# 3. Response envelope #############################################################

def test_success_has_the_lines_data_and_no_null_key(gw_line):
    # The seed page shows "error": null, "error_code": null and "thing_id": null;
    # production leaves every null key out (the Android app reads null as "null").
    result = post(gw_line, eg.CREATE, valid_body(eg.CREATE, started_at=T0, tags=["db", "replica"]))
    assert_accepted(gw_line, result)
    assert_no_null_keys(result[2])
    assert_accepted(gw_line, post(gw_line, eg.CREATE, valid_body(eg.CREATE, thing_id="db-1")),
                    thing_id="db-1")


@LOCAL_ONLY
@pytest.mark.parametrize("line", list(eg.LINES))
@pytest.mark.parametrize("thing_id", [None, "Az09_:-thing"], ids=["no-thing", "thing"])
def test_dispatch_answer_is_exactly_json_dumps(line, thing_id):
    # The answer to a dispatch is formatted from a template; it must be json.dumps' bytes.
    values = {"channel_id": CHANNEL, "op_id": "op:1_A-z", "event_id": "e" * 32,
              "thing_id": thing_id, "accepted": True}
    data = {key: values[key] for key in SUCCESS_KEYS[line] if values[key] is not None}
    templates, picks = eg._success_templates(eg.LINES[line]), eg._success_template_ids(eg.LINES[line])
    which = 1 if thing_id is None else 0
    ids = (CHANNEL, "op:1_A-z", "e" * 32, thing_id)
    answer = templates[which] % picks[which](ids)
    assert answer.encode() == json.dumps({"success": True, "data": data}).encode()


@pytest.mark.parametrize("accept_language, locale_1_2, locale_1_3", [
    pytest.param(None, "en", "en", id="none"),
    pytest.param("zh-CN", "zh-CN", "zh-CN", id="zh-CN"),
    pytest.param("ZH-cn", "zh-CN", "zh-CN", id="any-case"),
    pytest.param("zh", "zh-CN", "zh-CN", id="zh"),
    pytest.param("zh-Hans-SG", "zh-CN", "zh-CN", id="zh-Hans"),
    pytest.param("zh_sg", "zh-CN", "zh-CN", id="zh_sg"),
    pytest.param("zh_CN", "en", "en", id="zh_CN-underscore-is-not-known"),
    pytest.param("zh_CN, zh-SG", "zh-CN", "zh-CN", id="zh_CN-falls-through"),
    pytest.param("fr, zh-CN;q=0.1", "zh-CN", "zh-CN", id="weights-ignored"),
    pytest.param("zh-Hant-TW", "en", "zh-TW", id="zh-Hant-TW"),
    pytest.param("zh-TW, zh-CN", "zh-CN", "zh-TW", id="zh-TW-then-zh-CN"),
    pytest.param("zh-hk", "en", "zh-TW", id="zh-hk"),
    pytest.param("zh_mo", "en", "zh-TW", id="zh_mo"),
    pytest.param("en-GB, zh-CN", "en", "en", id="en-first"),
    pytest.param("english", "en", "en", id="not-a-tag"),
    pytest.param("de;q=0.9, *", "en", "en", id="nothing-known"),
])
def test_locale_of_an_error(gw_line, accept_language, locale_1_2, locale_1_3):
    headers = dict(JSON_HEADERS)
    if accept_language is not None:
        headers["Accept-Language"] = accept_language
    status, answer_headers, envelope = post(gw_line, eg.CREATE,
                                            valid_body(eg.CREATE, password="wrong-pass-1"),
                                            headers=headers)
    locale = {"1.2": locale_1_2, "1.3": locale_1_3}[gw_line.line.name]
    problem = envelope["problem"]
    assert (status, problem["locale"], answer_headers["content-language"]) == (403, locale, locale)
    assert problem["localized_message"] == {"en": "The channel password is wrong.",
                                            "zh-CN": "频道密码错误。",
                                            "zh-TW": "頻道密碼錯誤。"}[locale]
    assert problem["title"] == {"en": "Conflict", "zh-CN": "冲突", "zh-TW": "衝突"}[locale]
    assert envelope["error"] == problem["detail"] and envelope["error"].isascii()


@LOCAL_ONLY
def test_every_code_has_its_category_row():
    assert set(CATEGORY_OF) == set(eg.ERRORS)
    rows = [code for _, _, codes in eg.PROBLEM_CATEGORIES for code in codes]
    assert sorted(rows) == sorted(eg.ERRORS)                # each code in exactly one row
    assert dict(eg._PROBLEM_OF) == CATEGORY_AT
    for code, status in CATEGORY_AT:
        for locale in ("en", "zh-CN", "zh-TW"):
            body = json.loads(eg._error_body(code, "a sentence", status, locale, "r" * 32))
            assert body["problem"]["localized_message"] and body["problem"]["title"]
            assert (body["problem"]["category"], body["problem"]["retryable"]) == CATEGORY_AT[
                code, status]


@LOCAL_ONLY
def test_every_category_row_is_answered():
    answered = set()
    gw = make_gateway(max_events=1)
    gw_token = eg.EventGateway(token="s3cret-token")
    create(gw)
    foreign = dict(JSON_HEADERS, Host="evil.example")
    requests = [
        (gw, eg.CREATE, valid_body(eg.CREATE, status=""), None),              # validation
        (gw_token, eg.CREATE, valid_body(eg.CREATE), None),                   # auth
        (gw, "/__admin/channels", {}, foreign),                               # permission
        (gw, eg.CREATE, valid_body(eg.CREATE, password="wrong-pass-1"), None),  # conflict
        (gw, eg.UPDATE, valid_body(eg.UPDATE, event_id="nope"), None),        # not_found
        (gw, eg.CREATE, valid_body(eg.CREATE), None),                         # store_full
    ]
    for status in (429, 503, 500):
        gw_status = make_gateway()
        gw_status.add_fault(eg.CREATE, status)
        requests.append((gw_status, eg.CREATE, valid_body(eg.CREATE), None))
    for gateway, path, body, headers in requests:
        problem = post(gateway, path, body, headers=headers)[2]["problem"]
        answered.add((problem["category"], problem["retryable"]))
    assert answered == {(category, retryable) for category, retryable, _ in CATEGORY_ROWS}


def test_unknown_path_is_always_in_english_without_a_request_id(gw):
    headers = dict(JSON_HEADERS, **{"Accept-Language": "zh-CN"})
    status, answer_headers, envelope = post(gw, "/nope", {}, headers=headers)
    assert (status, envelope["problem"]["locale"], answer_headers["content-language"]) == (
        404, "en", "en")
    assert "request_id" not in envelope["problem"] and HEX32.fullmatch(
        answer_headers["x-request-id"])


def test_405_has_no_body_and_says_allow(gw):
    for method in ("GET", "HEAD", "PUT"):
        status, headers, payload = gw.handle(method, eg.CREATE, JSON_HEADERS, None)
        names = {name.lower(): value for name, value in headers}
        assert (status, payload, names["allow"]) == (405, b"", "POST")
        assert "content-type" not in names


@LOCAL_ONLY
def test_405_is_journaled_with_its_code():
    gw = make_gateway()
    gw.handle("PUT", eg.CREATE, JSON_HEADERS, b"{}")
    entry = gw.requests()[-1]
    assert (entry["status"], entry["error_code"], entry["response"]) == (
        405, "method_not_allowed", None)
    gw.handle("HEAD", "/send_status/op-none", {}, None)   # a HEAD answer sends no body
    assert (gw.requests()[-1]["status"], gw.requests()[-1]["response"]) == (404, None)


@LOCAL_ONLY
def test_admin_errors_are_localized_too():
    gw = make_gateway()
    status, headers, envelope = call(gw, "GET", "/__admin/requests?x=1",
                                     headers={"Accept-Language": "zh-TW"})
    assert (status, envelope["problem"]["locale"], headers["content-language"]) == (
        400, "zh-TW", "zh-TW")


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_ok(gw, path):
    status, _, envelope = call(gw, "GET", path)
    assert (status, envelope) == (200, {"success": True, "data": {"status": "ok"}})


@LOCAL_ONLY
def test_admin_info_names_the_line_the_version_and_every_bound():
    for line, rate_limit in (("1.2", False), ("1.3", True)):
        gw = eg.EventGateway(gateway_version=line, rate_limit=rate_limit, max_events=7)
        status, _, envelope = call(gw, "GET", "/__admin/info")
        assert status == 200 and envelope["data"] == {
            "gateway_version": line, "module_version": eg.__version__, "auth": False,
            "rate_limit": rate_limit,
            "limits": {"max_events": 7, "max_history": 1000, "max_requests": 1000,
                       "max_store_mb": 256, "max_channels": 10000, "max_faults": 1000,
                       "max_body_bytes": 32768, "idle_timeout_s": 5.0,
                       "rate_limit_per_ip": 60, "rate_limit_total": 1200},
            "store_bytes": 0}
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", eg.__version__)


def test_request_ids_differ(gw):
    ids = {call(gw, "GET", "/healthz")[1]["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


@LOCAL_ONLY
def test_unexpected_exception_is_500_and_the_next_request_works(gw, monkeypatch):
    def broken(value):
        raise KeyError("bug")

    monkeypatch.setattr(eg, "FIELD_RULES", (("title", broken),) + eg.FIELD_RULES[1:])
    result = post(gw, eg.CREATE, valid_body(eg.CREATE))
    assert_error(result, 500, "internal_error")
    assert "KeyError" not in result[2]["error"]
    assert len(gw.internal_errors) == 1 and "KeyError" in gw.internal_errors[0]
    monkeypatch.undo()
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 200
    assert len(gw.events()) == 1
    assert len(gw.internal_errors) == 1
    del gw.internal_errors[:]           # the one this test caused on purpose


def test_messages_never_echo_the_password(gw):
    secret = "hunter2-secret-password"
    for changes in ({"password": secret}, {"password": secret * 10}, {"password": [secret]}):
        status, _, envelope = post(gw, eg.CREATE, valid_body(eg.CREATE, **changes))
        assert status in (400, 403) and "hunter2" not in json.dumps(envelope)


# 4. Field rules ###################################################################

LONG_OP = "o" * 128
FIELD_CASES = [
    # channel_id: 26 Crockford symbols, lenient input, last symbol's low two bits zero.
    pytest.param(eg.CREATE, {"channel_id": CHANNEL.lower()}, None, id="channel-lower-case"),
    pytest.param(eg.CREATE, {"channel_id": SPACED_CHANNEL}, None, id="channel-dashes-and-spaces"),
    pytest.param(eg.CREATE, {"channel_id": ALIASED_CHANNEL}, None, id="channel-o-i-l-aliases"),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL[:25]}, "invalid_channel_id",
                 id="channel-25-symbols"),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL + "0"}, "invalid_channel_id",
                 id="channel-27-symbols"),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL[:-1] + "S"}, "invalid_channel_id",
                 id="channel-last-symbol-low-bits-set"),
    pytest.param(eg.CREATE, {"channel_id": "U" + CHANNEL[1:]}, "invalid_channel_id",
                 id="channel-letter-u"),
    pytest.param(eg.CREATE, {"channel_id": "\u017f" + CHANNEL[1:]}, "invalid_channel_id",
                 id="channel-non-ascii-upper-cases-to-ascii"),
    pytest.param(eg.CREATE, {"channel_id": 123}, "invalid_channel_id", id="channel-number"),
    # password: 8-128 characters after trimming.
    pytest.param(eg.CREATE, {"channel_id": CHANNEL_8, "password": "p" * 8}, None,
                 id="password-8-chars", marks=LOCAL_ONLY),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL_8, "password": "p" * 7}, "invalid_password",
                 id="password-7-chars", marks=LOCAL_ONLY),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL_8, "password": " " + "p" * 7 + " "},
                 "invalid_password", id="password-7-chars-after-trim", marks=LOCAL_ONLY),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL_128, "password": "p" * 128}, None,
                 id="password-128-chars", marks=LOCAL_ONLY),
    pytest.param(eg.CREATE, {"channel_id": CHANNEL_128, "password": "p" * 129},
                 "invalid_password", id="password-129-chars", marks=LOCAL_ONLY),
    pytest.param(eg.CREATE, {"password": " %s\n" % PASSWORD}, None, id="password-trimmed"),
    pytest.param(eg.CREATE, {"password": 12345678}, "invalid_password", id="password-number"),
    # op_id: 1-128 of A-Z a-z 0-9 _ : -; empty is absent.
    pytest.param(eg.CREATE, {"op_id": LONG_OP}, None, id="op-id-128-chars"),
    pytest.param(eg.CREATE, {"op_id": LONG_OP + "o"}, "invalid_op_id", id="op-id-129-chars"),
    pytest.param(eg.CREATE, {"op_id": "a"}, None, id="op-id-1-char"),
    pytest.param(eg.CREATE, {"op_id": "Az09_:-"}, None, id="op-id-every-symbol-class"),
    pytest.param(eg.CREATE, {"op_id": "op.1"}, "invalid_op_id", id="op-id-dot"),
    pytest.param(eg.CREATE, {"op_id": "op 1"}, "invalid_op_id", id="op-id-inner-space"),
    pytest.param(eg.CREATE, {"op_id": "op\u0661"}, "invalid_op_id", id="op-id-arabic-digit"),
    pytest.param(eg.CREATE, {"op_id": 7}, "invalid_op_id", id="op-id-number"),
    # thing_id: 1-64 of the same alphabet; empty is absent.
    pytest.param(eg.CREATE, {"thing_id": "t" * 64}, None, id="thing-id-64-chars"),
    pytest.param(eg.CREATE, {"thing_id": "t" * 65}, "invalid_thing_id", id="thing-id-65-chars"),
    pytest.param(eg.CREATE, {"thing_id": "host/1"}, "invalid_thing_id", id="thing-id-slash"),
    pytest.param(eg.CREATE, {"thing_id": True}, "invalid_thing_id", id="thing-id-bool"),
    # event_id: 1-64 of the same alphabet (64 passes the rule and is then not found).
    pytest.param(eg.UPDATE, {"event_id": "e" * 64}, "event_not_found", id="event-id-64-chars"),
    pytest.param(eg.UPDATE, {"event_id": "e" * 65}, "invalid_event_id", id="event-id-65-chars"),
    pytest.param(eg.CLOSE, {"event_id": "e#1"}, "invalid_event_id", id="event-id-hash"),
    pytest.param(eg.CLOSE, {"event_id": 42}, "invalid_event_id", id="event-id-number"),
    # title: required on create; non-empty, at most 256 characters.
    pytest.param(eg.CREATE, {"title": "\u00e9" * 256}, None, id="title-256-chars"),
    pytest.param(eg.CREATE, {"title": "\u00e9" * 257}, "invalid_title", id="title-257-chars"),
    pytest.param(eg.CREATE, {"title": "\U0001F600" * 256}, None, id="title-256-emoji"),
    pytest.param(eg.CREATE, {"title": "\U0001F600" * 257}, "invalid_title", id="title-257-emoji"),
    pytest.param(eg.CREATE, {"title": ["x"]}, "invalid_title", id="title-array"),
    pytest.param(eg.UPDATE, {"title": "t" * 256}, None, id="update-title-256-chars"),
    pytest.param(eg.UPDATE, {"title": " "}, "invalid_title", id="update-title-blank"),
    # description: optional; empty is absent; at most 4096 characters.
    pytest.param(eg.CREATE, {"description": "d" * 4096}, None, id="description-4096-chars"),
    pytest.param(eg.CREATE, {"description": "d" * 4097}, "invalid_description",
                 id="description-4097-chars"),
    pytest.param(eg.CREATE, {"description": 1}, "invalid_description", id="description-number"),
    # status: non-empty, at most 24; message: at most 512.
    pytest.param(eg.CREATE, {"status": "s" * 24}, None, id="status-24-chars"),
    pytest.param(eg.CREATE, {"status": "s" * 25}, "invalid_status", id="status-25-chars"),
    pytest.param(eg.CLOSE, {"status": " " + "s" * 24 + " "}, None, id="status-24-after-trim"),
    pytest.param(eg.UPDATE, {"status": 200}, "invalid_status", id="status-number"),
    pytest.param(eg.CREATE, {"message": "m" * 512}, None, id="message-512-chars"),
    pytest.param(eg.CREATE, {"message": "m" * 513}, "invalid_message", id="message-513-chars"),
    pytest.param(eg.UPDATE, {"message": {"a": 1}}, "invalid_message", id="message-object"),
    # severity: one of four, any case.
    pytest.param(eg.CREATE, {"severity": "CRITICAL"}, None, id="severity-upper-case"),
    pytest.param(eg.CREATE, {"severity": " Low "}, None, id="severity-trimmed"),
    pytest.param(eg.CREATE, {"severity": "urgent"}, "invalid_severity", id="severity-unknown"),
    pytest.param(eg.CREATE, {"severity": 1}, "invalid_severity", id="severity-number"),
    # event_time: a whole number; below 10^12 seconds, below 10^14 milliseconds; never a bool.
    pytest.param(eg.CREATE, {"event_time": 0}, None, id="event-time-zero"),
    pytest.param(eg.CREATE, {"event_time": -1}, "invalid_event_time", id="event-time-minus-1"),
    pytest.param(eg.CREATE, {"event_time": -0.001}, "invalid_event_time",
                 id="event-time-just-negative"),
    pytest.param(eg.CREATE, {"event_time": 10 ** 12 - 1}, None, id="event-time-last-second"),
    pytest.param(eg.CREATE, {"event_time": 10 ** 12}, None, id="event-time-first-millisecond"),
    pytest.param(eg.CREATE, {"event_time": 10 ** 14 - 1}, None, id="event-time-last-millisecond"),
    pytest.param(eg.CREATE, {"event_time": 10 ** 14}, "invalid_event_time",
                 id="event-time-10-to-the-14"),
    pytest.param(eg.CREATE, {"event_time": 1713750000.0}, "invalid_event_time",
                 id="event-time-float-with-zero-fraction"),
    pytest.param(eg.CREATE, {"event_time": 1713750000.25}, "invalid_event_time",
                 id="event-time-float"),
    pytest.param(eg.CREATE, {"event_time": True}, "invalid_event_time", id="event-time-true"),
    pytest.param(eg.CREATE, {"event_time": "1713750000"}, "invalid_event_time",
                 id="event-time-string"),
    pytest.param(eg.UPDATE, {"event_time": 10 ** 30}, "invalid_event_time",
                 id="event-time-10-to-the-30"),
    pytest.param(eg.CLOSE, {"event_time": [1]}, "invalid_event_time", id="event-time-array"),
    # started_at: create only, same rule; ended_at: close only, same rule.
    pytest.param(eg.CREATE, {"started_at": 10 ** 12 - 1}, None, id="started-at-last-second"),
    pytest.param(eg.CREATE, {"started_at": 10 ** 14 - 1}, None,
                 id="started-at-last-millisecond"),
    pytest.param(eg.CREATE, {"started_at": 10 ** 14}, "invalid_started_at",
                 id="started-at-10-to-the-14"),
    pytest.param(eg.CREATE, {"started_at": 0}, None, id="started-at-zero"),
    pytest.param(eg.CREATE, {"started_at": -1}, "invalid_started_at", id="started-at-minus-1"),
    pytest.param(eg.CREATE, {"started_at": False}, "invalid_started_at", id="started-at-false"),
    pytest.param(eg.CLOSE, {"ended_at": 10 ** 14 - 1}, None, id="ended-at-last-millisecond"),
    pytest.param(eg.CLOSE, {"ended_at": 10 ** 14}, "invalid_ended_at", id="ended-at-10-to-the-14"),
    pytest.param(eg.CLOSE, {"ended_at": "soon"}, "invalid_ended_at", id="ended-at-string"),
    pytest.param(eg.CLOSE, {"ended_at": -1}, "invalid_ended_at", id="ended-at-minus-1"),
    pytest.param(eg.CLOSE, {"ended_at": 1.5e12}, "invalid_ended_at", id="ended-at-exponent"),
    # tags: at most 32 items (before de-duplication), each 1-64 characters after trim.
    pytest.param(eg.CREATE, {"tags": ["t%d" % i for i in range(32)]}, None, id="tags-32-items"),
    pytest.param(eg.CREATE, {"tags": ["t%d" % i for i in range(33)]}, "invalid_tags",
                 id="tags-33-items"),
    pytest.param(eg.CREATE, {"tags": ["same"] * 33}, "invalid_tags",
                 id="tags-33-items-counted-before-dedup"),
    pytest.param(eg.CREATE, {"tags": ["t" * 64]}, None, id="tags-item-64-chars"),
    pytest.param(eg.CREATE, {"tags": ["t" * 65]}, "invalid_tags", id="tags-item-65-chars"),
    pytest.param(eg.CREATE, {"tags": [" " + "t" * 64 + " "]}, None, id="tags-item-64-after-trim"),
    pytest.param(eg.CREATE, {"tags": [" "]}, "invalid_tags", id="tags-item-blank"),
    pytest.param(eg.CREATE, {"tags": [1]}, "invalid_tags", id="tags-item-number"),
    pytest.param(eg.CREATE, {"tags": "db"}, "invalid_tags", id="tags-string"),
    pytest.param(eg.CREATE, {"tags": []}, None, id="tags-empty"),
    # images: at most 32 items, each 1-2048 characters after trim.
    pytest.param(eg.CREATE, {"images": ["i%d" % i for i in range(32)]}, None, id="images-32-items"),
    pytest.param(eg.CREATE, {"images": ["i%d" % i for i in range(33)]}, "invalid_images",
                 id="images-33-items"),
    pytest.param(eg.CREATE, {"images": ["i" * 2048]}, None, id="images-item-2048-chars"),
    pytest.param(eg.CREATE, {"images": ["i" * 2049]}, "invalid_images",
                 id="images-item-2049-chars"),
    pytest.param(eg.CREATE, {"images": [""]}, "invalid_images", id="images-item-empty"),
    pytest.param(eg.CREATE, {"images": {"a": "b"}}, "invalid_images", id="images-object"),
    # attrs: object patch of scalars, null, or one-level objects.
    pytest.param(eg.CREATE, {"attrs": {"s": "x", "n": 1.5, "b": True, "z": None,
                                       "o": {"a": 1, "b": None}}}, None, id="attrs-every-kind"),
    pytest.param(eg.CREATE, {"attrs": {}}, None, id="attrs-empty"),
    pytest.param(eg.CREATE, {"attrs": ["a"]}, "invalid_attrs", id="attrs-array"),
    pytest.param(eg.CREATE, {"attrs": "a"}, "invalid_attrs", id="attrs-string"),
    pytest.param(eg.CREATE, {"attrs": {"a": [1]}}, "extension_object_arrays_unsupported",
                 id="attrs-array-value"),
    pytest.param(eg.CREATE, {"attrs": {"a": {"b": []}}},
                 "extension_object_nested_object_unsupported", id="attrs-array-inside-value"),
    pytest.param(eg.CREATE, {"attrs": {"a": {"b": {}}}},
                 "extension_object_nested_object_unsupported", id="attrs-two-levels"),
    pytest.param(eg.CREATE, {"attrs": {"a": {"b": {"c": [1]}}}},
                 "extension_object_nested_object_unsupported", id="attrs-spec-example"),
    pytest.param(eg.CREATE, {"attrs": {" ": 1}}, "extension_object_key_required",
                 id="attrs-blank-key"),
    pytest.param(eg.CREATE, {"attrs": {"a": {"": 1}}}, None,
                 id="attrs-inner-keys-not-checked"),
    pytest.param(eg.CREATE, {"attrs": {"a": {"b": [1]}, "c": []}},
                 "extension_object_nested_object_unsupported", id="attrs-one-pass-first-wins"),
    pytest.param(eg.CREATE, {"attrs": None}, "invalid_attrs", id="attrs-null"),
    pytest.param(eg.UPDATE, {"attrs": None}, "invalid_attrs", id="attrs-null-on-update"),
    pytest.param(eg.CREATE, {"attrs": {"a": {"": 1}, "b": [1]}},
                 "extension_object_arrays_unsupported", id="attrs-outer-level-before-inner"),
    pytest.param(eg.CREATE, {"attrs": {"a": [1], "": 1}}, "extension_object_arrays_unsupported",
                 id="attrs-document-order"),
    pytest.param(eg.CREATE, {"attrs": {"": [1], "a": 1}}, "extension_object_key_required",
                 id="attrs-key-before-its-value"),
    # metadata: object of scalars; keys 1-64 unique after trim; value text 1-512.
    pytest.param(eg.CREATE, {"metadata": {"k" * 64: "v" * 512, "n": 1, "b": False}}, None,
                 id="metadata-at-limits"),
    pytest.param(eg.CREATE, {"metadata": {" " + "k" * 64 + " ": "v"}}, None,
                 id="metadata-key-64-after-trim"),
    pytest.param(eg.CREATE, {"metadata": {"k" * 65: "v"}}, "metadata_key_too_long",
                 id="metadata-key-65-chars"),
    pytest.param(eg.CREATE, {"metadata": {"k": "v" * 513}}, "metadata_value_too_long",
                 id="metadata-value-513-chars"),
    pytest.param(eg.CREATE, {"metadata": {"k": " " + "v" * 512 + " "}}, None,
                 id="metadata-value-512-after-trim"),
    pytest.param(eg.CREATE, {"metadata": {"k": 10 ** 512}}, "metadata_value_too_long",
                 id="metadata-number-513-digits"),
    pytest.param(eg.CREATE, {"metadata": {"k": 10 ** 511}}, None,
                 id="metadata-number-512-digits"),
    pytest.param(eg.CREATE, {"metadata": {"k": None}}, "metadata_value_scalar_required",
                 id="metadata-null-value"),
    pytest.param(eg.CREATE, {"metadata": {"k": [1]}}, "metadata_value_scalar_required",
                 id="metadata-array-value"),
    pytest.param(eg.CREATE, {"metadata": {"k": {}}}, "metadata_value_scalar_required",
                 id="metadata-object-value"),
    pytest.param(eg.CREATE, {"metadata": {" ": "v"}}, "metadata_key_required",
                 id="metadata-blank-key"),
    pytest.param(eg.CREATE, {"metadata": {"k": "v", " k ": "w"}}, "metadata_key_duplicate",
                 id="metadata-duplicate-after-trim"),
    pytest.param(eg.CREATE, {"metadata": {"k": "  "}}, "metadata_value_required",
                 id="metadata-blank-value"),
    pytest.param(eg.CREATE, {"metadata": ["k"]}, "invalid_metadata", id="metadata-array"),
    pytest.param(eg.CREATE, {"metadata": {}}, None, id="metadata-empty"),
]


@pytest.mark.parametrize("route, changes, code", FIELD_CASES)
def test_field_rule(gw, route, changes, code):
    body = body_for(gw, route, changes)
    result = post(gw, route, body)
    status, _, envelope = result
    if code is None:
        op_id, thing = (body.get(name) for name in ("op_id", "thing_id"))
        assert_accepted(gw, result, thing_id=thing.strip() or None if thing else None,
                        op_id=op_id.strip() or None if op_id else None)
    else:
        assert (status, envelope["error_code"]) == (eg.ERRORS[code], code), envelope


# What a passing value is stored as: (changes, field of the stored event, expected).
NORMALISE_CASES = [
    pytest.param({"title": "  Database lag \n"}, "title", "Database lag", id="title-trimmed"),
    pytest.param({"description": ""}, "description", None, id="description-empty-is-absent"),
    pytest.param({"description": "   "}, "description", None, id="description-blank-is-absent"),
    pytest.param({"description": " why "}, "description", "why", id="description-trimmed"),
    pytest.param({"severity": " HiGh "}, "severity", "high", id="severity-lower-case"),
    pytest.param({"tags": [" db", "db ", "replica", "db"]}, "tags", ["db", "replica"],
                 id="tags-dedup-after-trim-first-order"),
    pytest.param({"images": ["b", "a", " b "]}, "images", ["b", "a"], id="images-dedup"),
    pytest.param({"thing_id": " host-1 "}, "thing_id", "host-1", id="thing-id-trimmed"),
    pytest.param({"thing_id": ""}, "thing_id", None, id="thing-id-empty-is-absent"),
    pytest.param({"thing_id": None}, "thing_id", None, id="thing-id-null-is-absent"),
    pytest.param({"started_at": DROP}, "started_at", T0 * 1000,
                 id="started-at-defaults-to-event-time"),
    pytest.param({"started_at": 5}, "started_at", 5000, id="started-at-given-in-seconds"),
    pytest.param({"started_at": T0 * 1000 + 7}, "started_at", T0 * 1000 + 7,
                 id="started-at-given-in-milliseconds"),
    pytest.param({"attrs": {" k ": " v ", "gone": None, "o": {"x": None}}}, "attrs",
                 {" k ": " v ", "o": {"x": None}}, id="attrs-stored-as-sent"),
]


@pytest.mark.parametrize("changes, field, expected", NORMALISE_CASES)
def test_stored_value(gw, changes, field, expected):
    event = gw.event(create(gw, **changes))
    assert event[field] == expected


def test_channel_id_is_echoed_in_canonical_form(gw_line):
    result = post(gw_line, eg.CREATE, valid_body(
        eg.CREATE, channel_id=SPACED_CHANNEL.lower().replace("0", "o")))
    assert_accepted(gw_line, result, channel_id=CHANNEL)     # in line 1.2's data


@pytest.mark.parametrize("last", list(eg.CROCKFORD_ALPHABET))
def test_channel_id_last_symbol_carries_two_zero_bits(last):
    # 26 symbols carry 130 bits: the last symbol's value must be a multiple of 4,
    # in canonical form (matched at once) and in a lenient one (read step by step).
    accepted = eg.CROCKFORD_ALPHABET.index(last) % 4 == 0
    canonical = "06J0FZG1Y8XGG14VTQ4Y3G10M" + last
    assert eg.canonical_channel_id(canonical) == (canonical if accepted else None)
    assert eg.canonical_channel_id(canonical.lower()) == (canonical if accepted else None)


@pytest.mark.parametrize("event_time, words", [
    pytest.param(1713750000.5, ["round it", "time.time()", "whole"], id="fraction-names-time-time"),
    pytest.param("1713750000", ["not a string"], id="string-says-send-a-number"),
    pytest.param(-5, ["negative"], id="negative"),
    pytest.param(1713750000 * 10 ** 6, ["microseconds", "divide by 1000"], id="microseconds"),
    pytest.param(1713750000 * 10 ** 9, ["nanoseconds"], id="nanoseconds"),
])
def test_timestamp_refusals_say_what_to_send(gw, event_time, words):
    result = post(gw, eg.CREATE, valid_body(eg.CREATE, event_time=event_time))
    assert_error(result, 400, "invalid_event_time", *words)


def test_overflowing_number_is_not_finite(gw):
    body = json.dumps(valid_body(eg.CREATE))[:-1].encode() + b', "started_at": 1e400}'
    assert_error(post(gw, eg.CREATE, body), 400, "invalid_started_at", "finite")
    body = json.dumps(valid_body(eg.CREATE))[:-1].encode() + b', "attrs": {"x": -1e400}}'
    assert_error(post(gw, eg.CREATE, body), 400, "invalid_attrs")


def test_op_id_absent_or_empty_is_generated(gw_line):
    for op_id in (DROP, "", "   ", None):
        assert_accepted(gw_line, post(gw_line, eg.CREATE, valid_body(eg.CREATE, op_id=op_id)))


@LOCAL_ONLY
def test_line_1_3_op_id_starts_with_the_receive_time_in_hex():
    gateway = make_gateway("1.3")
    op_id = assert_accepted(gateway, post(gateway, eg.CREATE, valid_body(eg.CREATE)))["op_id"]
    received_at = gateway.requests()[-1]["received_at"]
    assert op_id[:14] == "%013x-" % received_at and len(op_id) == 46
    assert op_id.startswith("001")          # Unix ms today are 11 hex digits, zero-padded


@pytest.mark.parametrize("changes, code, message", [
    pytest.param({"tags": ["db", "\u754c" * 22]}, "invalid_tags",
                 "tags[1] (`" + "\u754c" * 22 + "`) is 66 bytes of UTF-8, over the limit of 64",
                 id="tag-named-with-its-bytes"),
    pytest.param({"tags": ["db", " "]}, "invalid_tags", "tags[1] is empty", id="empty-tag-named"),
    pytest.param({"images": ["x" * 2049]}, "invalid_images", "images[0] (`xxxxxxxxxxxxxxxxxxxxx...`) "
                 "is 2049 bytes of UTF-8, over the limit of 2048", id="image-named-with-its-bytes"),
    pytest.param({"metadata": {"k" * 65: 1}}, "metadata_key_too_long", "is 65 bytes of UTF-8",
                 id="metadata-key"),
    pytest.param({"metadata": {"region": "r" * 513}}, "metadata_value_too_long",
                 'metadata["region"] (`rrrrrrrrrrrrrrrrrrrrr...`) is 513 bytes', id="metadata-value"),
])
def test_byte_limit_messages_name_the_item_and_its_size(gw, changes, code, message):
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE, **changes)), 400, code, message)


@pytest.mark.parametrize("ended_at, words", [
    pytest.param(DROP, "ended_at (defaulted from event_time) must not be before", id="defaulted"),
    pytest.param(T0 - 10, "ended_at must not be before the event's started_at (%d ms)"
                 % (T0 * 1000), id="sent"),
])
def test_ended_at_message_says_when_it_was_defaulted(gw, ended_at, words):
    event_id = create(gw)
    body = valid_body(eg.CLOSE, event_id=event_id, event_time=T0 - 10, ended_at=ended_at)
    assert_error(post(gw, eg.CLOSE, body), 400, "invalid_ended_at", words)


@LOCAL_ONLY
def test_every_field_rule_is_in_table_order():
    assert [name for name, _ in eg.FIELD_RULES] == [
        "op_id", "thing_id", "ciphertext", "event_id", "title", "description", "status", "message",
        "severity", "event_time", "started_at", "ended_at", "tags", "images", "attrs", "metadata"]
    for name, check in eg.FIELD_RULES:
        assert check.__name__ == "check_" + name


# -- Limits in UTF-8 bytes, timestamps, the pages' examples, HEAD --------------------

# Characters of 1, 2 and 3 UTF-8 bytes, to reach each byte limit with text of each kind.
E2, E3 = "\u00e9", "\u4e2d"          # é (2 bytes), 中 (3 bytes)


@pytest.mark.parametrize("changes, code", [
    pytest.param({"tags": ["t" * 64]}, None, id="tag-64-ascii-bytes"),
    pytest.param({"tags": ["t" * 65]}, "invalid_tags", id="tag-65-ascii-bytes"),
    pytest.param({"tags": [E3 * 21]}, None, id="tag-21-cjk-is-63-bytes"),
    pytest.param({"tags": [E3 * 21 + "t"]}, None, id="tag-64-bytes-of-cjk-and-ascii"),
    pytest.param({"tags": [E3 * 22]}, "invalid_tags", id="tag-22-cjk-is-66-bytes"),
    pytest.param({"tags": [E3 * 21 + "tt"]}, "invalid_tags", id="tag-65-bytes-of-cjk-and-ascii"),
    pytest.param({"images": ["i" * 2048]}, None, id="image-2048-bytes"),
    pytest.param({"images": [E2 * 1024]}, None, id="image-2048-bytes-of-2-byte-chars"),
    pytest.param({"images": [E2 * 1024 + "i"]}, "invalid_images", id="image-2049-bytes"),
    pytest.param({"images": None}, "invalid_images", id="images-null"),
    pytest.param({"metadata": {E2 * 32: "v"}}, None, id="metadata-key-64-bytes"),
    pytest.param({"metadata": {E2 * 32 + "k": "v"}}, "metadata_key_too_long",
                 id="metadata-key-65-bytes"),
    pytest.param({"metadata": {"k": E2 * 256}}, None, id="metadata-value-512-bytes"),
    pytest.param({"metadata": {"k": E2 * 256 + "v"}}, "metadata_value_too_long",
                 id="metadata-value-513-bytes"),
    pytest.param({"ciphertext": "QUJD"}, None, id="ciphertext-string"),
    pytest.param({"ciphertext": ""}, None, id="ciphertext-empty-is-absent"),
    pytest.param({"ciphertext": 5}, "invalid_ciphertext", id="ciphertext-number"),
    pytest.param({"ciphertext": {"a": 1}}, "invalid_ciphertext", id="ciphertext-object"),
])
def test_byte_counted_limits_and_new_fields(gw, changes, code):
    result = post(gw, eg.CREATE, valid_body(eg.CREATE, **changes))
    if code is None:
        assert result[0] == 200, result[2]
    else:
        assert_error(result, 400, code)


@LOCAL_ONLY
@pytest.mark.parametrize("password, status", [
    pytest.param(E2 * 4, 200, id="password-8-bytes-of-2-byte-chars"),
    pytest.param(E2 * 3 + "p", 400, id="password-7-bytes"),
    pytest.param(E2 * 64, 200, id="password-128-bytes"),
    pytest.param(E2 * 64 + "p", 400, id="password-129-bytes"),
    pytest.param(E3 * 43, 400, id="password-43-cjk-is-129-bytes"),
])
def test_password_counts_utf8_bytes(password, status):
    gateway = eg.EventGateway(channels={})
    channel = crockford(77)
    if status == 200:
        gateway.register_channel(channel, password)
    result = post(gateway, eg.CREATE, valid_body(eg.CREATE, channel_id=channel, password=password))
    if status == 200:
        assert result[0] == 200, result[2]
    else:
        assert_error(result, 400, "invalid_password", "bytes")


@LOCAL_ONLY
def test_ciphertext_belongs_to_the_dispatch_not_the_event(gw):
    event_id = create(gw, ciphertext=" c1ph3r ")
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id))
    event = gw.event(event_id)
    assert "ciphertext" not in event
    assert event["history"][0]["fields"]["ciphertext"] == "c1ph3r"
    assert "ciphertext" not in event["history"][1]["fields"]


SEED_CURL_EXAMPLE = {"channel_id": "06J0FZG1Y8XGG14VTQ4Y3G10MR", "password": "pass-1234",
                     "title": "Database lag", "status": "ongoing",
                     "message": "Replica delay > 30s", "severity": "high",
                     "event_time": 1713750000, "started_at": 1713750000, "tags": ["db", "replica"]}
T0_MS = 1713750000000     # today's page sends every time in milliseconds


@LOCAL_ONLY
def test_seed_page_curl_example_is_kept_in_milliseconds(gw):
    status, _, envelope = post(gw, eg.CREATE, SEED_CURL_EXAMPLE)
    assert status == 200, envelope
    event = gw.event(envelope["data"]["event_id"])
    assert (event["started_at"], event["history"][0]["event_time"]) == (T0_MS, T0_MS)


@LOCAL_ONLY
def test_todays_page_examples_in_milliseconds_with_attrs(gw):
    body = dict(SEED_CURL_EXAMPLE, event_time=T0_MS, started_at=T0_MS,
                attrs={"replica": "db-2", "lag_s": 31})
    status, _, envelope = post(gw, eg.CREATE, body)
    assert status == 200, envelope
    event_id = envelope["data"]["event_id"]
    update = {"channel_id": CHANNEL, "password": PASSWORD, "event_id": event_id,
              "status": "ongoing", "message": "Replica delay > 60s", "severity": "critical",
              "event_time": T0_MS + 60000, "attrs": {"lag_s": 65}}
    close = {"channel_id": CHANNEL, "password": PASSWORD, "event_id": event_id,
             "status": "resolved", "message": "Replica caught up", "severity": "normal",
             "event_time": T0_MS + 120000, "ended_at": T0_MS + 120000, "attrs": {"lag_s": None}}
    assert post(gw, eg.UPDATE, update)[0] == 200
    assert post(gw, eg.CLOSE, close)[0] == 200
    event = gw.event(event_id)
    assert (event["state"], event["started_at"], event["ended_at"]) == (
        "closed", T0_MS, T0_MS + 120000)
    assert [d["event_time"] for d in event["history"]] == [T0_MS, T0_MS + 60000, T0_MS + 120000]
    assert event["attrs"] == {"replica": "db-2"}


@LOCAL_ONLY
def test_close_in_milliseconds_for_an_event_created_in_seconds(gw):
    event_id = create(gw, started_at=T0)
    result = post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id, ended_at=T0_MS - 1))
    assert_error(result, 400, "invalid_ended_at", "started_at")
    assert post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id, ended_at=T0_MS))[0] == 200
    assert gw.event(event_id)["ended_at"] == T0_MS == gw.event(event_id)["started_at"]


@pytest.mark.parametrize("target", [
    pytest.param("http://127.0.0.1:6666/event/create", id="absolute-form"),
    pytest.param("HTTP://example.test/event/create?x=1", id="absolute-form-with-query"),
])
def test_absolute_form_target_is_reduced_to_its_path(gw, target):
    status, _, envelope = post(gw, target, valid_body(eg.CREATE))
    assert status == 200, envelope


GET_PATHS = [path.replace("{event_id}", "nope") for path, route in eg.ROUTES.items()
             if "GET" in route.methods]


@LOCAL_ONLY
@pytest.mark.parametrize("path", GET_PATHS)
def test_head_on_every_get_route(gw, path):
    got = gw.handle("GET", path, {}, None)
    head = gw.handle("HEAD", path, {}, None)
    assert head[0] == got[0] and head[2] == b""
    names = lambda headers: sorted(k for k, _ in headers if k != "Content-Length")
    assert names(head[1]) == names(got[1])
    if got[0] != 204:
        assert dict(head[1])["Content-Length"] == str(len(got[2]))


@LOCAL_ONLY
def test_success_leaves_the_page_nulls_out(gw_line):
    payload = gw_line.handle("POST", eg.CREATE, JSON_HEADERS,
                             json.dumps(valid_body(eg.CREATE)).encode())[2]
    assert b"null" not in payload and b'"error' not in payload


# 5. Event store and lifecycle #####################################################

EVENT_KEYS = ["event_id", "channel_id", "thing_id", "state", "title", "description", "status",
              "message", "severity", "tags", "images", "attrs", "started_at", "ended_at",
              "created_at", "updated_at", "history", "history_dropped"]


def test_lifecycle_create_update_close(gw):
    event_id = create(gw, thing_id="db-1", tags=["db"], attrs={"lag": 31, "host": "a"},
                      metadata={"source": "probe"})
    event = gw.event(event_id)
    assert list(event) == EVENT_KEYS
    assert (event["state"], event["thing_id"], event["started_at"], event["ended_at"]) == (
        "ongoing", "db-1", T0 * 1000, None)
    created_at = event["created_at"]
    assert created_at == event["updated_at"] == event["history"][0]["received_at"]
    assert created_at == 1800000001 * 1000          # the pinned clock's first second, in ms
    assert event["history"][0]["event_time"] == T0 * 1000 and event["history_dropped"] == 0

    status, _, envelope = post(gw, eg.UPDATE, valid_body(
        eg.UPDATE, event_id=event_id, title="Bigger lag", tags=[], attrs={"lag": 65, "host": None,
                                                                          "o": {"k": None}}))
    assert status == 200 and gw.event(event_id)["thing_id"] == "db-1"     # kept
    event = gw.event(event_id)
    assert (event["title"], event["status"], event["message"], event["severity"]) == (
        "Bigger lag", "ongoing", "Replica delay > 60s", "critical")
    assert event["tags"] == []                                         # an empty list clears
    assert event["attrs"] == {"lag": 65, "o": {"k": None}}             # patch: null deletes
    assert event["updated_at"] > created_at

    status, _, envelope = post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id,
                                                        thing_id="db-1"))
    assert status == 200 and envelope["data"]["event_id"] == event_id
    event = gw.event(event_id)
    assert (event["state"], event["ended_at"], event["started_at"]) == (
        "closed", (T0 + 120) * 1000, T0 * 1000)
    assert [h["route"] for h in event["history"]] == [eg.CREATE, eg.UPDATE, eg.CLOSE]
    first = event["history"][0]
    assert list(first) == ["route", "op_id", "event_time", "received_at", "fields", "metadata",
                           "send_status"]
    assert first["send_status"] == "sent"            # accepted, and this gateway delivers
    assert first["fields"] == {"title": "Database lag", "status": "ongoing",
                               "message": "Replica delay > 30s", "severity": "high",
                               "tags": ["db"], "attrs": {"lag": 31, "host": "a"}}
    assert first["metadata"] == {"source": "probe"}
    assert event["history"][2]["fields"] == {"status": "resolved", "message": "Replica caught up",
                                             "severity": "normal"}
    assert event["history"][2]["metadata"] is None


def test_event_ids_are_uuid4_hex(gw):
    import uuid
    event_ids = [create(gw) for _ in range(200)]
    for event_id in event_ids:
        parsed = uuid.UUID(hex=event_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (event_id, 4, uuid.RFC_4122)
    assert len(set(event_ids)) == 200


def test_ids_are_made_without_a_system_call(gw, monkeypatch):
    # os.urandom would let other threads run while a create holds the store's lock.
    def no_system_call(size):
        raise AssertionError("os.urandom called")
    monkeypatch.setattr(os, "urandom", no_system_call)
    answer = post(gw, eg.CREATE, valid_body(eg.CREATE))
    assert answer[0] == 200 and len(gw.requests()[-1]["request_id"]) == 32


@pytest.mark.skipif(not hasattr(os, "fork"), reason="this platform cannot fork")
@pytest.mark.filterwarnings("ignore:This process:DeprecationWarning")   # the child only exits
def test_a_forked_child_draws_ids_of_its_own():
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writing, eg._new_hex_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(reading, 64).decode() != eg._new_hex_id()
    os.close(reading)
    os.close(writing)


def test_attrs_object_value_replaces_wholesale(gw):
    event_id = create(gw, attrs={"o": {"a": 1, "b": 2}})
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, attrs={"o": {"c": 3}}))
    assert gw.event(event_id)["attrs"] == {"o": {"c": 3}}


def test_lists_replace_and_absent_fields_are_kept(gw):
    event_id = create(gw, tags=["a", "b"], images=["i"], description="why")
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, tags=["c"]))
    event = gw.event(event_id)
    assert (event["tags"], event["images"], event["description"], event["title"]) == (
        ["c"], ["i"], "why", "Database lag")


def test_closed_event_is_terminal(gw):
    event_id = create(gw)
    assert post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id))[0] == 200
    for route in (eg.UPDATE, eg.CLOSE):
        assert_error(post(gw, route, valid_body(route, event_id=event_id)), 409,
                     "event_closed")
    assert len(gw.event(event_id)["history"]) == 2


@LOCAL_ONLY
def test_event_of_another_channel_is_not_found(gw):
    event_id = create(gw)
    body = valid_body(eg.UPDATE, event_id=event_id, channel_id=OTHER_CHANNEL, password="other-pass")
    assert_error(post(gw, eg.UPDATE, body), 404, "event_not_found")
    assert len(gw.event(event_id)["history"]) == 1


@pytest.mark.parametrize("created_thing, sent_thing, status", [
    pytest.param("db-1", "db-2", 409, id="different-thing"),
    pytest.param(None, "db-1", 409, id="event-has-no-thing"),
    pytest.param("db-1", "db-1", 200, id="same-thing"),
    pytest.param("db-1", DROP, 200, id="omitted-keeps-thing"),
    pytest.param("db-1", "", 200, id="empty-is-omitted"),
])
def test_thing_is_fixed_at_create(gw_line, created_thing, sent_thing, status):
    gw = gw_line
    event_id = create(gw, thing_id=created_thing)
    result = post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, thing_id=sent_thing))
    if status == 409:
        assert_error(result, 409, "thing_id_mismatch")
        assert gw.event(event_id)["status"] == "ongoing"
    else:
        # Line 1.2's data names the request's own thing, as production (which keeps
        # no store) answers; the event keeps the thing it was created with.
        assert_accepted(gw, result, thing_id=None if sent_thing is DROP else sent_thing or None)
        assert gw.event(event_id)["thing_id"] == created_thing


@pytest.mark.parametrize("ended_at, event_time, status", [
    pytest.param(T0, T0 + 1, 200, id="ended-at-equal-to-started-at"),
    pytest.param(T0 - 1, T0 + 1, 400, id="ended-at-one-second-before"),
    pytest.param(DROP, T0 - 1, 400, id="default-from-event-time-before"),
    pytest.param((T0 - 1) * 1000 + 999, T0 + 1, 400, id="milliseconds-one-before"),
    pytest.param(T0 * 1000, T0 + 1, 200, id="milliseconds-equal-to-seconds"),
    pytest.param(DROP, T0, 200, id="default-from-event-time-equal"),
])
def test_ended_at_not_before_started_at(gw, ended_at, event_time, status):
    event_id = create(gw, started_at=T0)
    result = post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id, ended_at=ended_at,
                                           event_time=event_time))
    if status == 400:
        assert_error(result, 400, "invalid_ended_at", "started_at")
        assert gw.event(event_id)["state"] == "ongoing"        # nothing half-applied
        assert len(gw.event(event_id)["history"]) == 1
    else:
        assert result[0] == 200


def test_passwords_never_stored_in_events(gw):
    create(gw, metadata={"k": "v"})
    assert PASSWORD not in json.dumps(gw.events())


@LOCAL_ONLY
def test_two_gateways_do_not_share_state():
    first, second = eg.EventGateway(), eg.EventGateway()
    create(first)
    first.add_fault("*", 503)
    assert (len(first.events()), len(second.events())) == (1, 0)
    assert second.faults() == []


# -- Send status ---------------------------------------------------------------------

@LOCAL_ONLY
def test_send_status_walks_through_every_state():
    gw = line_gateway("1.3")
    now = int(gw.clock.now * 1000)
    op_id = assert_accepted(gw, post(gw, eg.CREATE, valid_body(eg.CREATE)))["op_id"]
    status, _, envelope = call(gw, "GET", "/send_status/" + op_id)
    assert (status, envelope["data"]) == (200, {
        "op_id": op_id, "status": "sent", "model": "event",
        "entity_id": gw.events()[0]["event_id"], "accepted_at": now, "updated_at": now,
        "expires_at": now + 30 * 86400 * 1000})
    for state in eg.SEND_STATUSES:
        gw.clock.now += 1
        status, _, envelope = post(gw, "/__admin/send_status/" + op_id, {"status": state})
        assert (status, envelope["data"]["status"]) == (200, state)
        shown = call(gw, "GET", "/send_status/" + op_id)[2]["data"]
        assert (shown["status"], shown["updated_at"]) == (state, int(gw.clock.now * 1000))
        assert gw.events()[0]["history"][0]["send_status"] == state


@LOCAL_ONLY
@pytest.mark.parametrize("target, body, status, code", [
    pytest.param("/send_status/nope", None, 404, "send_status_not_found", id="unknown"),
    pytest.param("/send_status/bad%20id", None, 400, "invalid_op_id", id="malformed"),
    pytest.param("/send_status/" + "o" * 129, None, 400, "invalid_op_id", id="129-chars"),
    pytest.param("/send_status/", None, 404, "route_not_found", id="empty"),
    pytest.param("/send_status/%20", None, 400, "invalid_op_id", id="blank"),
    pytest.param("/send_status/%20%09", None, 400, "invalid_op_id", id="blank-tab"),
    pytest.param("/__admin/send_status/%20", {"status": "sent"}, 400, "invalid_op_id",
                 id="admin-blank"),
    pytest.param("/__admin/send_status/nope", {"status": "sent"}, 404, "send_status_not_found",
                 id="admin-unknown"),
    pytest.param("/__admin/send_status/op-1", {"status": "lost"}, 400, "invalid_filter",
                 id="admin-bad-status"),
    pytest.param("/__admin/send_status/op-1", {"status": "sent", "x": 1}, 400,
                 "invalid_json_data", id="admin-unknown-field"),
])
def test_send_status_refusals(target, body, status, code):
    gw = make_gateway("1.3")
    create(gw, op_id="op-1")
    result = post(gw, target, body) if body is not None else call(gw, "GET", target)
    assert_error(result, status, code)


@LOCAL_ONLY
def test_send_status_goes_with_its_dispatch():
    # The history bound drops the oldest update, eviction drops a closed event,
    # expiry ends it after 30 days, and a reset drops everything.
    gw = eg.EventGateway(clock=ManualClock(), max_history=2, max_events=1)
    event_id = create(gw, op_id="op-c")
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, op_id="op-u1"))
    assert gw.send_status("op-u1")["status"] == "sent"
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, op_id="op-u2"))
    assert gw.send_status("op-u1") is None and gw.send_status("op-u2") is not None
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id, op_id="op-x"))
    create(gw, op_id="op-next")                       # evicts the closed event
    assert [gw.send_status(op) for op in ("op-c", "op-u2", "op-x")] == [None] * 3
    assert_error(call(gw, "GET", "/send_status/op-x"), 404, "send_status_not_found")
    gw.clock.now += 30 * 86400 - 1
    assert gw.send_status("op-next") is not None
    gw.clock.now += 1
    assert gw.send_status("op-next") is None          # expired: accepted_at + 30 days
    gw.clock.now -= 1
    gw.reset()
    assert gw.send_status("op-next") is None


@LOCAL_ONLY
def test_send_status_needs_only_the_token_and_is_not_rate_limited():
    gw = eg.EventGateway(token="s3cret-token", clock=ManualClock())
    auth = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-token"}
    op_id = post(gw, eg.CREATE, valid_body(eg.CREATE), headers=auth)[2]["data"]["op_id"]
    assert_error(call(gw, "GET", "/send_status/" + op_id), 401, "authentication_failed")
    assert call(gw, "GET", "/send_status/" + op_id, headers=auth)[0] == 200
    limited = line_gateway("1.3", rate_limit=True)
    op_id = assert_accepted(limited, post(limited, eg.CREATE, valid_body(eg.CREATE)))["op_id"]
    for _ in range(eg.RATE_LIMIT_PER_IP + 1):
        assert call(limited, "GET", "/send_status/" + op_id)[0] == 200


@LOCAL_ONLY
def test_line_1_2_sets_send_statuses_through_the_admin_route_only():
    gw = make_gateway("1.2")
    create(gw, op_id="op-1")
    assert_error(call(gw, "GET", "/send_status/op-1"), 404, "route_not_found")
    status, _, envelope = post(gw, "/__admin/send_status/op-1", {"status": "failed"})
    assert (status, envelope["data"]["status"]) == (200, "failed")


# 6. Idempotency ###################################################################

def test_same_op_id_and_body_replays_byte_for_byte(gw):
    body = valid_body(eg.CREATE, op_id="op-1")
    first = gw.handle("POST", eg.CREATE, JSON_HEADERS, json.dumps(body).encode())
    # Same parsed JSON, different bytes: keys reordered, whitespace added.
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()
    second = gw.handle("POST", eg.CREATE, JSON_HEADERS, reordered)
    assert first[0] == second[0] == 200
    assert first[2] == second[2]
    assert dict(first[1])["X-Request-Id"] != dict(second[1])["X-Request-Id"]
    assert len(gw.events()) == 1 and len(gw.events()[0]["history"]) == 1


def test_replayed_update_changes_nothing_even_after_close(gw):
    event_id = create(gw)
    update = valid_body(eg.UPDATE, event_id=event_id, op_id="up-1", title="t2")
    first = post(gw, eg.UPDATE, update)
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id))
    again = post(gw, eg.UPDATE, update)
    assert first[0] == again[0] == 200 and first[2] == again[2]
    assert len(gw.event(event_id)["history"]) == 3


@pytest.mark.parametrize("second_route, changes", [
    pytest.param(eg.CREATE, {"title": "other"}, id="different-body"),
    pytest.param(eg.CREATE, {"event_time": T0 * 1000}, id="milliseconds-is-not-seconds"),
    pytest.param(eg.CREATE, {"op_id": "op-1", "attrs": {"x": True}}, id="true-is-not-1"),
    pytest.param(eg.UPDATE, {}, id="other-route"),
])
def test_same_op_id_different_request_conflicts(gw_line, second_route, changes):
    gw = gw_line
    first = valid_body(eg.CREATE, op_id="op-1", attrs={"x": 1})
    assert post(gw, eg.CREATE, first)[0] == 200
    second = body_for(gw, second_route, dict({"op_id": "op-1", "attrs": {"x": 1}}, **changes))
    assert_error(post(gw, second_route, second), 409, CONFLICT_CODE[gw.line.name])


@LOCAL_ONLY
def test_op_id_scope_is_one_channel(gw):
    assert post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-1"))[0] == 200
    other = valid_body(eg.CREATE, op_id="op-1", channel_id=OTHER_CHANNEL, password="other-pass")
    assert post(gw, eg.CREATE, other)[0] == 200
    assert len(gw.events()) == 2


def test_failed_request_does_not_record_its_op_id(gw):
    assert post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-1", severity="meh"))[0] == 400
    assert post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-1"))[0] == 200


def test_generated_op_id_cannot_be_replayed(gw_line):
    _, _, envelope = post(gw_line, eg.CREATE, valid_body(eg.CREATE))
    generated = envelope["data"]["op_id"]
    assert_error(post(gw_line, eg.CREATE, valid_body(eg.CREATE, op_id=generated)), 409,
                 CONFLICT_CODE[gw_line.line.name])


def run_threads(count, target):
    """Run target(i) on count threads released together; returns their results."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        barrier.wait()
        results[i] = target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_same_op_id_makes_one_event(gw):
    body = json.dumps(valid_body(eg.CREATE, op_id="race")).encode()
    results = run_threads(32, lambda i: gw.handle("POST", eg.CREATE, JSON_HEADERS, body))
    assert {status for status, _, _ in results} == {200}
    assert len({payload for _, _, payload in results}) == 1
    assert len(gw.events()) == 1


def test_concurrent_distinct_creates_lose_nothing(gw):
    def send(i):
        body = json.dumps(valid_body(eg.CREATE, op_id="op-%d" % i)).encode()
        return gw.handle("POST", eg.CREATE, JSON_HEADERS, body)

    results = run_threads(64, send)
    assert [status for status, _, _ in results] == [200] * 64
    ids = {json.loads(payload)["data"]["event_id"] for _, _, payload in results}
    assert len(ids) == 64 and {e["event_id"] for e in gw.events()} == ids


def test_concurrent_closes_one_wins(gw):
    event_id = create(gw)
    body = json.dumps(valid_body(eg.CLOSE, event_id=event_id)).encode()
    results = run_threads(16, lambda i: gw.handle("POST", eg.CLOSE, JSON_HEADERS, body))
    codes = sorted(json.loads(payload).get("error_code", "ok") for _, _, payload in results)
    assert codes == ["event_closed"] * 15 + ["ok"]


# 7. Capacity ######################################################################

@LOCAL_ONLY
def test_store_full_when_every_event_is_open():
    gw = eg.EventGateway(max_events=2)
    first, second = create(gw), create(gw)
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE)), 503, "store_full")
    assert [e["event_id"] for e in gw.events()] == [first, second]


@LOCAL_ONLY
def test_closed_longest_ago_is_dropped_first_with_its_op_ids():
    gw = eg.EventGateway(max_events=3)
    a, b, c = create(gw, op_id="op-a"), create(gw), create(gw)
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=b))
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=a, op_id="close-a"))
    d = create(gw)                                         # drops b, closed first
    assert [e["event_id"] for e in gw.events()] == [a, c, d]
    e = create(gw)                                         # drops a
    assert [ev["event_id"] for ev in gw.events()] == [c, d, e]
    # a's op_ids went with it: each names a new request now, not a replay of a's.
    assert post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=c, op_id="close-a"))[0] == 200
    assert gw.event(c)["state"] == "closed"
    status, _, envelope = post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-a"))
    assert status == 200 and envelope["data"]["event_id"] not in (a, c, d, e)


@LOCAL_ONLY
def test_replay_is_answered_when_the_store_is_full():
    gw = eg.EventGateway(max_events=1)
    body = valid_body(eg.CREATE, op_id="op-1")
    first = post(gw, eg.CREATE, body)
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE)), 503, "store_full")
    again = post(gw, eg.CREATE, body)
    assert (again[0], again[2]) == (200, first[2])


@LOCAL_ONLY
def test_memory_stays_bounded_while_events_churn():
    gw = eg.EventGateway(max_events=50)
    for i in range(500):
        event_id = create(gw, op_id="op-%d" % i)
        post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id, op_id="close-%d" % i))
    assert len(gw.store) == 50
    assert sum(len(ops) for ops in gw.store._ops.values()) == 100


# The store-wide bound: what it counts, in what order it frees, and what it never drops.
BIG = "c" * 20000            # a ciphertext that makes a body of about 20 KB


def counted(gw):
    """What the bound should count, recomputed from the stored records."""
    total = 0
    for record in gw.store._events.values():
        total += record[eg._STORED] + sum(d[eg._D_BYTES] for d in record[eg._HISTORY])
    return total


def big_update(gw, event_id, op_id):
    return post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, op_id=op_id,
                                          ciphertext=BIG))


@LOCAL_ONLY
def test_store_bound_drops_closed_events_first_then_the_oldest_updates():
    gw = make_gateway(max_store_mb=1)
    first, closed, third = create(gw), create(gw), create(gw)
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=closed))
    sent = []
    for i in range(60):                   # about 21 KB counted each: past 1 MiB
        event_id = first if i % 2 == 0 else third
        assert big_update(gw, event_id, "u%d" % i)[0] == 200
        sent.append("u%d" % i)
        assert gw.store.stored_bytes == counted(gw)
        assert gw.store.stored_bytes <= gw.store.max_store_bytes
    # The closed event went first, then the oldest updates, across both events.
    assert [e["event_id"] for e in gw.events()] == [first, third]
    kept = [d["op_id"] for e in gw.events() for d in e["history"][1:]]
    dropped = sum(e["history_dropped"] for e in gw.events())
    assert dropped > 0 and sorted(kept, key=lambda op: int(op[1:])) == sent[dropped:]
    assert [e["history"][0]["route"] for e in gw.events()] == [eg.CREATE] * 2   # creates kept
    # A dropped dispatch's op_id record and send status went with it.
    assert gw.send_status("u0") is None and gw.send_status(sent[-1]) is not None
    assert big_update(gw, first, "u0")[0] == 200          # now a new request, not a replay
    assert gw.info()["store_bytes"] == gw.store.stored_bytes == counted(gw)


@LOCAL_ONLY
def test_store_bound_refuses_a_create_when_nothing_can_be_freed():
    gw = make_gateway(max_store_mb=1)
    created = 0
    while True:
        status, _, envelope = post(gw, eg.CREATE, valid_body(eg.CREATE, ciphertext=BIG))
        if status != 200:
            break
        created += 1
    assert_error((status, {}, envelope), 503, "store_full", "--max-store-mb")
    assert len(gw.events()) == created > 10                # nothing was lost
    # An update or close is still applied: the bound is overshot by one body at most.
    event_id = gw.events()[0]["event_id"]
    assert big_update(gw, event_id, "over")[0] == 200
    assert gw.store.stored_bytes <= gw.store.max_store_bytes + 2 * len(BIG) + 2000
    assert post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id))[0] == 200
    # Once an event is closed, a create can take its room.
    assert post(gw, eg.CREATE, valid_body(eg.CREATE, ciphertext=BIG))[0] == 200
    assert event_id not in [e["event_id"] for e in gw.events()]


@LOCAL_ONLY
def test_store_bound_counts_attrs_that_accumulate_on_an_event():
    # With a history of 2 the updates are trimmed, but their attrs stay on the event.
    gw = make_gateway(max_history=2)
    event_id = create(gw)
    before = gw.store.stored_bytes
    for i in range(50):
        post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id,
                                       attrs={"key-%02d" % i: "v" * 1000}))
    assert len(gw.event(event_id)["history"]) == 2
    assert gw.store.stored_bytes - before >= 50 * 1000
    assert gw.store.stored_bytes == counted(gw)
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id,
                                   attrs={"key-%02d" % i: None for i in range(50)}))
    assert gw.store.stored_bytes - before < 5000 and gw.store.stored_bytes == counted(gw)


@LOCAL_ONLY
@pytest.mark.skipif(not hasattr(sys, "getrefcount") or sys.implementation.name != "cpython",
                    reason="tracemalloc counts CPython's allocations only")
def test_store_memory_holds_its_bound_under_a_soak():
    import tracemalloc
    gw = make_gateway(max_store_mb=2, max_requests=0)
    body = {"ciphertext": "s" * 8000}
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        events = [create(gw, **body) for _ in range(20)]
        for i in range(3000):                 # 24 MB sent, 12 times the bound
            event_id = events[i % 20]
            if i % 97 == 96:                  # now and then an event ends and another begins
                post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id))
                events[i % 20] = event_id = create(gw, **body)
            status = post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id,
                                                    attrs={"n": i}, **body))[0]
            assert status == 200
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    # The bound (2 MiB) plus a stated margin of 1 MiB for what the bound does not count
    # (the channels' op_id tables, the dict of events).
    assert grown < 3 * 1024 * 1024, grown
    assert gw.store.stored_bytes <= gw.store.max_store_bytes
    assert len(gw.store._after_creates) <= 2 * gw.store._kept_after_creates + 1024


@LOCAL_ONLY
def test_store_bound_default_and_cli():
    assert eg.DEFAULT_MAX_STORE_MB == 256
    assert eg.EventGateway().info()["limits"]["max_store_mb"] == 256
    with pytest.raises(ValueError, match="max_store_mb"):
        eg.EventGateway(max_store_mb=0)


# -- Bounded and flat: history, listings, channels, faults ---------------------------

@LOCAL_ONLY
def test_history_is_bounded_and_drops_the_oldest_after_the_create():
    gateway = eg.EventGateway(max_history=3, clock=Clock())
    event_id = create(gateway, op_id="op-create")
    for n in range(5):
        body = valid_body(eg.UPDATE, event_id=event_id, op_id="op-%d" % n, status="s%d" % n)
        assert post(gateway, eg.UPDATE, body)[0] == 200
        event = gateway.event(event_id)
        assert len(event["history"]) == min(n + 2, 3)
    assert [d["op_id"] for d in event["history"]] == ["op-create", "op-3", "op-4"]
    assert event["history_dropped"] == 3
    # op-0's record was dropped with it: the same op_id with another body is a new request.
    body = valid_body(eg.UPDATE, event_id=event_id, op_id="op-0", status="again")
    assert post(gateway, eg.UPDATE, body)[0] == 200
    # A kept one still replays, byte for byte.
    replay = valid_body(eg.UPDATE, event_id=event_id, op_id="op-4", status="s4")
    assert post(gateway, eg.UPDATE, replay)[0] == 200
    assert len(gateway.event(event_id)["history"]) == 3


@LOCAL_ONLY
@pytest.mark.skipif(sys.implementation.name != "cpython",
                    reason="tracemalloc is CPython's; the same code runs on every Python")
def test_update_cost_is_flat_in_memory_however_long_the_history():
    import tracemalloc
    gateway = eg.EventGateway(max_history=50000, max_requests=0, clock=Clock())
    event_id = create(gateway)
    body = json.dumps(valid_body(eg.UPDATE, event_id=event_id)).encode()

    def peak_of_one_update():
        # Traced only around the update it measures: what that update allocates.
        tracemalloc.start()
        try:
            assert gateway.handle("POST", eg.UPDATE, JSON_HEADERS, body)[0] == 200
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peaks = {}
    for n in range(1, 20001):
        if n in (100, 20000):
            peaks[n] = peak_of_one_update()
        else:
            gateway.handle("POST", eg.UPDATE, JSON_HEADERS, body)
    assert len(gateway.event(event_id)["history"]) == 20001
    # A copy of the history would show as ~160 KB at the 20 000th update.
    assert peaks[20000] < peaks[100] + 16384, peaks


def test_labels_are_stored_once_up_to_their_bound(gw, monkeypatch):
    # Equal labels from two bodies share one copy; past MAX_LABELS distinct ones
    # the table stops growing (sys.intern would grow forever on Python 3.12).
    monkeypatch.setattr(eg, "_LABELS", {})
    monkeypatch.setattr(eg, "MAX_LABELS", 4)
    first = create(gw, status="lagging", thing_id="db-1", tags=["db"])
    second = create(gw, status="lagging", thing_id="db-1", tags=["db"])
    shared = [(gw.event(first)[name], gw.event(second)[name]) for name in ("status", "thing_id")]
    assert all(one is other for one, other in shared)
    assert gw.event(first)["tags"][0] is gw.event(second)["tags"][0]
    assert len(eg._LABELS) == 4        # channel_id, status, thing_id, tag
    later = create(gw, status="late", tags=["new"])
    assert len(eg._LABELS) == 4 and gw.event(later)["tags"] == ["new"]


@LOCAL_ONLY
def test_listing_builds_its_views_outside_the_store_lock(gw, monkeypatch):
    for _ in range(3):
        create(gw)
    building, release = threading.Event(), threading.Event()
    real_view = eg._event_view

    def slow_view(record):
        building.set()
        assert release.wait(10)
        return real_view(record)

    monkeypatch.setattr(eg, "_event_view", slow_view)
    lister = threading.Thread(target=gw.events)
    lister.start()
    assert building.wait(10)
    created = threading.Event()
    creator = threading.Thread(target=lambda: (create(gw), created.set()))
    creator.start()
    try:
        assert created.wait(5)    # a create goes through while the views are being built
    finally:
        release.set()
        lister.join(10)
        creator.join(10)
    assert gw.store.lock.acquire(timeout=1) and gw.store.lock.release() is None


@LOCAL_ONLY
def test_channels_are_bounded(monkeypatch):
    monkeypatch.setattr(eg, "MAX_CHANNELS", 3)
    gateway = eg.EventGateway()                                   # the example channel: 1
    for number in (1, 2):
        assert post(gateway, "/__admin/channels", {"channel_id": crockford(number),
                                                   "password": "password-%d" % number})[0] == 200
    assert_error(post(gateway, "/__admin/channels", {"channel_id": crockford(3),
                                                     "password": "password-3"}),
                 409, "too_many_channels")
    assert post(gateway, "/__admin/channels", {"channel_id": crockford(2),
                                               "password": "new-password"})[0] == 200
    assert gateway.reset()["events"] == 0 and gateway.channel_ids() == [CHANNEL]


def test_channel_limit_default_is_10000():
    assert eg.MAX_CHANNELS == 10000 and eg.MAX_FAULTS == 1000


@LOCAL_ONLY
def test_unknown_channel_and_wrong_password_compare_the_same_way(gw, monkeypatch):
    compared = []
    real = eg._same_secret
    monkeypatch.setattr(eg, "_same_secret", lambda a, b: compared.append(len(b)) or real(a, b))
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE, password="wrong-pass")), 403,
                 "password_mismatch")
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE, channel_id=crockford(999))), 404,
                 "channel_not_found")
    assert len(compared) == 2


@LOCAL_ONLY
def test_faults_are_bounded_and_a_miss_costs_no_scan(gw, monkeypatch):
    for _ in range(eg.MAX_FAULTS):
        gw.add_fault(eg.CLOSE, 503)
    assert_error(post(gw, "/__admin/faults", {"route": eg.CLOSE, "status": 503}), 409,
                 "too_many_faults")
    scans = []
    real = gw.fault_queue._take
    monkeypatch.setattr(gw.fault_queue, "_take", lambda path: scans.append(path) or real(path))
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 200
    assert scans == []                               # no fault names /event/create: no scan
    assert post(gw, eg.CLOSE, {})[0] == 503 and scans == [eg.CLOSE]


# 8. Test-support routes ###########################################################

@LOCAL_ONLY
def test_admin_events_filters(gw):
    a = create(gw, thing_id="db-1")
    b = create(gw, thing_id="db-2")
    c = create(gw, channel_id=OTHER_CHANNEL, password="other-pass", thing_id="db-1")
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=b))

    def ids(query):
        status, _, envelope = call(gw, "GET", "/__admin/events" + query)
        assert status == 200
        return [event["event_id"] for event in envelope["data"]["events"]]

    assert ids("") == [a, b, c]
    assert ids("?thing_id=db-1") == [a, c]
    assert ids("?channel_id=" + CHANNEL.lower()) == [a, b]
    assert ids("?state=closed") == [b]
    assert ids("?state=ongoing&thing_id=db-1&channel_id=" + OTHER_CHANNEL) == [c]


@pytest.mark.parametrize("query", [
    pytest.param("?state=open", id="unknown-state"),
    pytest.param("?channel_id=nope", id="bad-channel"),
    pytest.param("?colour=red", id="unknown-filter"),
])
@LOCAL_ONLY
def test_admin_events_bad_filter(gw, query):
    assert_error(call(gw, "GET", "/__admin/events" + query), 400, "invalid_filter")


@LOCAL_ONLY
def test_admin_event_by_id(gw):
    event_id = create(gw)
    status, _, envelope = call(gw, "GET", "/__admin/events/" + event_id)
    assert status == 200 and envelope["data"]["event_id"] == event_id
    assert list(envelope["data"]) == EVENT_KEYS
    assert_error(call(gw, "GET", "/__admin/events/nope"), 404, "event_not_found")


@LOCAL_ONLY
def test_admin_delete_events(gw):
    create(gw, op_id="op-1")
    create(gw)
    status, _, envelope = call(gw, "DELETE", "/__admin/events")
    assert (status, envelope["data"]) == (200, {"deleted": 2})
    assert gw.events() == []
    assert post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-1", title="new"))[0] == 200


@LOCAL_ONLY
def test_admin_channels(gw):
    status, _, envelope = call(gw, "GET", "/__admin/channels")
    assert envelope["data"] == {"channels": [CHANNEL, CHANNEL_8, CHANNEL_128, OTHER_CHANNEL]}
    new = crockford(77)
    status, _, envelope = post(gw, "/__admin/channels",
                               {"channel_id": new.lower(), "password": "  new-password "})
    assert (status, envelope["data"]) == (200, {"channel_id": new})
    assert create(gw, channel_id=new, password="new-password")
    post(gw, "/__admin/channels", {"channel_id": new, "password": "changed-password"})
    assert_error(post(gw, eg.CREATE, valid_body(eg.CREATE, channel_id=new,
                                                password="new-password")), 403, "password_mismatch")
    assert "password" not in json.dumps(call(gw, "GET", "/__admin/channels")[2])


@pytest.mark.parametrize("body, code", [
    pytest.param({"channel_id": "bad", "password": "password1"}, "invalid_channel_id",
                 id="bad-channel"),
    pytest.param({"channel_id": crockford(5)}, "password_required", id="no-password"),
    pytest.param({"channel_id": crockford(5), "password": "short"}, "invalid_password",
                 id="short-password"),
    pytest.param({"password": "password1"}, "channel_id_required", id="no-channel"),
    pytest.param({"channel_id": crockford(5), "password": "password1", "x": 1},
                 "invalid_json_data", id="unknown-field"),
])
@LOCAL_ONLY
def test_admin_channel_registration_rules(gw, body, code):
    assert_error(post(gw, "/__admin/channels", body), 400, code)


def queue_fault(gw, **fault):
    status, _, envelope = post(gw, "/__admin/faults", fault)
    assert status == 200, envelope
    return envelope["data"]["queued"]


@pytest.mark.parametrize("fault_status, code", [
    pytest.param(401, "authentication_failed", id="401"),
    pytest.param(429, "rate_limited", id="429"),
    pytest.param(500, "internal_error", id="500"),
    pytest.param(503, "server_busy", id="503"),
])
@LOCAL_ONLY
def test_fault_then_retry_with_same_op_id_makes_one_event(gw, fault_status, code):
    queue_fault(gw, route=eg.CREATE, status=fault_status)
    body = valid_body(eg.CREATE, op_id="retry-me")
    result = post(gw, eg.CREATE, body)
    assert_error(result, fault_status, code, "injected")
    assert ("www-authenticate" in result[1]) is (fault_status == 401)
    assert gw.events() == []
    assert post(gw, eg.CREATE, body)[0] == 200
    assert post(gw, eg.CREATE, body)[0] == 200
    assert len(gw.events()) == 1


@LOCAL_ONLY
def test_fault_strikes_before_body_validation(gw):
    queue_fault(gw, route=eg.UPDATE, status=503)
    assert_error(post(gw, eg.UPDATE, b"not json", headers={}), 503, "server_busy")


@LOCAL_ONLY
def test_fault_count_and_order(gw):
    assert queue_fault(gw, route="*", status=429, count=2) == 2
    assert queue_fault(gw, route=eg.CLOSE, status=500) == 3
    defaults = {"kind": "status", "when": "before", "delay_ms": 0, "retry_after_s": None,
                "probability": 1}
    assert gw.faults() == [dict(defaults, route="*", status=429, count=2),
                           dict(defaults, route=eg.CLOSE, status=500, count=1)]
    assert call(gw, "GET", "/healthz")[0] == 200                     # * is event routes only
    assert call(gw, "GET", "/__admin/events")[0] == 200
    assert post(gw, eg.UPDATE, {})[0] == 429
    assert post(gw, eg.CLOSE, {})[0] == 429
    assert post(gw, eg.CLOSE, {})[0] == 500
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 200
    assert call(gw, "GET", "/__admin/faults")[2]["data"] == {"faults": []}


@LOCAL_ONLY
def test_fault_matches_only_its_route(gw):
    queue_fault(gw, route=eg.CLOSE, status=503)
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 200
    assert len(gw.faults()) == 1


@LOCAL_ONLY
def test_fault_after_404_401_405(gw_auth):
    gw_auth.add_fault("*", 503, count=5)
    assert call(gw_auth, "GET", eg.CREATE, headers={})[0] == 401
    assert call(gw_auth, "GET", eg.CREATE, headers=TOKEN_HEADERS)[0] == 405
    assert call(gw_auth, "POST", "/event/nope", headers={})[0] == 404
    assert gw_auth.faults()[0]["count"] == 5


@LOCAL_ONLY
def test_fault_strikes_before_the_size_check_of_the_head(gw):
    queue_fault(gw, route=eg.CREATE, status=429)
    headers = dict(JSON_HEADERS, **{"Content-Length": str(10 * 1024 * 1024)})
    status, _, payload = gw.check_head("POST", eg.CREATE, headers)
    assert (status, json.loads(payload)["error_code"]) == (429, "rate_limited")
    status, _, payload = gw.check_head("POST", eg.CREATE, headers)
    assert (status, json.loads(payload)["error_code"]) == (413, "payload_too_large")


@LOCAL_ONLY
def test_fault_delay(gw):
    queue_fault(gw, route=eg.CREATE, status=503, delay_ms=150)
    started = time.monotonic()
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 503
    assert time.monotonic() - started >= 0.15


@LOCAL_ONLY
def test_clear_faults(gw):
    queue_fault(gw, route="*", status=503, count=4)
    status, _, envelope = call(gw, "DELETE", "/__admin/faults")
    assert (status, envelope["data"]) == (200, {"cleared": 4})
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 200


@LOCAL_ONLY
def test_fault_limits_last_passing_values(gw):
    assert queue_fault(gw, route="*", status=401, count=1, delay_ms=eg.MAX_FAULT_DELAY_MS) == 1
    assert queue_fault(gw, route="*", status=503, retry_after_s=eg.MAX_RETRY_AFTER_S,
                       probability=1) == 2
    assert queue_fault(gw, route="*", status=429, retry_after_s=1, probability=0.001) == 3
    assert [(f["delay_ms"], f["retry_after_s"], f["probability"]) for f in gw.faults()] == [
        (60000, None, 1), (0, 3600, 1), (0, 1, 0.001)]


@pytest.mark.parametrize("fault", [
    pytest.param({"route": "/event/nope", "status": 503}, id="unknown-route"),
    pytest.param({"route": "/healthz", "status": 503}, id="healthz-route"),
    pytest.param({"status": 503}, id="no-route"),
    pytest.param({"route": "*", "status": 502}, id="status-502"),
    pytest.param({"route": "*", "status": "503"}, id="status-string"),
    pytest.param({"route": "*", "status": 503, "count": 0}, id="count-0"),
    pytest.param({"route": "*", "status": 503, "count": True}, id="count-true"),
    pytest.param({"route": "*", "status": 503, "delay_ms": -1}, id="delay-negative"),
    pytest.param({"route": "*", "status": 503, "delay_ms": 60001}, id="delay-60001"),
    pytest.param({"route": "*", "status": 503, "count": 2.0}, id="count-float"),
    pytest.param({"route": "*", "kind": "explode"}, id="kind-unknown"),
    pytest.param({"route": "*", "kind": "drop", "status": 503}, id="drop-with-status"),
    pytest.param({"route": "*", "kind": "slow", "when": "after"}, id="slow-after"),
    pytest.param({"route": "*", "status": 503, "when": "later"}, id="when-unknown"),
    pytest.param({"route": "*", "status": 500, "retry_after_s": 5}, id="retry-after-with-500"),
    pytest.param({"route": "*", "status": 503, "retry_after_s": 0}, id="retry-after-0"),
    pytest.param({"route": "*", "status": 503, "retry_after_s": 3601}, id="retry-after-3601"),
    pytest.param({"route": "*", "status": 503, "probability": 0}, id="probability-0"),
    pytest.param({"route": "*", "status": 503, "probability": 1.01}, id="probability-over-1"),
    pytest.param({"route": "*", "status": 503, "probability": True}, id="probability-true"),
])
@LOCAL_ONLY
def test_invalid_fault(gw, fault):
    assert_error(post(gw, "/__admin/faults", fault), 400, "invalid_fault")
    assert gw.faults() == []


# -- Request journal -----------------------------------------------------------------

@LOCAL_ONLY
def test_path_filter_must_start_with_a_slash():
    gw = make_gateway()
    assert_error(call(gw, "GET", "/__admin/requests?path=event/create"), 400, "invalid_filter",
                 "start with /")
    with pytest.raises(eg.GatewayError, match="start with /"):
        gw.requests(path="event/create")


@LOCAL_ONLY
def test_journal_entry_of_a_create(gw):
    headers = dict(JSON_HEADERS, Authorization="Bearer not-a-real-token")
    body = valid_body(eg.CREATE, op_id="op-j", thing_id="db-1")
    status, answer_headers, payload = gw.handle("POST", eg.CREATE + "?debug=1", headers,
                                                json.dumps(body).encode())
    (entry,) = gw.requests()
    assert list(entry) == ["seq", "received_at", "method", "path", "query", "headers", "body",
                           "body_bytes", "status", "error_code", "error", "response",
                           "request_id", "op_id", "event_id", "channel_id", "fault", "note",
                           "duration_ms"]
    data = json.loads(payload)["data"]
    assert entry["response"] == json.loads(payload)         # the answer, as sent
    assert (entry["method"], entry["path"], entry["query"], entry["status"]) == (
        "POST", eg.CREATE, "debug=1", 200)
    assert entry["headers"] == {"content-type": "application/json",
                                "authorization": "Bearer ***"}
    assert entry["body"] == dict(body, password="***")
    assert entry["body_bytes"] == len(json.dumps(body).encode())
    assert (entry["op_id"], entry["event_id"], entry["channel_id"]) == (
        "op-j", data["event_id"], CHANNEL)
    assert entry["request_id"] == dict(answer_headers)["X-Request-Id"]
    assert entry["received_at"] == 1800000001000 and isinstance(entry["seq"], int)
    assert (entry["error_code"], entry["error"], entry["fault"], entry["note"]) == (
        None, None, None, CLIENT_OP_ID_NOTE)
    assert entry["duration_ms"] >= 0


@LOCAL_ONLY
def test_journal_of_a_refusal_and_a_wrong_password(gw):
    import io
    gw.log = io.StringIO()
    wrong_answer = post(gw, eg.CREATE, valid_body(eg.CREATE, password="wrong-pass-1"))
    post(gw, eg.CREATE, valid_body(eg.CREATE, tags=5))
    wrong, refused = gw.requests()
    assert (wrong["status"], wrong["error_code"]) == (403, "password_mismatch")
    assert wrong["response"] == wrong_answer[2] and wrong["note"] is None
    # Production 1.3 no longer checks tags; this gateway keeps the page's rule, and says so.
    assert refused["error_code"] == "invalid_tags"
    assert refused["note"] == ("production 1.3 would accept this (it no longer checks tags); "
                               "this gateway keeps the page's rule")
    assert refused["error"] == "tags must be an array of strings"
    assert "wrong-pass-1" not in gw.log.getvalue() + json.dumps(gw.requests())
    # An unknown channel: production's 404, and a note naming the registered ids (at most 3).
    unknown = post(gw, eg.CREATE, valid_body(eg.CREATE, channel_id=crockford(5)))
    assert_error(unknown, 404, "channel_not_found")
    assert gw.requests()[-1]["note"] == "no channel %s is registered; registered: %s, %s, %s, ..." % (
        crockford(5), CHANNEL, CHANNEL_8, CHANNEL_128)
    assert "registered: %s" % CHANNEL in gw.log.getvalue()


@LOCAL_ONLY
def test_journal_filters_and_seq(gw):
    create(gw)
    post(gw, eg.CREATE, valid_body(eg.CREATE, channel_id=OTHER_CHANNEL, password="other-pass"))
    post(gw, eg.UPDATE, {})
    create(gw)
    seqs = [entry["seq"] for entry in gw.requests()]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert [e["path"] for e in gw.requests(path=eg.UPDATE)] == [eg.UPDATE]
    assert [e["status"] for e in gw.requests(status=400)] == [400]
    assert len(gw.requests(error_code="channel_id_required")) == 1
    assert len(gw.requests(channel_id=OTHER_CHANNEL.lower())) == 1
    assert [e["seq"] for e in gw.requests(after=seqs[1])] == seqs[2:]
    status, _, envelope = call(gw, "GET", "/__admin/requests?status=200&after=%d" % seqs[0])
    assert [e["seq"] for e in envelope["data"]["requests"]] == [seqs[1], seqs[3]]
    assert call(gw, "DELETE", "/__admin/requests")[2]["data"] == {"deleted": 4}
    post(gw, eg.UPDATE, {})
    assert gw.requests()[0]["seq"] == seqs[-1] + 1          # seq never restarts
    gw.reset()
    post(gw, eg.UPDATE, {})
    assert gw.requests()[0]["seq"] == seqs[-1] + 2


@pytest.mark.parametrize("query", [
    pytest.param("state=open", id="unknown-parameter"),
    pytest.param("status=abc", id="status-not-a-number"),
    pytest.param("status=99", id="status-99"),
    pytest.param("after=-1", id="after-negative"),
    pytest.param("channel_id=nope", id="channel-not-an-id"),
    pytest.param("wait_ms=30001", id="wait-30001"),
    pytest.param("wait_ms=1.5", id="wait-fraction"),
    pytest.param("count=0", id="count-0"),
    pytest.param("count=1001", id="count-1001"),
    pytest.param("path=event/create", id="path-without-slash"),
    pytest.param("method=post", id="method-lower-case"),
    pytest.param("error_code=no_such_code", id="unknown-error-code"),
])
def test_journal_bad_filter(gw, query):
    assert_error(call(gw, "GET", "/__admin/requests?" + query), 400, "invalid_filter")


@LOCAL_ONLY
def test_python_filters_run_the_http_checks(gw):
    create(gw)
    assert len(gw.events(channel_id=CHANNEL.lower())) == 1
    assert len(gw.events(channel_id=ALIASED_CHANNEL)) == 1
    with pytest.raises(eg.GatewayError) as raised:
        gw.events(state="open")
    assert raised.value.code == "invalid_filter"
    with pytest.raises(eg.GatewayError):
        gw.requests(status="x")


@LOCAL_ONLY
@pytest.mark.parametrize("filters, message", [
    pytest.param({"path": "event/create"}, "start with /", id="path"),
    pytest.param({"method": "post"}, "use POST", id="method"),
    pytest.param({"status": "x"}, "status", id="status"),
    pytest.param({"error_code": "invalid-status"}, "error_code", id="error-code"),
])
def test_a_filter_that_could_match_nothing_raises_in_python_too(filters, message):
    gw = make_gateway()
    for call_it in (lambda: gw.requests(**filters),
                    lambda: gw.wait_for_requests(timeout=0, **filters)):
        with pytest.raises(eg.GatewayError, match=message):
            call_it()


@LOCAL_ONLY
def test_method_and_dropped_filters():
    gw = make_gateway()
    create(gw)
    gw.handle("PUT", eg.CREATE, JSON_HEADERS, b"{}")
    gw.add_fault(eg.CREATE, kind="drop")
    gw.handle("POST", eg.CREATE, JSON_HEADERS, json.dumps(valid_body(eg.CREATE)).encode())
    assert [r["method"] for r in gw.requests(method="PUT")] == ["PUT"]
    assert [(r["method"], r["status"]) for r in gw.requests(method="POST")] == [
        ("POST", 200), ("POST", None)]
    (dropped,) = gw.requests(status="dropped")
    assert dropped["status"] is None and dropped["fault"]["kind"] == "drop"
    assert gw.wait_for_requests(status="dropped", timeout=0) == [dropped]
    status, _, envelope = call(gw, "GET", "/__admin/requests?status=dropped&method=POST")
    assert [r["seq"] for r in envelope["data"]["requests"]] == [dropped["seq"]]


@LOCAL_ONLY
def test_journal_skips_admin_page_icon_and_probes_and_is_bounded():
    gateway = eg.EventGateway(max_requests=3)
    for path in ("/__admin/events", "/", "/favicon.ico", "/__admin/faults", "/healthz",
                 "/readyz"):
        for method in ("GET", "HEAD", "POST"):
            gateway.handle(method, path, {}, None)
    assert gateway.requests() == []
    for _ in range(5):
        gateway.handle("POST", eg.UPDATE, JSON_HEADERS, b"{}")
    assert [e["seq"] for e in gateway.requests()] == [3, 4, 5]
    off = eg.EventGateway(max_requests=0)
    off.handle("POST", eg.UPDATE, JSON_HEADERS, b"{}")
    assert off.requests() == []


@LOCAL_ONLY
def test_no_password_in_the_journal_however_broken_the_body():
    import io
    import random
    rng = random.Random(20261202)
    log = io.StringIO()
    gw = eg.EventGateway(token="journal-t0ken", log=log)
    auth = {"Authorization": "Bearer journal-t0ken"}
    bodies = [json.dumps(valid_body(eg.CREATE)).encode().replace(b'"password"', b'"pass\\u0077ord"'),
              json.dumps(valid_body(eg.CREATE)).encode().replace(b'"password"', b'"PASSWORD"')]
    for _ in range(1500):
        headers, data = mutate(rng, rng.choice(eg.EVENT_ROUTES), "e-1")
        bodies.append(data)
    for data in bodies:
        gw.handle("POST", rng.choice(eg.EVENT_ROUTES), dict(JSON_HEADERS, **auth), data)
    seen = json.dumps(gw.requests()) + log.getvalue()
    seen += gw.handle("GET", "/__admin/requests", auth, None)[2].decode()
    assert PASSWORD not in seen and "journal-t0ken" not in seen
    assert any(entry["body"] for entry in gw.requests())      # parsed bodies are shown
    assert gw.internal_errors == []


# How the journal shows each spelling of the auth tests: a known scheme and a space
# keep the scheme, anything else is masked whole; never any part of the token.
SHOWN_AUTHORIZATION = {"Bearer  s3cret-token": "Bearer ***", "Bearer": "***",
                       "s3cret-token": "***", "Basic s3cret-token": "Basic ***",
                       "bearer s3cret-token": "bearer ***", "BEARER s3cret-token": "BEARER ***",
                       "Bearer\ts3cret-token": "***", "  s3cret-token": "***",
                       "s3cret-token Bearer": "***", "\tBearer s3cret-token": "Bearer ***",
                       "Token s3cret-token": "Token ***"}


@LOCAL_ONLY
@pytest.mark.parametrize("authorization", sorted(
    {case.values[0] for case in AUTH_CASES if case.values[0] is not None} | set(SHOWN_AUTHORIZATION)))
def test_the_journal_never_shows_the_token_in_any_spelling(authorization):
    gw = eg.EventGateway(token="s3cret-token", clock=Clock())
    gw.handle("POST", eg.CREATE, dict(JSON_HEADERS, Authorization=authorization),
              json.dumps(valid_body(eg.CREATE)).encode())
    shown = gw.requests()[0]["headers"]["authorization"]
    assert shown == SHOWN_AUTHORIZATION.get(authorization, "Bearer ***")
    page = gw.handle("GET", "/__admin/requests", {"Authorization": "Bearer s3cret-token"}, None)[2]
    # (40 a's: the long token's; random hex ids hold "aaaa" now and then)
    assert b"s3cret" not in page and b"a" * 40 not in page and b"t\\u00e9st" not in page


@LOCAL_ONLY
@pytest.mark.parametrize("event_time, shown", [
    pytest.param("1e400", "1e400", id="1e400"),
    pytest.param("-1e400", "-1e400", id="minus-1e400"),
    pytest.param("1E+999", "1E+999", id="1E+999"),
    pytest.param("[1e400, 1.5]", ["1e400", 1.5], id="in-a-list"),
    pytest.param('{"a": 2e308}', {"a": "2e308"}, id="in-an-object"),
])
def test_admin_answers_are_strict_json_whatever_the_body_held(gw, event_time, shown):
    body = ('{"channel_id": "%s", "password": "pass-1234", "title": "t", "event_time": %s}'
            % (CHANNEL, event_time)).encode()
    assert gw.handle("POST", eg.CREATE, JSON_HEADERS, body)[0] == 400

    def refuse(name):
        raise ValueError("not strict JSON: %s" % name)
    payload = gw.handle("GET", "/__admin/requests", {}, None)[2]
    entry = json.loads(payload, parse_constant=refuse)["data"]["requests"][-1]
    assert entry["body"]["event_time"] == shown


# -- Waits ---------------------------------------------------------------------------

def in_thread(target):
    """Run target() on a thread; returns a function that joins it and gives its result."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", target()))
    thread.start()

    def join():
        thread.join(10)
        assert not thread.is_alive()
        return result["value"]
    return join


@LOCAL_ONLY
def test_wait_for_events_returns_once_enough_arrive(gw):
    waiting = in_thread(lambda: gw.wait_for_events(count=2, timeout=20))
    create(gw)
    create(gw)
    assert len(waiting()) == 2


@LOCAL_ONLY
def test_http_wait_answers_when_the_request_arrives(gw):
    seq = gw.journal.changed.version
    waiting = in_thread(lambda: call(gw, "GET", "/__admin/requests?after=%d&wait_ms=20000" % seq))
    create(gw)
    status, _, envelope = waiting()
    assert status == 200 and [e["path"] for e in envelope["data"]["requests"]] == [eg.CREATE]


@LOCAL_ONLY
def test_wait_times_out_with_what_there_is(gw):
    create(gw)
    status, _, envelope = call(gw, "GET", "/__admin/events?count=2&wait_ms=1")
    assert status == 200 and len(envelope["data"]["events"]) == 1
    with pytest.raises(AssertionError) as raised:
        gw.wait_for_events(count=2, timeout=0.01, state="ongoing")
    assert "Database lag" in str(raised.value) and "state=ongoing" in str(raised.value)
    with pytest.raises(AssertionError) as raised:
        gw.wait_for_requests(path=eg.CLOSE, timeout=0.01)
    assert "POST /event/create 200" in str(raised.value)


@LOCAL_ONLY
def test_waits_end_when_the_gateway_stops(gw):
    waiting = in_thread(lambda: gw._wait(gw.store, gw.store.find, 5, 30))
    gw.stop_waiting()
    assert waiting() == []


@LOCAL_ONLY
def test_stopping_the_server_answers_a_wait_with_what_there_is():
    gateway = make_gateway()
    with eg.serve_in_thread(gateway) as served:
        create(gateway)
        conn = http_connection(served.url, 10)
        idle = http_connection(served.url, 10)
        idle.request("GET", "/healthz")
        idle.getresponse().read()               # a kept-alive connection with nothing under way

        def long_poll():
            conn.request("GET", "/__admin/events?count=5&wait_ms=30000")
            response = conn.getresponse()
            return response.status, response.getheader("Connection"), json.loads(response.read())

        answer = in_thread(long_poll)
        assert wait_until(lambda: gateway.store.changed.waiting, 5)     # the wait has begun
    status, connection, envelope = answer()
    assert (status, connection, len(envelope["data"]["events"])) == (200, "close", 1)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        idle.request("GET", "/healthz")
        idle.getresponse()
    conn.close()
    idle.close()


# -- Reset ---------------------------------------------------------------------------

@LOCAL_ONLY
def test_reset_puts_everything_back_to_start_up(gw):
    create(gw)
    gw.register_channel(crockford(31), "password-31")
    gw.add_fault(eg.UPDATE, 503, count=2)
    gw.internal_errors.append("x")
    status, _, envelope = call(gw, "POST", "/__admin/reset", None, headers={})
    assert status == 200 and envelope["data"] == {"events": 1, "requests": 1, "faults": 2}
    assert gw.events() == [] and gw.requests() == [] and gw.faults() == []
    assert gw.internal_errors == [] and crockford(31) not in gw.channel_ids()
    assert gw.channel_ids() == [CHANNEL]             # the constructor's: the fixture's went too
    assert call(gw, "POST", "/__admin/reset", b"ignored", headers={})[0] == 200


def test_reset_keeps_channels_registered_at_start_up():
    gateway = eg.EventGateway(channels={crockford(9): "password-9"})
    gateway.register_channel(crockford(10), "password-10")
    gateway.reset()
    assert gateway.channel_ids() == [crockford(9)]


# -- Faults: lost answers, drops, slowness, chance -----------------------------------

@LOCAL_ONLY
def test_lost_answer_then_retry_with_the_same_op_id(gw):
    gw.add_fault(eg.CREATE, 503, when="after")
    body = json.dumps(valid_body(eg.CREATE, op_id="op-lost")).encode()
    first = gw.handle("POST", eg.CREATE, JSON_HEADERS, body)
    assert first[0] == 503 and len(gw.events()) == 1         # applied, answer lost
    retry = gw.handle("POST", eg.CREATE, JSON_HEADERS, body)
    again = gw.handle("POST", eg.CREATE, JSON_HEADERS, body)
    assert retry[0] == 200 and retry[2] == again[2] and len(gw.events()) == 1
    lost, *_ = gw.requests()
    assert lost["status"] == 503 and lost["fault"]["when"] == "after"
    assert lost["op_id"] == "op-lost" and lost["event_id"] == gw.events()[0]["event_id"]


@LOCAL_ONLY
def test_drop_in_the_core_is_a_none_status(gw):
    gw.add_fault("*", kind="drop")
    assert gw.handle("POST", eg.CREATE, JSON_HEADERS, b"{}") == (None, [], b"")
    entry = gw.requests()[0]
    assert entry["status"] is None and entry["fault"]["kind"] == "drop"
    gw.add_fault("*", kind="drop", when="after")
    assert gw.handle("POST", eg.CREATE, JSON_HEADERS,
                     json.dumps(valid_body(eg.CREATE)).encode())[0] is None
    assert len(gw.events()) == 1


@LOCAL_ONLY
@pytest.mark.parametrize("headers, body, code", [
    pytest.param(JSON_HEADERS, dict(valid_body(eg.CREATE), severity="bad"), "invalid_severity",
                 id="refused-by-a-rule"),
    pytest.param({"Content-Type": "text/plain"}, valid_body(eg.CREATE),
                 "missing_json_content_type", id="refused-content-type"),
    pytest.param(JSON_HEADERS, dict(valid_body(eg.CREATE), password="wrong-pass-1"),
                 "password_mismatch", id="refused-password"),
])
def test_an_after_drop_on_a_refused_request_drops_it_and_journals_the_refusal(headers, body,
                                                                            code):
    import io
    log = io.StringIO()
    gw = make_gateway(log=log)
    gw.add_fault(eg.CREATE, kind="drop", when="after")
    assert gw.handle("POST", eg.CREATE, headers, json.dumps(body).encode()) == (None, [], b"")
    (entry,) = gw.requests()
    assert (entry["status"], entry["error_code"], entry["fault"]["kind"]) == (None, code, "drop")
    assert entry["response"] is None and gw.events() == []
    assert " dropped " in log.getvalue() and code in log.getvalue()
    assert gw.internal_errors == []


@LOCAL_ONLY
def test_slow_fault_delays_then_handles(gw):
    gw.add_fault(eg.CREATE, kind="slow", delay_ms=50)
    started = time.monotonic()
    assert post(gw, eg.CREATE, valid_body(eg.CREATE))[0] == 200
    assert time.monotonic() - started >= 0.05                 # a lower bound: no load can break it
    assert gw.requests()[0]["fault"]["kind"] == "slow"


@LOCAL_ONLY
def test_retry_after_and_message_of_a_fault(gw):
    gw.add_fault(eg.CREATE, 429, retry_after_s=7)
    status, headers, envelope = post(gw, eg.CREATE, valid_body(eg.CREATE))
    assert (status, headers["retry-after"]) == (429, "7")
    assert "HTTP" not in envelope["error"] and "fault" in envelope["error"]


def test_a_faults_fields_are_its_defaults_keys():
    # Fault's fields are written out for type checkers; they must stay FAULT_DEFAULTS'.
    assert eg.Fault._fields == tuple(eg.FAULT_DEFAULTS)


def strikes(seed):
    gateway = eg.EventGateway(seed=seed)
    gateway.add_fault("*", 503, count=1000, probability=0.5)
    return [gateway.handle("POST", eg.UPDATE, JSON_HEADERS, b"{}")[0] for _ in range(40)]


def test_same_seed_gives_the_same_strikes():
    assert strikes(7) == strikes(7)
    assert strikes(7) != strikes(8)
    assert {503, 400} == set(strikes(7))


# 9. Running it: the HTTP shell ####################################################

@pytest.fixture(scope="module")
def server():
    """One real server on an ephemeral port for this module's socket tests."""
    if REMOTE_URL:
        yield eg.Served(REMOTE_URL, RemoteGateway(REMOTE_URL, REMOTE_TOKEN))
        return
    with eg.serve_in_thread(eg.EventGateway(), idle_timeout=2.0) as served:
        yield served


@pytest.fixture
def live(server):
    """The module's server, emptied before each test; a silent 500 fails the test."""
    server.gateway.reset()
    server.gateway.clear_faults()
    del server.gateway.internal_errors[:]
    yield server
    assert server.gateway.internal_errors == []


def wait_until(condition, timeout):
    """Poll condition until it holds or timeout seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.02)
    return True


def address(url):
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    return host, int(port)


def connect(url, timeout=5.0):
    return socket.create_connection(address(url), timeout=timeout)


def read_response(sock, head_only=False):
    """One HTTP response from sock: (status, {lower-case header: value}, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a full response head: %r" % data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only else int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:length]


def request_head(method, path, length=None, extra=()):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: test", "Content-Type: application/json"]
    lines.extend("%s: %s" % pair for pair in AUTH_HEADERS.items())
    if length is not None:
        lines.append("Content-Length: %d" % length)
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def envelope_code(body):
    """The error_code of an answer read off a socket (None for a success)."""
    envelope = json.loads(body)
    if envelope["success"]:
        assert list(envelope) == ["success", "data"]
        return None
    assert list(envelope) == ["success", "error", "error_code", "problem"]
    return envelope["error_code"]


def closed_by_peer(sock):
    """True when the server closed the connection (recv gives EOF or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


CREATE_BYTES = json.dumps(valid_body(eg.CREATE, tags=["db", "replica"])).encode()


def test_http_create_through_a_real_socket(live):
    conn = http_connection(live.url, 5)
    conn.request("POST", eg.CREATE, CREATE_BYTES, HTTP_HEADERS)
    response = conn.getresponse()
    envelope = json.loads(response.read())
    assert response.status == 200 and envelope["success"] is True
    assert HEX32.fullmatch(response.getheader("X-Request-Id"))
    assert live.gateway.event(envelope["data"]["event_id"])["tags"] == ["db", "replica"]


def test_keep_alive_serves_many_requests_on_one_connection(live):
    conn = http_connection(live.url, 5)
    conn.connect()
    first_socket = conn.sock
    for _ in range(3):
        conn.request("POST", eg.CREATE, CREATE_BYTES, HTTP_HEADERS)
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and response.getheader("Connection") is None
        assert conn.sock is first_socket
    # Errors keep the connection too, when the body was read.
    conn.request("POST", eg.CREATE, b"{}", HTTP_HEADERS)
    response = conn.getresponse()
    assert response.status == 400 and envelope_code(response.read()) == "channel_id_required"
    assert conn.sock is first_socket
    assert len(live.gateway.events()) == 3


def test_expect_100_continue(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, len(CREATE_BYTES),
                                  ["Expect: 100-continue"]))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(CREATE_BYTES)
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["success"] is True


def test_expect_100_refused_with_the_final_status(live):
    head = request_head("POST", eg.CREATE, len(CREATE_BYTES), ["Expect: 100-continue"])
    with connect(live.url) as sock:
        sock.sendall(head.replace(b"application/json", b"text/plain"))
        status, headers, body = read_response(sock)
        assert (status, envelope_code(body)) == (400, "missing_json_content_type")
        assert headers["connection"] == "close" and closed_by_peer(sock)
    assert live.gateway.events() == []


def test_expect_100_with_a_fault_queued_gets_100_then_the_fault(live):
    # A fault is no refusal of steps 1-5: the body is asked for, then the fault strikes.
    live.gateway.add_fault(eg.CREATE, 503)
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, len(CREATE_BYTES), ["Expect: 100-continue"]))
        assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(CREATE_BYTES)
        status, _, body = read_response(sock)
    assert (status, envelope_code(body)) == (503, "server_busy")
    assert live.gateway.faults() == [] and live.gateway.events() == []


def test_refusal_after_a_small_body_keeps_the_connection(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", "/nope", len(CREATE_BYTES)) + CREATE_BYTES)
        status, headers, body = read_response(sock)
        assert (status, envelope_code(body)) == (404, "route_not_found")
        assert "connection" not in headers
        sock.sendall(request_head("POST", eg.CREATE, len(CREATE_BYTES)) + CREATE_BYTES)
        assert read_response(sock)[0] == 200


@LOCAL_ONLY
def test_repeated_header_lines_are_joined(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, len(CREATE_BYTES),
                                  ["Content-Length: %d" % len(CREATE_BYTES)]) + CREATE_BYTES)
        assert read_response(sock)[0] == 200        # the same length twice is one length
    gateway = eg.EventGateway(token="tok")
    with eg.serve_in_thread(gateway) as served, connect(served.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, len(CREATE_BYTES),
                                  ["Authorization: Bearer tok", "Authorization: Bearer tok"])
                     + CREATE_BYTES)
        status, _, body = read_response(sock)
        assert (status, envelope_code(body)) == (401, "authentication_failed")


def test_oversized_body_gets_413_before_it_is_sent(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, 10 * 1024 * 1024))    # no body bytes sent
        status, headers, body = read_response(sock)
        assert (status, envelope_code(body)) == (413, "payload_too_large")
        assert headers["connection"] == "close"


def test_oversized_body_answer_reaches_a_client_still_sending(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, 10 * 1024 * 1024) + b"x" * 65536)
        status, _, body = read_response(sock)
    assert (status, envelope_code(body)) == (413, "payload_too_large")


def test_post_without_length_gets_411(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE))
        status, _, body = read_response(sock)
    assert (status, envelope_code(body)) == (411, "length_required")


def padded_line(start, length, end=b""):
    """start, padding and end, then CRLF: a line of exactly length bytes."""
    line = start + b"p" * (length - len(start) - len(end) - 2) + end + b"\r\n"
    assert len(line) == length
    return line


def chunked(data, size=100):
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_chunked_body(live):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: chunked"])
                     + chunked(CREATE_BYTES))
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["success"] is True
        sock.sendall(request_head("GET", "/healthz", 0))        # the connection is still good
        assert read_response(sock)[0] == 200


def test_chunked_body_over_the_limit_gets_413(live):
    big = json.dumps(valid_body(eg.CREATE, description="d" * 40000)).encode()
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: chunked"])
                     + chunked(big, 8192))
        status, headers, body = read_response(sock)
    assert (status, envelope_code(body)) == (413, "payload_too_large")
    assert headers["connection"] == "close"
    assert live.gateway.events() == []


MALFORMED_CASES = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, "bad_request", id="one-word-request-line"),
    pytest.param(b"GET /healthz HTTP/2.0\r\n\r\n", 505, "http_version_not_supported",
                 id="http-2-request-line"),
    pytest.param(b"GET /healthz HTTP/1.x\r\n\r\n", 400, "bad_request", id="bad-version"),
    pytest.param(b"GET /healthz\r\n\r\n", 400, "bad_request", id="http-0-9-request-line"),
    pytest.param(b"GET  /healthz HTTP/1.1\r\n\r\n", 400, "bad_request", id="two-spaces"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nNo colon here\r\n\r\n", 400, "bad_request",
                 id="header-line-without-colon"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_request",
                 id="space-before-colon"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400, "bad_request",
                 id="folded-header-line"),
    pytest.param(padded_line(b"GET /healthz?", eg.MAX_HEAD_LINE_BYTES + 1, b" HTTP/1.1")
                 + b"\r\n", 414, "uri_too_long", id="request-line-65537-bytes"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + padded_line(b"X: ", eg.MAX_HEAD_LINE_BYTES + 1)
                 + b"\r\n", 431, "header_fields_too_large", id="header-line-65537-bytes"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431,
                 "header_fields_too_large", id="101-headers"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Content-Length: -1"]), 400,
                 "bad_request", id="negative-content-length"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Content-Length: ten"]), 400,
                 "bad_request", id="non-numeric-content-length"),
    pytest.param(request_head("POST", eg.CREATE, 5, ["Content-Length: 6"]) + b"{}", 400,
                 "bad_request", id="conflicting-content-lengths"),
    pytest.param(request_head("POST", eg.CREATE, 2, ["Transfer-Encoding: chunked"]), 400,
                 "bad_request", id="length-and-chunked"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: gzip"]), 400,
                 "bad_request", id="unknown-transfer-encoding"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: chunked"])
                 + b"zz\r\n{}\r\n0\r\n\r\n", 400, "bad_request", id="bad-chunk-size"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: chunked"])
                 + padded_line(b"2;pad=", eg.MAX_CHUNK_LINE_BYTES + 1) + b"{}\r\n0\r\n\r\n",
                 400, "bad_request", id="chunk-line-1025-bytes"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: chunked"])
                 + b"2\r\n{}XX0\r\n\r\n", 400, "bad_request", id="chunk-not-followed-by-crlf"),
]


@pytest.mark.parametrize("data, status, code", MALFORMED_CASES)
def test_malformed_http_gets_an_envelope_and_a_close(live, data, status, code):
    with connect(live.url) as sock:
        sock.sendall(data)
        got_status, headers, body = read_response(sock)
        assert (got_status, envelope_code(body)) == (status, code)
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"


@pytest.mark.parametrize("data", [
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", id="100-headers"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + padded_line(b"X: ", eg.MAX_HEAD_LINE_BYTES)
                 + b"\r\n", id="header-line-65536-bytes"),
    pytest.param(request_head("POST", eg.CREATE, extra=["Transfer-Encoding: chunked"])
                 + padded_line(b"%x;pad=" % len(CREATE_BYTES), eg.MAX_CHUNK_LINE_BYTES)
                 + CREATE_BYTES + b"\r\n0\r\n\r\n", id="chunk-line-1024-bytes"),
    pytest.param(padded_line(b"GET /healthz?", eg.MAX_HEAD_LINE_BYTES, b" HTTP/1.1")
                 + b"\r\n", id="request-line-65536-bytes"),
])
def test_http_limits_last_passing_value(live, data):
    with connect(live.url) as sock:
        sock.sendall(data)
        status, _, body = read_response(sock)
    assert status == 200, body


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS", "BREW"])
def test_any_method_gets_the_envelope_405(live, method):
    conn = http_connection(live.url, 5)
    conn.request(method, eg.CREATE, b"{}", HTTP_HEADERS)
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert response.getheader("Content-Length") == "0" and response.read() == b""


def test_head_gets_a_head_without_body(live):
    with connect(live.url) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(sock, head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")     # no stray body before it
        status, got, body = read_response(sock)
        assert status == 200 and int(got["content-length"]) == int(headers["content-length"])
        sock.sendall(b"HEAD /event/create HTTP/1.1\r\nHost: t\r\n" + AUTH_LINE + b"\r\n")
        status, headers, _ = read_response(sock, head_only=True)
        assert status == 405 and headers["allow"] == "POST"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_http_1_0_closes_unless_keep_alive(live):
    with connect(live.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert (status, headers["connection"]) == (200, "close") and closed_by_peer(sock)
    with connect(live.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(sock)[1]["connection"] == "keep-alive"
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert read_response(sock)[0] == 200


@LOCAL_ONLY
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-timeout", "socket-timeout"])
def test_idle_connection_is_closed(kernel, monkeypatch):
    # Closed without an answer: idle, stalled in the head, in a body, in a chunk.
    if not kernel:
        monkeypatch.setattr(eg, "_kernel_idle_timeout", lambda connection, seconds: False)
    stalls = [b"", b"POST /event/create HTTP/1.1\r\nContent-",
              b"POST /event/create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
              b"POST /event/create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{"]
    with eg.serve_in_thread(idle_timeout=0.3) as served:
        started = time.monotonic()
        sockets = [connect(served.url) for _ in stalls]
        try:
            for sock, stall in zip(sockets, stalls):
                sock.sendall(stall)
            assert [closed_by_peer(sock) for sock in sockets] == [True] * len(stalls)
        finally:
            for sock in sockets:
                sock.close()
        assert 0.25 < time.monotonic() - started < 3
        assert served.gateway.internal_errors == [] and served.gateway.requests() == []


@pytest.mark.skipif(os.name == "nt", reason="Windows keeps the socket's own timeout")
def test_the_kernel_keeps_the_idle_timeout():
    # No poll() before each recv() and send(): the socket itself has no timeout.
    ours, peer = socket.socketpair()
    with ours, peer:
        assert eg._kernel_idle_timeout(ours, 0.2) and ours.gettimeout() is None
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            io.BufferedReader(eg._Reader(ours)).readline()
        with pytest.raises(TimeoutError):
            eg._Writer(ours).write(b"x" * 2 ** 24)     # the peer reads nothing
        assert 0.3 < time.monotonic() - started < 5


def test_slow_clients_do_not_delay_others(live):
    trickling = [connect(live.url) for _ in range(20)]
    try:
        for sock in trickling:
            sock.sendall(b"POST /event/create HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        conn = http_connection(live.url, 5)
        conn.request("POST", eg.CREATE, CREATE_BYTES, HTTP_HEADERS)
        assert conn.getresponse().status == 200
        assert time.monotonic() - started < 1.0
    finally:
        for sock in trickling:
            sock.close()


@LOCAL_ONLY
def test_listen_backlog_holds_64_pending_connections():
    # A server that is not accepting yet: the kernel queues connections up to the
    # backlog. The stdlib's default of 5 would time out the seventh.
    server = eg.make_server(eg.EventGateway(), port=0)
    try:
        pending = [socket.create_connection(server.server_address, timeout=2) for _ in range(64)]
        for sock in pending:
            sock.close()
    finally:
        server.server_close()


@LOCAL_ONLY
def test_hundreds_of_idle_connections_do_not_block_a_new_client(live):
    baseline = threading.active_count()
    idle = [connect(live.url) for _ in range(300)]
    try:
        conn = http_connection(live.url, 5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for sock in idle:
            sock.close()
    # Each connection had a thread; they end when their connections close.
    assert wait_until(lambda: threading.active_count() <= baseline + 5, timeout=10)


def test_client_reset_does_not_stop_the_server(live, capfd):
    # A reset in the middle of a body, and one while the answer is being written.
    # (Neither creates anything: a create the server finishes after this test
    # ended would land in the next test's store.)
    for data in (b"POST /event/create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
                 b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"):
        sock = connect(live.url)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(data)
        sock.close()                     # linger 0: the close is a reset
    conn = http_connection(live.url, 5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    assert "Traceback" not in capfd.readouterr().err


def test_concurrent_same_op_id_over_http(live):
    body = json.dumps(valid_body(eg.CREATE, op_id="http-race")).encode()

    def send(i):
        conn = http_connection(live.url, 10)
        conn.request("POST", eg.CREATE, body, HTTP_HEADERS)
        response = conn.getresponse()
        return response.status, response.read()

    results = run_threads(16, send)
    assert {status for status, _ in results} == {200}
    assert len({payload for _, payload in results}) == 1
    assert len(live.gateway.events()) == 1


@LOCAL_ONLY
def test_one_log_line_per_request_without_secrets():
    import io
    stream = io.StringIO()
    gateway = eg.EventGateway(token="t0ken-never-logged", log=stream)
    headers = dict(HTTP_HEADERS, Authorization="Bearer t0ken-never-logged")
    status, response_headers, _ = gateway.handle("POST", eg.CREATE + "?q=1", headers,
                                                 json.dumps(valid_body(eg.CREATE)).encode())
    gateway.handle("GET", "/nope\x1b[31m", {}, None)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    request_id = dict(response_headers)["X-Request-Id"]
    stamp = r"20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9:.]{12}Z "
    assert re.fullmatch(stamp + r"POST /event/create 200 op_id=[0-9a-f]{13}-[0-9a-f]{32} "
                        r"event_id=[0-9a-f]{32} [0-9.]+ms " + request_id, lines[0]), lines[0]
    assert re.fullmatch(stamp + r"GET /nope\\x1b\[31m 404 route_not_found: no route /nope"
                        r"\\x1b\[31m; .* [0-9.]+ms [0-9a-f]{32}", lines[1]), lines[1]
    assert "t0ken" not in stream.getvalue() and PASSWORD not in stream.getvalue()


@LOCAL_ONLY
def test_serve_in_thread_stops_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with eg.serve_in_thread() as served:
            url = served.url
            raise RuntimeError("test failed")
    with pytest.raises(OSError):
        connect(url, timeout=1).close()


def test_broken_http_is_journaled_with_what_could_be_read(live):
    with connect(live.url) as sock:
        sock.sendall(b"POST /event/create HTTP/1.1\r\nAccept-Language: zh-CN\r\nBad Header\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert (status, headers["content-language"]) == (400, "en")     # broken HTTP: English
    with connect(live.url) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert read_response(sock)[0] == 400
    with connect(live.url) as sock:
        sock.sendall(b"POST /event/update HTTP/2.0\r\nAccept-Language: zh-CN\r\n\r\n")
        status, headers, body = read_response(sock)
        # Decided before the headers were read: in English.
        assert (status, envelope_code(body), headers["content-language"]) == (
            505, "http_version_not_supported", "en")
    if REMOTE_URL:
        return
    first, second, third = live.gateway.requests()
    assert (first["method"], first["path"], first["error_code"]) == ("POST", eg.CREATE,
                                                                     "bad_request")
    assert (second["method"], second["path"]) == ("", "")
    assert (third["method"], third["path"], third["status"]) == ("POST", eg.UPDATE, 505)


@LOCAL_ONLY
def test_drop_over_a_real_socket_reads_zero_bytes(live):
    live.gateway.add_fault(eg.CREATE, kind="drop")
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, len(CREATE_BYTES)) + CREATE_BYTES)
        assert sock.recv(65536) == b""
    assert live.gateway.requests()[0]["status"] is None


@LOCAL_ONLY
def test_serve_in_thread_closes_keep_alive_connections_on_exit():
    with eg.serve_in_thread() as served:
        conn = http_connection(served.url, 5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/healthz")
        conn.getresponse()
    conn.close()


@pytest.mark.parametrize("header", [
    pytest.param(b"Transfer-Encoding: \x0bchunked", id="vertical-tab-before-chunked"),
    pytest.param(b"Transfer-Encoding: chunked\x0c", id="form-feed-after-chunked"),
    pytest.param(b"Transfer-Encoding: \xa0chunked", id="nbsp-before-chunked"),
    pytest.param(b"Content-Length: \x1f5", id="unit-separator-in-length"),
    pytest.param(b"Content-Length: \x855", id="nel-in-length"),
])
def test_only_space_and_tab_are_optional_whitespace(live, header):
    with connect(live.url) as sock:
        sock.sendall(b"POST /event/create HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     + header + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        status, _, body = read_response(sock)
    assert (status, envelope_code(body)) == (400, "bad_request")


def test_tab_around_a_header_value_is_optional_whitespace(live):
    with connect(live.url) as sock:
        sock.sendall(b"POST /event/create HTTP/1.1\r\nHost: t\r\nContent-Type:\tapplication/json \t\r\n"
                     + AUTH_LINE + b"Content-Length: \t%d\t\r\n\r\n" % len(CREATE_BYTES)
                     + CREATE_BYTES)
        assert read_response(sock)[0] == 200


def test_content_length_of_5000_digits_is_413(live, capfd):
    with connect(live.url) as sock:
        sock.sendall(request_head("POST", eg.CREATE, extra=["Content-Length: " + "9" * 5000]))
        status, _, body = read_response(sock)
    assert (status, envelope_code(body)) == (413, "payload_too_large")
    assert "Traceback" not in capfd.readouterr().err


@LOCAL_ONLY
def test_accept_backs_off_when_out_of_descriptors(monkeypatch):
    import errno
    server = eg.make_server(eg.EventGateway(), port=0)
    calls = []
    enough = threading.Event()

    class OutOfDescriptors:
        """The listening socket as a process out of descriptors sees it."""

        def __init__(self, real):
            self.real = real

        def fileno(self):
            return self.real.fileno()

        def close(self):
            self.real.close()

        def accept(self):
            calls.append(time.monotonic())
            if len(calls) >= 3:
                enough.set()
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(server, "socket", OutOfDescriptors(server.socket))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    pending = socket.create_connection(server.server_address[:2])    # keeps it readable
    try:
        assert enough.wait(10)
    finally:
        server.shutdown()
        server.close_connections()
        thread.join(10)
        pending.close()
        server.server_close()
    # A lower bound, which no loaded machine can break: without the back-off the
    # three calls come within microseconds of each other.
    assert calls[2] - calls[0] >= 2 * eg.ACCEPT_BACKOFF_S * 0.9


# 9. Running it: the command line ##################################################

@LOCAL_ONLY
def test_the_readmes_changelog_names_the_modules_version():
    text = read_text(README)
    changelog = text.split("## Changelog", 1)[1]
    assert re.search(r"^### %s\b" % re.escape(eg.__version__), changelog, re.M)


@LOCAL_ONLY
def test_log_line_of_a_refusal_names_the_bodys_ids_and_the_note():
    gw = make_gateway(log=io.StringIO())
    post(gw, eg.CREATE, valid_body(eg.CREATE, status="x" * 30))
    line = gw.log.getvalue().strip()
    assert " 400 invalid_status: status is too long" in line
    assert "(production 1.3 would accept this" in line
    gw.log.truncate(0)
    post(gw, eg.CREATE, valid_body(eg.CREATE, op_id="op-9", status="x" * 30))
    line = gw.log.getvalue().strip()
    assert "op_id=op-9" in line and "(production 1.3 refuses a client op_id" in line


@LOCAL_ONLY
def test_a_long_log_line_loses_its_middle_never_the_status_or_the_request_id():
    gw = make_gateway(log=io.StringIO())
    body = valid_body(eg.CREATE, op_id="o" * 128, **{"k%03d" % i: 1 for i in range(60)})
    status, headers, _ = gw.handle("POST", "/event/create?" + "q" * 5000, JSON_HEADERS,
                                   json.dumps(body).encode())
    request_id = dict(headers)["X-Request-Id"]
    gw.handle("POST", "/" + "p" * 3000, JSON_HEADERS, b"{}")
    first, second = gw.log.getvalue().splitlines()
    assert len(first) <= eg.MAX_LOG_LINE_CHARS and len(second) <= eg.MAX_LOG_LINE_CHARS
    assert " 200 " in first and first.endswith("ms " + request_id) and "..." in first
    assert re.search(r"/p+\.\.\.p+ 404 route_not_found", second)
    assert re.search(r" [0-9.]+ms [0-9a-f]{32}$", second)


SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "event_gateway.py")


def start_cli(*args, **options):
    """Start the CLI on a free port; returns (process, its start-up line, its base URL)."""
    process = subprocess.Popen([sys.executable, SCRIPT, "--port", "0"] + list(args),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               **options)
    STARTED.append(process)
    line = process.stdout.readline()     # printed once the socket listens
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert match, (line, process.stderr.read() if process.poll() is not None else "")
    return process, line, match.group(0)


@LOCAL_ONLY
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_cli_serves_logs_and_stops_cleanly(stop_signal):
    process, line, url = start_cli("--token", "cli-t0ken", "--channel",
                                   "%s:cli-password" % crockford(42))
    try:
        assert "auth on" in line and crockford(42) in line
        assert "cli-t0ken" not in line and "cli-password" not in line
        conn = http_connection(url, 5)
        body = valid_body(eg.CREATE, channel_id=crockford(42), password="cli-password")
        conn.request("POST", eg.CREATE, json.dumps(body),
                     dict(HTTP_HEADERS, Authorization="Bearer cli-t0ken"))
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        process.send_signal(stop_signal)
        assert process.wait(timeout=10) == 0
    log = process.stderr.read()
    assert re.search(r"Z POST /event/create 200 op_id=[0-9a-f]{13}-[0-9a-f]{32} event_id=[0-9a-f]{32} "
                     r"[0-9.]+ms [0-9a-f]{32}$", log, re.M), log
    assert "cli-t0ken" not in log and "cli-password" not in log and "Traceback" not in log


@LOCAL_ONLY
@pytest.mark.parametrize("args, line", [([], "1.3"), (["--gateway-version", "1.2"], "1.2")])
def test_cli_names_its_version_and_line_and_answers_as_it(args, line):
    process, started, url = start_cli("--quiet", *args)
    try:
        assert started.startswith("event_gateway %s: listening on " % eg.__version__)
        assert " as production %s " % line in started
        conn = http_connection(url, 5)
        conn.request("POST", eg.CREATE, json.dumps(SEED_CURL_EXAMPLE), JSON_HEADERS)
        answer = json.loads(conn.getresponse().read())
        conn.close()
        assert list(answer["data"]) == SUCCESS_KEYS[line][:3] + SUCCESS_KEYS[line][4:]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


@LOCAL_ONLY
def test_cli_rate_limit_reaches_the_gateway():
    # The limit itself is tested with a pinned clock above; here only that the option
    # reaches the gateway (a real clock may turn the minute in the middle of a burst).
    process, _, url = start_cli("--quiet", "--rate-limit")
    try:
        conn = http_connection(url, 5)
        conn.request("GET", "/__admin/info")
        info = json.loads(conn.getresponse().read())["data"]
        conn.close()
        assert (info["gateway_version"], info["rate_limit"]) == ("1.3", True)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


@LOCAL_ONLY
def test_cli_default_is_the_page_example_channel():
    process, line, url = start_cli()
    try:
        assert "auth off" in line and CHANNEL in line and PASSWORD not in line
        conn = http_connection(url, 5)
        conn.request("POST", eg.CREATE, CREATE_BYTES, HTTP_HEADERS)
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


@pytest.mark.parametrize("args, words", [
    pytest.param(["--help"], ["--port", "--token", "--channel", "--max-events", "--idle-timeout",
                              "--quiet", "PUSHGO_TOKEN"], id="help"),
    pytest.param(["--channel", "nope:secret-password"], ["channel_id"], id="bad-channel"),
    pytest.param(["--channel", "nope:x"], ["channel_id"], id="bad-channel-and-password"),
    pytest.param(["--channel", CHANNEL + ":short"], ["password"], id="short-password"),
    pytest.param(["--max-events", "0"], ["--max-events"], id="zero-capacity"),
])
@LOCAL_ONLY
def test_cli_arguments(args, words):
    result = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True,
                            timeout=20)
    output = result.stdout + result.stderr
    assert result.returncode == (0 if args == ["--help"] else 2), output
    for word in words:
        assert word in output
    assert "secret-password" not in output and "short" not in output.replace("--", "")


@LOCAL_ONLY
def test_cli_port_in_use_says_what_to_do(live):
    host, port = address(live.url)
    result = subprocess.run([sys.executable, SCRIPT, "--port", str(port)], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "--port 0" in result.stderr


@pytest.mark.parametrize("args, words", [
    pytest.param(["--port", "65536"], ["--port", "from 0 to 65535"], id="port-65536"),
    pytest.param(["--port", "-1"], ["--port", "from 0 to 65535"], id="port-minus-1"),
    pytest.param(["--port", "http"], ["--port", "whole number"], id="port-word"),
    pytest.param(["--idle-timeout", "0"], ["--idle-timeout", "above 0"], id="idle-0"),
    pytest.param(["--idle-timeout", "inf"], ["--idle-timeout"], id="idle-inf"),
    pytest.param(["--idle-timeout", "nan"], ["--idle-timeout"], id="idle-nan"),
    pytest.param(["--idle-timeout", "1e10"], ["--idle-timeout", "3600"], id="idle-1e10"),
    pytest.param(["--idle-timeout", "3601"], ["--idle-timeout", "3600"], id="idle-3601"),
    pytest.param(["--max-history", "1"], ["--max-history", "at least 2"], id="history-1"),
    pytest.param(["--max-requests", "-1"], ["--max-requests", "at least 0"], id="requests-minus-1"),
    pytest.param(["--seed", "x"], ["--seed", "whole number"], id="seed-word"),
    pytest.param(["--max-store-mb", "0"], ["--max-store-mb", "at least 1"], id="store-0"),
    pytest.param(["--gateway-version", "1.4"], ["--gateway-version", "1.2", "1.3"],
                 id="gateway-version-1.4"),
    pytest.param(["--rate-limit", "--gateway-version", "1.2"], ["--rate-limit", "1.3"],
                 id="rate-limit-in-line-1.2"),
    pytest.param(["--rate-limit", "--token", "t0ken"], ["--rate-limit", "no token"],
                 id="rate-limit-with-a-token"),
])
@LOCAL_ONLY
def test_cli_bad_values_are_one_line_usage_errors(args, words):
    result = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr


@LOCAL_ONLY
def test_cli_last_passing_values():
    parser = eg.build_parser()
    args = parser.parse_args(["--port", "65535", "--idle-timeout", "3600", "--max-history", "2",
                              "--max-requests", "0", "--max-events", "1"])
    assert (args.port, args.idle_timeout, args.max_history, args.max_requests) == (
        65535, 3600.0, 2, 0)
    assert parser.parse_args(["--port", "0", "--idle-timeout", "0.001"]).idle_timeout == 0.001


@LOCAL_ONLY
def test_cli_host_that_does_not_resolve_says_so():
    result = subprocess.run([sys.executable, SCRIPT, "--host", "no-such-host.invalid"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "does not resolve" in result.stderr      # a bad value
    assert "--port" not in result.stderr and len(result.stderr.splitlines()) == 1


@LOCAL_ONLY
def test_cli_channel_message_shows_only_what_was_typed():
    result = subprocess.run([sys.executable, SCRIPT, "--channel", CHANNEL], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 2
    assert "--channel %s: give the channel as ID:PASSWORD" % CHANNEL in result.stderr
    result = subprocess.run([sys.executable, SCRIPT, "--channel", CHANNEL + ":short"],
                            capture_output=True, text=True, timeout=20)
    assert "--channel %s:...: password" % CHANNEL in result.stderr


@LOCAL_ONLY
def test_cli_ready_file_holds_the_url_while_it_listens(tmp_path):
    ready = tmp_path / "gateway.url"
    process, line, url = start_cli("--ready-file", str(ready))
    try:
        # The start-up line comes after the file is written.
        assert ready.read_text(encoding="utf-8") == url + "\n"
        conn = http_connection(url, 5)
        conn.request("GET", "/readyz")
        assert conn.getresponse().status == 200
        conn.close()
        assert not (tmp_path / "gateway.url.partial").exists()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    assert not ready.exists()


@LOCAL_ONLY
def test_cli_port_in_use_leaves_no_stale_ready_file(live, tmp_path):
    # A file left by an earlier run is removed before the gateway listens, so a
    # reader never takes the old URL for this run's, not even when listening fails.
    ready = tmp_path / "gateway.url"
    ready.write_text("http://127.0.0.1:1\n", encoding="utf-8")
    result = subprocess.run([sys.executable, SCRIPT, "--port", str(address(live.url)[1]),
                             "--ready-file", str(ready)], capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 1 and "--port 0" in result.stderr
    assert sorted(tmp_path.iterdir()) == []


@LOCAL_ONLY
def test_a_ready_file_whose_write_fails_leaves_nothing(tmp_path, monkeypatch):
    def refuse(source, destination):
        raise OSError(errno.EXDEV, "no rename here")
    monkeypatch.setattr(eg.os, "replace", refuse)
    with pytest.raises(OSError):
        eg._write_ready_file(str(tmp_path / "gateway.url"), "http://127.0.0.1:6666")
    assert sorted(tmp_path.iterdir()) == []


def wait_for_ready_file(process, ready, timeout=20.0):
    """The URL in ready once the CLI has written it; fails if the CLI exits first."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no ready file in %s s" % timeout
        time.sleep(0.01)                  # a poll of the file, not a guess at a duration
    return ready.read_text(encoding="utf-8").strip()


@LOCAL_ONLY
@pytest.mark.parametrize("stdout", ["unread-pipe", "closed"])
def test_cli_serves_with_a_stdout_nobody_reads(tmp_path, stdout):
    # `gateway | true`, or `gateway >&-`: the start-up line is lost, the requests answered.
    ready = tmp_path / "gateway.url"
    command = [sys.executable, SCRIPT, "--port", "0", "--ready-file", str(ready)]
    if stdout == "closed":
        command = ["sh", "-c", 'exec "$0" "$@" >&-'] + command
        read_end = write_end = None
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
    process = subprocess.Popen(command, stdout=write_end, stderr=subprocess.PIPE, text=True)
    if write_end is not None:
        os.close(write_end)
    try:
        url = wait_for_ready_file(process, ready)
        conn = http_connection(url, 5)
        conn.request("GET", "/readyz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=10)
        errors = process.stderr.read()
        process.stderr.close()
    assert status == 0, errors
    assert "Traceback" not in errors and "Exception ignored" not in errors
    assert not ready.exists()


@LOCAL_ONLY
def test_cli_started_with_sigint_ignored_still_stops_on_it():
    # A shell script's background job (`gateway &`) starts with SIGINT ignored.
    process = subprocess.Popen(
        ["sh", "-c", "trap '' INT; exec \"$0\" \"$@\"", sys.executable, SCRIPT, "--port", "0",
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "listening on" in process.stdout.readline()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


@LOCAL_ONLY
def test_cli_ready_file_that_cannot_be_written_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--port", "0", "--ready-file",
                             str(tmp_path / "no-such-dir" / "url")],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "cannot write --ready-file" in result.stderr


@LOCAL_ONLY
def test_cli_help_examples_copy_and_paste():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                            timeout=20)
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "python event_gateway.py --port 0 --quiet" in lines
    assert "--max-history" in result.stdout and "--max-requests" in result.stdout
    assert "--seed" in result.stdout


@LOCAL_ONLY
@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="reads /proc (Linux)")
def test_cli_raises_its_soft_descriptor_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip("the hard limit here is too low to see a raise")
    process, _, _ = start_cli(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                    (64, hard)))
    try:
        with open("/proc/%d/limits" % process.pid) as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        assert int(line.split()[3]) > 64
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


@LOCAL_ONLY
def test_cli_runs_without_gc_freeze(monkeypatch):
    # PyPy has no gc.freeze() nor gc.set_threshold(): main() must not need them.
    import gc
    for name in ("freeze", "set_threshold"):
        if hasattr(gc, name):
            monkeypatch.delattr(gc, name)
    eg._calm_garbage_collector()


# 10. The live page ################################################################

def test_page_answers_html_with_its_csp(gw_auth):
    status, headers, body = gw_auth.handle("GET", "/", {}, None)      # no token needed
    headers = dict(headers)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == eg.PAGE_BYTES and b"<title>" in body
    csp = headers["Content-Security-Policy"]
    assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
    head = gw_auth.handle("HEAD", "/", {}, None)
    assert head[0] == 200 and head[2] == b"" and dict(head[1])["Content-Length"] == str(len(body))
    icon_status, _, icon_body = gw_auth.handle("GET", "/favicon.ico", {}, None)
    assert (icon_status, icon_body) == (204, b"")
    assert gw_auth.handle("GET", "/__admin/requests", {}, None)[0] == 401    # data needs it


def page_part(tag):
    return eg.PAGE_HTML.split("<%s>" % tag, 1)[1].split("</%s>" % tag, 1)[0]


def test_page_csp_hashes_match_its_inline_script_and_style():
    import base64
    import hashlib
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        digest = base64.b64encode(hashlib.sha256(page_part(tag).encode()).digest()).decode()
        assert "%s 'sha256-%s'" % (directive, digest) in eg.PAGE_CSP
    assert eg.PAGE_HTML.count("<script") == 1 and eg.PAGE_HTML.count("<style") == 1


def test_page_uses_only_the_gateways_routes_and_no_other_host():
    script = page_part("script")
    paths = set(re.findall(r'"(/[^"?]*)', script))
    assert paths >= {"/__admin/requests", "/__admin/events", "/__admin/reset", "/__admin/faults"}
    for path in paths:
        assert path in eg.ROUTES or path.startswith("/event/"), path
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]|\bsrc=|@import|url\(", eg.PAGE_HTML, re.I)
    # Its one link is to a route of its own: the OpenAPI document.
    assert re.findall(r'\bhref="([^"]*)"', eg.PAGE_HTML, re.I) == ["/__admin/openapi.json"]
    assert "/__admin/openapi.json" in eg.ROUTES


@LOCAL_ONLY
def test_page_names_the_line_shows_answers_and_separates_its_labels():
    script = page_part("script")
    assert '"/__admin/info"' in script and "info.gateway_version" in script
    assert "info.module_version" in script
    assert "answer: entry.response" in script                 # a clicked entry shows its answer
    # Labels that sit side by side are joined by spaces: they read as words when copied.
    assert 'words(el("h3"), el("span", event.state' in script
    assert 'words(el("div", null, "head")' in script


def test_page_never_parses_data_as_html():
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in eg.PAGE_HTML, sink


@LOCAL_ONLY
def test_opening_the_page_leaves_the_journal_empty(live):
    for path in ("/", "/favicon.ico"):
        conn = http_connection(live.url, 5)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status in (200, 204)
    assert live.gateway.requests() == []


# 11. Local safety: other web pages must not read or steer the gateway #############

# Every test-support route with every method it takes, as a browser could send it.
ADMIN_REQUESTS = [(method, path.replace("{event_id}", "e1").replace("{op_id}", "op-1"))
                  for path, route in eg.ROUTES.items() if path.startswith(eg.ADMIN_PREFIX)
                  for method in sorted(route.methods)] + [("GET", "/"), ("HEAD", "/")]


def raw_request(url, method, path, headers, body=b""):
    """One request over a socket with exactly these headers (a browser's, not
    http.client's); returns (status, headers, body)."""
    head = "%s %s HTTP/1.1\r\n%s" % (method, path, "".join(
        "%s: %s\r\n" % item for item in dict(AUTH_HEADERS, **headers).items()))
    if body or method in ("POST", "DELETE"):
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    with connect(url) as sock:
        sock.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
        return read_response(sock, head_only=method == "HEAD")


@pytest.fixture
def guarded():
    """A fresh gateway over HTTP with an event, a journal entry and a queued fault, so
    that a refused request that changed anything would show."""
    if REMOTE_URL:
        pytest.skip("needs a gateway whose state the test inspects")
    gateway = make_gateway()
    create(gateway, op_id="op-1")
    gateway.add_fault(eg.CLOSE, 503)
    with eg.serve_in_thread(gateway) as served:
        yield served


def snapshot(gateway):
    return (json.dumps(gateway.events()), len(gateway.requests()), gateway.faults(),
            gateway.channel_ids(), gateway.send_status("op-1"))


@pytest.mark.parametrize("method, path", ADMIN_REQUESTS)
def test_dns_rebinding_host_is_refused_on_the_page_and_every_admin_route(guarded, method, path):
    before = snapshot(guarded.gateway)
    body = b'{"status": "failed"}' if "send_status" in path else b""
    status, headers, payload = raw_request(guarded.url, method, path,
                                           {"Host": "evil.example:%d" % address(guarded.url)[1]},
                                           body)
    assert status == 403, payload
    if method != "HEAD":
        envelope = json.loads(payload)
        assert (envelope["error_code"], envelope["problem"]["category"]) == (
            "host_not_allowed", "permission")
        assert "--allow-host evil.example" in envelope["error"]
    assert snapshot(guarded.gateway) == before


@pytest.mark.parametrize("method, path", [item for item in ADMIN_REQUESTS if item[1] != "/"])
@pytest.mark.parametrize("origin, fetch_site", [
    pytest.param("https://evil.example", "cross-site", id="foreign-origin"),
    pytest.param("null", "cross-site", id="null-origin"),
    pytest.param(None, "same-site", id="same-site-without-origin"),
    pytest.param("http://localhost:1", None, id="another-local-port"),
])
def test_cross_site_requests_are_refused_on_every_admin_route(guarded, method, path, origin,
                                                               fetch_site):
    host = "127.0.0.1:%d" % address(guarded.url)[1]
    headers = {"Host": host}
    if origin:
        headers["Origin"] = origin
    if fetch_site:
        headers["Sec-Fetch-Site"] = fetch_site
    before = snapshot(guarded.gateway)
    body = b'{"status": "failed"}' if "send_status" in path else b""
    status, _, payload = raw_request(guarded.url, method, path, headers, body)
    assert status == 403, payload
    if method != "HEAD":
        assert json.loads(payload)["error_code"] == "cross_site_request"
    assert snapshot(guarded.gateway) == before


def test_the_pages_own_reset_and_clients_without_origin_pass(guarded):
    host = "127.0.0.1:%d" % address(guarded.url)[1]
    status, _, _ = raw_request(guarded.url, "GET", "/__admin/requests", {"Host": host})
    assert status == 200
    status, _, payload = raw_request(guarded.url, "POST", "/__admin/reset", {
        "Host": host, "Origin": "http://" + host, "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and guarded.gateway.events() == []
    assert json.loads(payload)["data"] == {"events": 1, "requests": 1, "faults": 1}


def test_event_routes_and_probes_answer_any_host(guarded):
    headers = {"Host": "evil.example", "Origin": "https://evil.example"}
    for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/favicon.ico"),
                         ("GET", "/send_status/op-1")):
        assert raw_request(guarded.url, method, path, headers)[0] in (200, 204)
    body = json.dumps(valid_body(eg.CREATE)).encode()
    assert raw_request(guarded.url, "POST", eg.CREATE, headers, body)[0] == 200


@LOCAL_ONLY
@pytest.mark.parametrize("host, allow, status", [
    pytest.param("127.0.0.1:6666", (), 200, id="ipv4"),
    pytest.param("[::1]:6666", (), 200, id="ipv6"),
    pytest.param("LocalHost.", (), 200, id="localhost-any-case-trailing-dot"),
    pytest.param("app.localhost:8080", (), 200, id="under-localhost"),
    pytest.param(None, (), 200, id="no-host-http-1.0"),
    pytest.param("gateway", (), 403, id="service-name"),
    pytest.param("gateway:6666", ("gateway",), 200, id="allowed-name"),
    pytest.param("Gateway.", ("gateway",), 200, id="allowed-name-any-case"),
    pytest.param("other", ("gateway",), 403, id="another-name"),
    pytest.param("evil.example", ("*",), 200, id="star-turns-it-off"),
    pytest.param("127.0.0.1.nip.io", (), 403, id="rebinding-name"),
    pytest.param("[::1", (), 403, id="broken-literal"),
])
def test_host_rule(host, allow, status):
    gw = make_gateway(allow_hosts=allow)
    headers = {} if host is None else {"Host": host}
    assert call(gw, "GET", "/__admin/info", headers=headers)[0] == status


@LOCAL_ONLY
def test_absolute_form_authority_is_the_host():
    gw = make_gateway()
    assert_error(call(gw, "GET", "http://evil.example/__admin/info",
                      headers={"Host": "127.0.0.1"}), 403, "host_not_allowed")
    assert call(gw, "GET", "http://127.0.0.1:6666/__admin/info",
                headers={"Host": "evil.example"})[0] == 200


@LOCAL_ONLY
def test_the_page_forbids_framing():
    status, headers, _ = eg.EventGateway().handle("GET", "/", {}, None)
    assert "frame-ancestors 'none'" in dict(headers)["Content-Security-Policy"]


@LOCAL_ONLY
def test_cli_allow_host():
    process, _, url = start_cli("--quiet", "--allow-host", "gateway", "--allow-host", "Other.")
    try:
        for host, status in (("gateway", 200), ("other", 200), ("third", 403)):
            conn = http_connection(url, 5)
            conn.request("GET", "/__admin/info", headers={"Host": host})
            assert conn.getresponse().status == status
            conn.close()
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# 12. Comparing with another gateway ###############################################

# The channels the recording gateways start with, so that a reset keeps them.
START_CHANNELS = {CHANNEL: PASSWORD, CHANNEL_8: "p" * 8, CHANNEL_128: "p" * 128,
                  OTHER_CHANNEL: "other-pass"}
# Every secret the suite's recordings could carry.
SECRETS = [PASSWORD, "p" * 8, "p" * 128, "other-pass", "wrong-pass-1", "s3cret-token",
           "s3cret-tokeN", "s3cret-toke"]


def case_value(case):
    """A pytest.param's values, or the tuple itself."""
    return case.values if hasattr(case, "values") else case


def send_the_case_tables(gw):
    """The suite's own tables of cases, each after a reset, through gw."""
    for send, _, _ in map(case_value, LINE_ROWS):
        gw.reset()
        send(gw)
    for route, changes, _, _ in map(case_value, BODY_ORDER_CASES):
        gw.reset()
        post(gw, route, body_for(gw, route, changes))
    for route, changes, _ in map(case_value, FIELD_CASES):
        gw.reset()
        post(gw, route, body_for(gw, route, changes))
    for changes, _, _ in map(case_value, NORMALISE_CASES):
        gw.reset()
        create(gw, **changes)
    for body, _ in map(case_value, STRICT_JSON_CASES):
        gw.handle("POST", eg.CREATE, JSON_HEADERS, body)
    gw.reset()
    event_id = create(gw, op_id="op-send")
    for language in ("zh-CN", "zh-TW", "zh_hk, en", "fr"):
        post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id, password="wrong-pass-1"),
             dict(JSON_HEADERS, **{"Accept-Language": language}))
    call(gw, "GET", "/send_status/op-send")
    post(gw, "/__admin/send_status/op-send", {"status": "delivered"})
    call(gw, "GET", "/send_status/op-send")
    gw.add_fault(eg.UPDATE, 503, retry_after_s=3)
    post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id))
    gw.add_fault(eg.CLOSE, kind="drop", when="after")
    gw.handle("POST", eg.CLOSE, JSON_HEADERS, json.dumps(valid_body(
        eg.CLOSE, event_id=event_id)).encode())                         # applied, answer lost
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id))       # closed by the lost one
    gw.handle("PUT", eg.CREATE, JSON_HEADERS, b"{}")
    gw.handle("HEAD", "/send_status/op-send", {}, None)
    gw.register_channel(crockford(77), "added-pass-1")
    post(gw, eg.CREATE, valid_body(eg.CREATE, channel_id=crockford(77), password="added-pass-1"))


def record_the_case_tables(path, line, **options):
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(clock=Clock(), gateway_version=line, channels=START_CHANNELS,
                             record=stream, **options)
        send_the_case_tables(gw)
        assert gw.internal_errors == []
    return path


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """The case tables recorded once per line (module scope: they take a second)."""
    folder = tmp_path_factory.mktemp("recordings")
    return {line: record_the_case_tables(str(folder / ("cases-%s.jsonl" % line)), line)
            for line in eg.LINES}


def compare(capsys, *argv):
    """python event_gateway.py compare ... in process: (exit status, table, summary)."""
    status = eg.main(["compare"] + [str(arg) for arg in argv])
    out = capsys.readouterr().out
    *table, summary = out.strip().splitlines()
    return status, table, summary


SUMMARY = re.compile(r"compare: (\d+) exchanges, (\d+) agree, (\d+) stated, (\d+) unstated, "
                     r"(\d+) skipped$")


def read_verdicts(path):
    with open(path, encoding="utf-8") as report:
        return json.load(report)


@LOCAL_ONLY
@pytest.mark.parametrize("line", list(eg.LINES))
def test_the_case_tables_agree_with_the_same_line_in_process(recordings, capsys, tmp_path, line):
    report = tmp_path / "verdicts.json"
    status, table, summary = compare(capsys, recordings[line], "--gateway-version", line,
                                     "--json", report)
    exchanges, agree, stated, unstated, skipped = map(int, SUMMARY.match(summary).groups())
    assert (status, stated, unstated, table) == (0, 0, 0, []), (summary, table)
    assert exchanges == agree + skipped and agree > 200
    verdicts = read_verdicts(report)
    assert verdicts["summary"]["agree"] == agree and len(verdicts["exchanges"]) == exchanges


@LOCAL_ONLY
def test_the_case_tables_agree_with_the_same_line_over_http(recordings, capsys):
    target = eg.EventGateway(channels=START_CHANNELS)
    with eg.serve_in_thread(target) as served:
        status, table, summary = compare(
            capsys, recordings["1.3"], "--url", served.url,
            *sum((["--channel", "%s:%s" % pair] for pair in START_CHANNELS.items()), []))
    assert status == 0 and table == [], (summary, table)
    assert SUMMARY.match(summary).group(4) == "0"
    assert target.internal_errors == []


@LOCAL_ONLY
@pytest.mark.parametrize("recorded, other", [("1.3", "1.2"), ("1.2", "1.3")])
def test_against_the_other_line_every_difference_is_a_row_of_the_lines_table(
        recordings, capsys, tmp_path, recorded, other):
    report = tmp_path / "verdicts.json"
    status, table, summary = compare(capsys, recordings[recorded], "--gateway-version", other,
                                     "--json", report)
    assert status == 0, "\n".join(table)
    differing = [result for result in read_verdicts(report)["exchanges"]
                 if result["verdict"] not in ("agree", "skipped")]
    assert differing and all(result["verdict"] == "stated" for result in differing)
    rows = {row for result in differing for row in result["reason"].split(", ")}
    assert rows <= {"V1", "V2", "V3", "V4", "V5", "V6", "V7", "V9"}, rows
    assert {"V1", "V2", "V3", "V4", "V5", "V6", "V7", "V9"} <= rows     # each shows


class StandIn(http.server.BaseHTTPRequestHandler):
    """A target that is not a gateway: answers what answer() gives to every request."""

    protocol_version = "HTTP/1.1"

    def answer(self, method, body):
        return 200, {"success": True, "data": {}}

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        status, doc = self.answer(self.command, self.rfile.read(length))
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

    def log_message(self, *args):
        pass


class Renamer(StandIn):
    """A gateway whose success data says eventId instead of event_id."""

    gateway = None

    def answer(self, method, body):
        status, _, payload = self.gateway.handle(method, self.path, dict(self.headers), body)
        doc = json.loads(payload) if payload else {}
        if status == 200 and "event_id" in doc.get("data", {}):
            doc["data"]["eventId"] = doc["data"].pop("event_id")
        return status, doc


@contextlib.contextmanager
def stand_in(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)                 # shutdown() waits one poll
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def small_recording(path, line="1.3"):
    """A create, an update and a close of the same event, and one refusal."""
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(clock=Clock(), gateway_version=line, record=stream)
        event_id = create(gw)
        post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=event_id))
        post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=event_id))
        post(gw, eg.CREATE, valid_body(eg.CREATE, severity="bad"))
        post(gw, eg.CREATE, valid_body(eg.CREATE, title="t" * (eg.TITLE_MAX_CHARS + 1)))
    return path


@LOCAL_ONLY
def test_a_target_that_accepts_everything_is_unstated_target_accepts(capsys, tmp_path):
    with stand_in(StandIn) as url:
        status, table, summary = compare(capsys, small_recording(tmp_path / "r.jsonl"),
                                         "--url", url, "--target-line", "1.3")
    assert status == 1
    assert any(" target_accepts " in row and " unstated " in row for row in table), table
    assert SUMMARY.match(summary).group(4) != "0"


@LOCAL_ONLY
def test_a_renamed_key_of_the_success_data_is_unstated_shape(capsys, tmp_path):
    Renamer.gateway = eg.EventGateway()
    with stand_in(Renamer) as url:
        status, table, summary = compare(capsys, small_recording(tmp_path / "r.jsonl"),
                                         "--url", url, "--channel", "%s:%s" % (CHANNEL, PASSWORD))
    assert status == 1
    shape = [row for row in table if " shape " in row and " unstated " in row]
    assert shape and all(row.startswith("/event/") for row in shape), table


@LOCAL_ONLY
def test_a_target_that_closes_every_connection_is_no_answer(capsys, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def close_all():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.close()
    thread = threading.Thread(target=close_all, daemon=True)
    thread.start()
    try:
        status, table, summary = compare(
            capsys, small_recording(tmp_path / "r.jsonl"), "--url",
            "http://127.0.0.1:%d" % listener.getsockname()[1], "--timeout", "2")
    finally:
        stop.set()
        socket.create_connection(listener.getsockname(), timeout=5).close()   # wakes accept()
        thread.join()
        listener.close()
    assert status == 3 and all(" no_answer " in row for row in table[1:]), table
    assert SUMMARY.match(summary).group(2) == "0"


@LOCAL_ONLY
def test_no_recording_holds_a_password_or_token_in_any_encoding(recordings, tmp_path):
    with_token = str(tmp_path / "token.jsonl")
    with open(with_token, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(token="s3cret-token", channels=START_CHANNELS, record=stream)
        for authorization in sorted(SHOWN_AUTHORIZATION) + ["Bearer s3cret-token"]:
            for password in ("wrong-pass-1", PASSWORD, "p" * 8):
                post(gw, eg.CREATE, valid_body(eg.CREATE, password=password),
                     dict(JSON_HEADERS, Authorization=authorization))
        for body in (b'{"pass\\u0077ord": "pass-1234", "x": ', b'{"password": "pass-12',
                     b'{"password": "pass-\xff1234"}', b'{"pasword": "pass-1234"}',
                     b'{"channel_id": "%s", "password": "pass-1234"' % CHANNEL.encode()):
            gw.handle("POST", eg.CREATE, dict(JSON_HEADERS, Authorization="Bearer s3cret-token"),
                      body)
        jsonl = gw.handle("GET", "/__admin/requests?format=jsonl",
                          {"Authorization": "Bearer s3cret-token"}, None)[2]
    texts = [read_bytes(path) for path in list(recordings.values()) + [with_token]] + [jsonl]
    for text in texts:
        decoded = text.decode("utf-8")
        lines = [json.loads(line) for line in decoded.splitlines()]
        bodies = b"".join(base64.b64decode(line["body_base64"]) for line in lines
                          if line.get("body_base64"))
        for secret in SECRETS:
            escaped = "".join("\\u%04x" % ord(char) for char in secret)
            assert secret not in decoded and escaped not in decoded.lower(), secret
            assert secret.encode() not in bodies
            assert base64.b64encode(secret.encode()).decode() not in decoded
    placeholders = re.findall(r"<(?:password|token):[a-z]+(?::\d+)?>", jsonl.decode())
    assert {"<token:valid>", "<password:other:12>", "<password:registered>"} <= set(placeholders)


@LOCAL_ONLY
def test_a_replay_keeps_what_the_answers_depended_on(capsys, tmp_path):
    # A wrong password's placeholder keeps its size in UTF-8 bytes, the unit of step
    # 10's rule: the last size that passes and the first that fails, in ASCII and in
    # 2-byte characters, stay on their side of the rule in the replay.
    passwords = [("wrong-pass-1", 403), ("short", 400), ("x" * 7, 400), ("x" * 8, 403),
                 ("\u00e9" * 3 + "x", 400), ("\u00e9" * 4, 403), ("\u00e9" * 64, 403),
                 ("\u00e9" * 64 + "x", 400), ("p" * 129, 400), (" %s " % PASSWORD, 200),
                 ("pass-1235", 403)]
    path = tmp_path / "secrets.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(channels=START_CHANNELS, token="s3cret-token", record=stream)
        auth = dict(JSON_HEADERS, Authorization="Bearer s3cret-token")
        for password, expected in passwords:
            answer = post(gw, eg.CREATE, valid_body(eg.CREATE, password=password), auth)
            assert answer[0] == expected, password
        post(gw, eg.CREATE, valid_body(eg.CREATE), dict(JSON_HEADERS, Authorization="Bearer no"))
        post(gw, eg.CREATE, valid_body(eg.CREATE), dict(JSON_HEADERS, Authorization="s3cret-token"))
    report = tmp_path / "verdicts.json"
    status, table, summary = compare(capsys, path, "--gateway-version", "1.3", "--json", report)
    assert (status, table) == (0, []), (summary, table)
    answered = [result["answered"][0] for result in read_verdicts(report)["exchanges"]]
    assert answered == [expected for _, expected in passwords] + [401, 401]


# Bodies whose secret itself breaks the JSON (what the fuzzer found): the replay must
# be refused as the recording was, not turned into a body that parses.
BROKEN_SECRETS = [b'"pass\\ud800"', b'"pass\\x"', b'"pa\nss"', b'"pass\xff"', b'"pass-12',
                  b'"pass\\udc00-1234"']


@LOCAL_ONLY
@pytest.mark.parametrize("line", list(eg.LINES))
def test_a_secret_that_breaks_the_body_still_breaks_it_in_the_replay(capsys, tmp_path, line):
    path = tmp_path / "broken.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(gateway_version=line, record=stream)
        for secret in BROKEN_SECRETS:
            for key in (b"password", b"pasword"):
                body = b'{"channel_id": "%s", "%s": %s' % (CHANNEL.encode(), key, secret)
                body += b"}" if secret.endswith(b'"') else b""
                assert gw.handle("POST", eg.CREATE, JSON_HEADERS, body)[0] == 400
    text = read_bytes(path)
    assert b"pass" not in text.replace(b"password", b"").replace(b"pasword", b"")
    status, table, summary = compare(capsys, path, "--gateway-version", line)
    assert (status, table) == (0, []), (summary, table)


@LOCAL_ONLY
def test_a_secret_is_replaced_as_a_value_only(capsys, tmp_path):
    # An unknown key (a secret's place) whose value is another key's name, and a body
    # that is no JSON at all but holds the password: both found by fuzzing compare.
    path = tmp_path / "values.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(record=stream, token="s3cret-token")
        auth = dict(JSON_HEADERS, Authorization="Bearer s3cret-token")
        answer = post(gw, eg.CREATE, valid_body(eg.CREATE, probability="status", tags=["status"],
                                                 severity="bad"), auth)
        assert answer[2]["error_code"] == "invalid_severity"
        gw.handle("POST", eg.UPDATE, auth, b"\x00n+ee pass-1234 ke+ s3cret-token \x01")
    text = read_text(path)
    assert PASSWORD not in text and "s3cret-token" not in text
    recorded = json.loads(json.loads(text.splitlines()[0])["body"])
    assert (recorded["status"], recorded["tags"], recorded["probability"]) == (
        valid_body(eg.CREATE)["status"], ["status"], "<password:other:6>")
    status, table, summary = compare(capsys, path, "--gateway-version", "1.3", "--token", "t0k")
    assert (status, table) == (0, []), (summary, table)


@LOCAL_ONLY
def test_a_recording_that_cannot_be_written_stops_and_the_gateway_answers_on():
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    gw = eg.EventGateway(record=Full())
    assert create(gw) and create(gw)
    assert isinstance(gw.recorder.failed, OSError) and gw.internal_errors == []


@LOCAL_ONLY
def test_a_replay_reaches_the_targets_own_event(capsys, tmp_path):
    report = tmp_path / "verdicts.json"
    status, table, summary = compare(capsys, small_recording(tmp_path / "r.jsonl"),
                                     "--gateway-version", "1.3", "--json", report)
    answered = [result["answered"] for result in read_verdicts(report)["exchanges"]]
    assert answered == [[200, None], [200, None], [200, None], [400, "invalid_severity"],
                        [400, "invalid_title"]]
    assert status == 0 and table == []


@LOCAL_ONLY
def test_a_refusal_that_follows_from_an_earlier_one_takes_its_verdict(capsys, tmp_path):
    path = tmp_path / "thing.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(gateway_version="1.3", record=stream)
        data = assert_accepted(gw, post(gw, "/thing/db-1/event/create", valid_body(eg.CREATE)),
                               thing_id="db-1")
        post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=data["event_id"]))
    report = tmp_path / "verdicts.json"
    status, _, _ = compare(capsys, path, "--gateway-version", "1.2", "--json", report)
    first, second = read_verdicts(report)["exchanges"]
    assert (first["verdict"], first["reason"]) == ("stated", "V1")
    assert (second["kind"], second["answered"]) == ("target_refuses", [404, "event_not_found"])
    assert (second["verdict"], second["reason"], second["follows_from"]) == (
        "stated", "V1", first["seq"])
    assert status == 0


@pytest.mark.parametrize("content, words", [
    pytest.param("", ["empty"], id="empty-file"),
    pytest.param('{"recording": 1, "reset": true, "received_at": 1}', ["line 1", "cut short"],
                 id="truncated-last-line"),
    pytest.param('{"recording": 1, "reset": true, "received_at": 1}\n{"recording": 2}\n',
                 ["line 2", "format 2", "format 1"], id="format-2"),
    pytest.param('{"recording": 1, "reset": true, "received_at": 1}\nnot json\n',
                 ["line 2", "not JSON"], id="not-json"),
    pytest.param('{"recording": 1, "method": "POST"}\n', ["line 1", "not an exchange"],
                 id="not-an-exchange"),
])
def test_a_recording_it_cannot_read_is_exit_2_and_nothing_is_sent(capsys, tmp_path, content,
                                                                  words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    sent = []

    class Counting(StandIn):
        def answer(self, method, body):
            sent.append(self.path)
            return 200, {"success": True, "data": {}}
    with stand_in(Counting) as url:
        with pytest.raises(SystemExit) as stopped:
            eg.main(["compare", str(path), "--url", url])
    assert stopped.value.code == 2 and sent == []
    error = capsys.readouterr().err
    assert all(word in error for word in words), error


@pytest.mark.parametrize("argv, words", [
    pytest.param([], ["--url", "--gateway-version"], id="no-target"),
    pytest.param(["--url", "http://x", "--gateway-version", "1.2"], ["not allowed"],
                 id="two-targets"),
    pytest.param(["--gateway-version", "1.3", "--fail-on", "shape,nope"], ["--fail-on"],
                 id="unknown-kind"),
    pytest.param(["--gateway-version", "1.3", "--timeout", "0"], ["--timeout"], id="timeout-0"),
])
def test_compare_usage_errors(capsys, tmp_path, argv, words):
    path = small_recording(tmp_path / "r.jsonl")
    with pytest.raises(SystemExit) as stopped:
        eg.main(["compare", str(path)] + argv)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and all(word in error for word in words), error


@LOCAL_ONLY
def test_hostile_and_broken_exchanges_replay_and_judge(capsys, tmp_path):
    # The suite's refusals over a real socket, broken HTTP and dropped answers included:
    # the recording replays and judges without an exception, and agrees with its line.
    path = tmp_path / "hostile.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gateway = eg.EventGateway(channels=START_CHANNELS, record=stream)
        with eg.serve_in_thread(gateway) as served:
            for raw, _, _ in map(case_value, MALFORMED_CASES):
                with connect(served.url) as sock:
                    sock.sendall(raw.replace(b"/healthz", eg.CREATE.encode()))
                    read_response(sock)
            for body, _ in map(case_value, STRICT_JSON_CASES):
                conn = http_connection(served.url, 5)
                conn.request("POST", eg.CREATE, body, JSON_HEADERS)
                conn.getresponse().read()
            big = json.dumps(valid_body(eg.CREATE, title="x" * (32 * 1024))).encode()
            conn = http_connection(served.url, 5)
            conn.request("POST", eg.CREATE, big, JSON_HEADERS)
            assert conn.getresponse().status == 413
            conn.close()
            gateway.add_fault("*", kind="drop", count=2)
            for _ in range(2):
                conn = http_connection(served.url, 5)
                conn.request("POST", eg.CREATE, CREATE_BYTES, JSON_HEADERS)
                with pytest.raises(http.client.HTTPException):
                    conn.getresponse()
                conn.close()
        assert gateway.internal_errors == []
    status, table, summary = compare(capsys, path, "--gateway-version", "1.3")
    counts = SUMMARY.match(summary).groups()
    assert status == 0 and table == [], (summary, table)
    assert int(counts[4]) >= 8 and int(counts[1]) >= len(STRICT_JSON_CASES)
    status, _, summary = compare(capsys, path, "--gateway-version", "1.2")
    assert status == 0, summary


class Throttling:
    """A target whose gateway answers 429 rate_limited to the first `times` requests."""

    is_gateway, line = True, "1.3"

    def __init__(self, times):
        self.inner = eg._InProcessTarget(eg.EventGateway())
        self.times = times

    def send(self, method, target, headers, body, retry=True):
        if self.times and method == "POST":
            self.times -= 1
            return {"status": 429, "headers": {"content-type": "application/json"},
                    "body": json.dumps({"success": False, "error": "slow down",
                                        "error_code": "rate_limited"})}
        return self.inner.send(method, target, headers, body)

    def close(self):
        pass


@LOCAL_ONLY
@pytest.mark.parametrize("times, verdicts", [(3, ["agree", "agree", "agree"]),
                                             (4, ["unstated", "agree", "agree"])])
def test_a_targets_rate_limit_is_waited_out_at_most_three_times(tmp_path, times, verdicts):
    path = tmp_path / "r.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(record=stream)
        for _ in range(3):
            create(gw)
    slept = []
    out = io.StringIO()
    target = Throttling(times)
    results = list(eg.replay(str(path), target, {CHANNEL: PASSWORD}, None, sleep=slept.append))
    assert [result["verdict"] for result in results] == verdicts
    assert len(slept) == min(times, 3) and all(0 < seconds <= 60.05 for seconds in slept)
    assert results[0]["kind"] == (None if times == 3 else "no_answer")
    eg.run_compare(str(path), Throttling(0), passwords={CHANNEL: PASSWORD}, out=out,
                   sleep=slept.append, pace=120)
    assert slept[-3:] == [0.5] * 3 and out.getvalue().endswith("3 agree, 0 stated, 0 unstated, "
                                                               "0 skipped\n")


@LOCAL_ONLY
def test_a_recording_with_a_token_replays_in_process_with_one(capsys, tmp_path):
    path = tmp_path / "token.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(token="s3cret-token", record=stream)
        for authorization in ("Bearer s3cret-token", "Bearer s3cret-tokeN", "s3cret-token"):
            post(gw, eg.CREATE, valid_body(eg.CREATE),
                 dict(JSON_HEADERS, Authorization=authorization))
    report = tmp_path / "verdicts.json"
    status, table, _ = compare(capsys, path, "--gateway-version", "1.3", "--json", report)
    answered = [result["answered"][0] for result in read_verdicts(report)["exchanges"]]
    assert (status, table, answered) == (0, [], [200, 401, 401])


@LOCAL_ONLY
def test_recording_is_the_journal_as_lines_and_a_long_compare_shows_progress(tmp_path):
    path = tmp_path / "long.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        gw = eg.EventGateway(record=stream, max_requests=2000)
        for _ in range(1001):
            gw.handle("POST", eg.UPDATE, JSON_HEADERS, b"{}")
    lines = gw.recording()
    jsonl = gw.handle("GET", "/__admin/requests?format=jsonl&after=999", {}, None)
    assert [json.loads(line) for line in jsonl[2].decode().splitlines()] == lines[999:]
    assert dict(jsonl[1])["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line) for line in read_text(path).splitlines()] == lines
    assert gw.handle("GET", "/__admin/requests?format=csv", {}, None)[0] == 400

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    out, err = io.StringIO(), Terminal()
    target = eg._InProcessTarget(eg.EventGateway())
    assert eg.run_compare(str(path), target, out=out, err=err) == 0
    assert "compare: line 1000 of 1001" in err.getvalue()
    assert out.getvalue() == "compare: 1001 exchanges, 1001 agree, 0 stated, 0 unstated, 0 skipped\n"


def test_the_judge_is_a_function_of_two_answers():
    ok = {"status": 200, "headers": {"content-type": "application/json"},
          "body": '{"success": true, "data": {"op_id": "%s", "event_id": "%s"}}' % (
              "0" * 13 + "-" + "a" * 32, "b" * 32)}
    other_ids = dict(ok, body=ok["body"].replace("a" * 32, "c" * 32).replace("b" * 32, "d" * 32))
    refused = {"status": 400, "headers": {"content-type": "application/json"},
               "body": json.dumps({"success": False, "error": "x", "error_code": "invalid_title"})}
    assert eg.disagreement(ok, other_ids) == (None, [])             # generated ids by format
    assert eg.disagreement(ok, refused)[0] == "target_refuses"
    assert eg.disagreement(refused, ok)[0] == "target_accepts"
    assert eg.disagreement(refused, dict(refused, status=404))[0] == "status"
    assert eg.disagreement(refused, dict(refused, body=refused["body"].replace(
        "invalid_title", "invalid_status")))[0] == "code"
    assert eg.disagreement(refused, dict(refused, body=refused["body"].replace(
        '"x"', '"another sentence"'))) == (None, [])                # text for people: presence
    assert eg.disagreement(ok, dict(ok, headers={"content-type": "text/plain"})) == (
        "shape", ["/headers/content-type"])
    assert eg.disagreement(ok, None) == ("no_answer", [])
    assert eg.disagreement(dict(ok, status=None), None) == (None, [])     # both dropped


@LOCAL_ONLY
def test_the_readme_names_every_error_code_option_and_step():
    # The README is the module's contract for people: it must not drift from it.
    readme = read_text(README)
    assert [code for code in eg.ERRORS if "`%s`" % code not in readme] == []
    for parser in (eg.build_parser(), eg.build_compare_parser()):
        options = [option for action in parser._actions for option in action.option_strings
                   if option.startswith("--") and option != "--help"]
        assert [option for option in options if "`%s" % option not in readme] == []
    docstring_steps = re.findall(r"^ ?(\d+a?)\. ", eg.__doc__, re.M)
    order = readme.split("**Processing order**", 1)[1].split("\n\n", 1)[0]
    assert docstring_steps and [step for step in docstring_steps
                                if not re.search(r"(^|[ (;]) ?%s " % step, order, re.M)] == []


def test_the_readmes_differences_table_names_every_stated_reason():
    readme = read_text(README)
    section = readme.split("### Where the pages, production and this gateway differ", 1)[1]
    section = section.split("\n## ", 1)[0]
    named = set(re.findall(r"\| `([a-z_0-9]+|V\d)` \|$", section, re.M))
    rows_of_lines = set(re.findall(r"^\| (V\d) \|", readme, re.M))
    assert named | rows_of_lines == {reason.name for reason in eg.STATED_REASONS}
    for reason in eg.STATED_REASONS:
        assert reason.across_lines == reason.name.startswith("V")


# The OpenAPI description ##########################################################

def openapi(line):
    return eg.openapi_document(eg.LINES[line])


def resolve(document, schema):
    """A schema with its $ref followed."""
    while isinstance(schema, dict) and "$ref" in schema:
        node = document
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


JSON_TYPES = {"string": str, "object": dict, "array": list, "boolean": bool, "null": type(None)}


def json_type_ok(value, name):
    if name in ("integer", "number"):
        return (isinstance(value, int) or (name == "number" and isinstance(value, float))) \
            and not isinstance(value, bool)
    return isinstance(value, JSON_TYPES[name])


def schema_errors(document, schema, value, where="$"):
    """Where value breaks schema: a checker of the keywords the document uses."""
    schema = resolve(document, schema)
    if schema is True:
        return []
    if schema is False:
        return [where + ": not allowed"]
    errors = []
    for part in schema.get("allOf", ()):
        errors += schema_errors(document, part, value, where)
    if "anyOf" in schema and all(schema_errors(document, part, value, where)
                                 for part in schema["anyOf"]):
        errors.append(where + ": matches none of anyOf")
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        errors.append(where + ": not %r" % schema["const"])
    if "enum" in schema and value not in schema["enum"]:
        errors.append(where + ": not one of the enum")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(json_type_ok(value, name) for name in types):
            return errors + [where + ": not of type %s" % types]
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 10 ** 9):
            errors.append(where + ": length")
        if len(value.encode()) > schema.get("x-max-utf8-bytes", 10 ** 9):
            errors.append(where + ": bytes")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(where + ": pattern")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            errors.append(where + ": range")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 10 ** 9):
            errors.append(where + ": maxItems")
        for index, item in enumerate(value):
            errors += schema_errors(document, schema.get("items", True), item, "%s[%d]" % (where, index))
    if isinstance(value, dict):
        errors += [where + ": missing " + key for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(document, properties[key], item, where + "." + key)
            elif "additionalProperties" in schema:
                errors += schema_errors(document, schema["additionalProperties"], item, where + "." + key)
            if "propertyNames" in schema:
                errors += schema_errors(document, schema["propertyNames"], key, where + " key")
    return errors


def documented(document, route, method, status, code):
    """Whether the document lists status for route and method, with code among its codes."""
    responses = document["paths"][route][method.lower()]["responses"]
    if str(status) not in responses:
        return False
    if code is None:
        return True
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    return code in schema["allOf"][1]["properties"]["error_code"]["enum"]


@pytest.mark.parametrize("line", list(eg.LINES))
def test_openapi_lists_every_route_of_the_line_and_only_those(line):
    document = openapi(line)
    expected = {path: {method.lower() for method in route.methods}
                for path, route in eg.ROUTES.items()
                if route.line_field is None or getattr(eg.LINES[line], route.line_field)}
    assert {path: set(item) - {"parameters"} for path, item in document["paths"].items()} == expected
    assert document["openapi"] == "3.1.0" and document["info"]["version"] == eg.__version__


@pytest.mark.parametrize("line", list(eg.LINES))
def test_openapi_documents_every_answer_the_gateway_gives(line):
    # The answers of the tables of cases above, of random mutations, and of the
    # event states, each found among its route's documented statuses and codes.
    import random
    document = openapi(line)
    gw = make_gateway(line)
    checked = set()

    def check(route, result):
        status, _, envelope = result
        code = envelope["error_code"] if envelope and status != 200 else None
        path = route.split("?")[0]
        template = "/thing/{thing_id}" + path[path.index("/event/"):] if path.startswith(
            "/thing/") else path
        assert documented(document, template, "POST", status, code), (route, status, code)
        checked.add((status, code))

    for param in FIELD_CASES + BODY_ORDER_CASES:
        route, changes = param.values[0], param.values[1]
        check(route, post(gw, route, body_for(gw, route, changes)))
    for param in STRICT_JSON_CASES:
        check(eg.CREATE, post(gw, eg.CREATE, param.values[0]))
    rng = random.Random(7)
    event_id = create(gw)
    for _ in range(300):
        route = rng.choice(eg.EVENT_ROUTES)
        headers, data = mutate(rng, route, event_id)
        result = gw.handle("POST", route, headers, data)
        check(route, (result[0], None, json.loads(result[2]) if result[2] else None))
    closed = create(gw)
    post(gw, eg.CLOSE, valid_body(eg.CLOSE, event_id=closed))
    check(eg.UPDATE, post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=closed)))
    check(eg.UPDATE, post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id="nope")))
    check(eg.UPDATE, post(gw, eg.UPDATE, valid_body(eg.UPDATE, event_id=create(gw), thing_id="x")))
    check(eg.CREATE, post(gw, eg.CREATE, valid_body(eg.CREATE, password="wrong-pass-1")))
    for status in (401, 429, 500, 503):
        gw.add_fault("*", status)
        check(eg.CLOSE, post(gw, eg.CLOSE, {}))
    if line == "1.3":
        check("/thing/a/event/create", post(gw, "/thing/a/event/create",
                                             valid_body(eg.CREATE, thing_id="b")))
    full = make_gateway(line, max_events=1)
    create(full)
    check(eg.CREATE, post(full, eg.CREATE, valid_body(eg.CREATE)))
    assert len(checked) >= 50          # the distinct (status, code) pairs seen


def test_openapi_send_status_and_probes_are_documented():
    document = openapi("1.3")
    gw = make_gateway("1.3")
    op_id = post(gw, eg.CREATE, valid_body(eg.CREATE))[2]["data"]["op_id"]
    for target, status, code in (("/send_status/" + op_id, 200, None),
                                 ("/send_status/nope", 404, "send_status_not_found"),
                                 ("/send_status/a%20b", 400, "invalid_op_id")):
        result = call(gw, "GET", target)
        assert (result[0], result[2].get("error_code")) == (status, code)
        assert documented(document, "/send_status/{op_id}", "GET", status, code)
        responses = document["paths"]["/send_status/{op_id}"]["get"]["responses"]
        schema = responses[str(status)]["content"]["application/json"]["schema"]
        assert schema_errors(document, schema, result[2]) == []
    for path in ("/healthz", "/readyz"):
        schema = document["paths"][path]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]
        assert schema_errors(document, schema, call(gw, "GET", path)[2]) == []


@pytest.mark.parametrize("line", list(eg.LINES))
def test_openapi_answers_match_their_schemas(line):
    document = openapi(line)
    gw = make_gateway(line)
    answers = document["paths"][eg.CREATE]["post"]["responses"]
    for body, status in ((valid_body(eg.CREATE, thing_id="db-1"), 200), (valid_body(eg.CREATE), 200),
                         (valid_body(eg.CREATE, status=""), 400),
                         (valid_body(eg.CREATE, password="wrong-pass-1"), 403)):
        result = post(gw, eg.CREATE, body, headers=dict(JSON_HEADERS, **{"Accept-Language": "zh-TW"}))
        assert result[0] == status
        schema = answers[str(status)]["content"]["application/json"]["schema"]
        assert schema_errors(document, schema, result[2]) == [], result[2]
    # A schema that the answers would break is caught by the checker.
    assert schema_errors(document, answers["200"]["content"]["application/json"]["schema"],
                         {"success": True, "data": {"op_id": 1}}) != []


# Each field rule's limit, as its schema must state it (in the unit the rule counts).
# The rules trim strings first, so a character limit is stated as
# x-max-chars-after-trimming and in the pattern, not as maxLength, which would
# refuse a padded value that the rule accepts.
LIMITS = [
    ("password", "x-max-utf8-bytes", eg.PASSWORD_MAX_BYTES),
    ("password", "x-min-utf8-bytes", eg.PASSWORD_MIN_BYTES),
    ("op_id", "x-max-chars-after-trimming", eg.OP_ID_MAX_CHARS),
    ("thing_id", "x-max-chars-after-trimming", eg.THING_ID_MAX_CHARS),
    ("event_id", "x-max-chars-after-trimming", eg.EVENT_ID_MAX_CHARS),
    ("title", "x-max-chars-after-trimming", eg.TITLE_MAX_CHARS),
    ("description", "x-max-chars-after-trimming", eg.DESCRIPTION_MAX_CHARS),
    ("status", "x-max-chars-after-trimming", eg.STATUS_MAX_CHARS),
    ("message", "x-max-chars-after-trimming", eg.MESSAGE_MAX_CHARS),
    ("severity", "enum", list(eg.SEVERITIES)),
    ("event_time", "exclusiveMaximum", eg.MILLISECONDS_BELOW), ("event_time", "minimum", 0),
    ("tags", "maxItems", eg.TAGS_MAX_ITEMS), ("tags.items", "x-max-utf8-bytes", eg.TAG_MAX_BYTES),
    ("images", "maxItems", eg.IMAGES_MAX_ITEMS),
    ("images.items", "x-max-utf8-bytes", eg.IMAGE_MAX_BYTES),
    ("metadata.propertyNames", "x-max-utf8-bytes", eg.METADATA_KEY_MAX_BYTES),
]


def field_schema(document, field):
    schema = document["components"]["schemas"]["CreateRequest"]["properties"]
    name, _, part = field.partition(".")
    node = schema[name] if name != "event_id" else document["components"]["schemas"][
        "UpdateRequest"]["properties"]["event_id"]
    return node[part] if part else node


@pytest.mark.parametrize("field, keyword, limit", LIMITS, ids=lambda v: str(v)[:30])
def test_openapi_states_each_field_rules_limit(field, keyword, limit):
    node = field_schema(openapi("1.3"), field)
    assert node[keyword] == limit
    if keyword.startswith("x-max"):
        assert "%d %s" % (limit, "bytes of UTF-8" if "bytes" in keyword else "characters") in (
            node["description"])


# The pattern of each trimmed field at its boundary: the last value that passes and
# the first that fails, padded as a client may send it; and what the rule decides.
TRIMMED = [("op_id", "o", eg.OP_ID_MAX_CHARS, True), ("thing_id", "t", eg.THING_ID_MAX_CHARS, True),
           ("event_id", "e", eg.EVENT_ID_MAX_CHARS, False),
           ("title", "T", eg.TITLE_MAX_CHARS, False),
           ("description", "d", eg.DESCRIPTION_MAX_CHARS, True),
           ("status", "s", eg.STATUS_MAX_CHARS, False), ("message", "m", eg.MESSAGE_MAX_CHARS, False)]


@pytest.mark.parametrize("field, char, most, optional", TRIMMED, ids=[t[0] for t in TRIMMED])
def test_openapi_patterns_say_what_the_trimming_rule_accepts(field, char, most, optional):
    pattern = field_schema(openapi("1.3"), field)["pattern"]
    route = eg.UPDATE if field == "event_id" else eg.CREATE
    for value, passes in ((" %s \t" % (char * most), True), (char * (most + 1), False),
                          ("%s %s" % (char, char), field not in ("op_id", "thing_id", "event_id")),
                          ("", optional), ("  ", optional)):
        assert bool(re.search(pattern, value)) is passes, (field, value[:20], passes)
        status, _, envelope = post(make_gateway(), route, valid_body(route, **{field: value}))
        refused = status == 400 and envelope["error_code"] in (
            eg.FIELD_CODES[field] + (eg.REQUIRED_FIELDS[route][1],))
        assert refused is not passes, (field, value[:20], status, envelope)


def test_openapi_follows_a_changed_limit(monkeypatch):
    monkeypatch.setattr(eg, "STATUS_MAX_CHARS", 30)
    properties = openapi("1.3")["components"]["schemas"]["UpdateRequest"]["properties"]
    assert properties["status"]["x-max-chars-after-trimming"] == 30
    assert "{0,28}" in properties["status"]["pattern"]


def test_the_readme_and_page_examples_satisfy_the_request_schema():
    readme = read_text(README)
    bodies = [json.loads(text) for text in re.findall(r"-d '(\{.*?\})'", readme, re.S)]
    for line in eg.LINES:
        document = openapi(line)
        schema = {"$ref": "#/components/schemas/CreateRequest"}
        examples = document["paths"][eg.CREATE]["post"]["requestBody"]["content"][
            "application/json"]["examples"]
        # The page shows the document's own example (the API page's), sent now.
        page = dict(examples["milliseconds"]["value"], event_time=1796539184912,
                    started_at=1796539184912)
        for body in bodies + [example["value"] for example in examples.values()] + [page]:
            assert schema_errors(document, schema, body) == [], body
        assert schema_errors(document, schema, dict(page, status="x" * 25)) != []
    assert len(bodies) >= 1 and SEED_CURL_EXAMPLE == examples["seconds"]["value"]
    assert "examples.milliseconds.value" in page_part("script")


def json_differences(left, right, where=""):
    """The places where two JSON documents differ."""
    if isinstance(left, dict) and isinstance(right, dict):
        found = []
        for key in sorted(set(left) | set(right)):
            if key not in left or key not in right:
                found.append(where + "/" + key)
            else:
                found += json_differences(left[key], right[key], where + "/" + key)
        return found
    return [] if left == right else [where]


# Where the two lines' documents may differ, as the table of lines says (V1-V9), and
# the line's own name.
DIFFERENCE_ROWS = [
    ("name", r"^/info/(title|description)$"),
    ("V1", r"^/paths/~thing"),
    ("V2", r"^/paths/~send_status"),
    ("V3", r"^/components/schemas/DispatchAnswer/properties/data/"
           r"(required|properties/(channel_id|thing_id|accepted))$"),
    ("V4", r"^/components/schemas/DispatchAnswer/properties/data/properties/op_id/description$"),
    ("V5", r"^/components/schemas/\w+Request/additionalProperties$"),
    ("V6", r"^/paths/~event/\w+/post/responses/409/"),
    ("V7", r"^/components/schemas/Problem/properties/locale/enum$"),
    ("V7", r"^/components/parameters/Accept-Language/description$"),
    ("V8", r"^/paths/~event/\w+/post/description$"),
    ("V9", r"^/components/schemas/(Create|Update)Request/properties/ended_at$"),
]


def test_the_two_lines_documents_differ_exactly_where_the_lines_do():
    found = json_differences(openapi("1.2"), openapi("1.3"))
    found = [place.replace("/paths//", "/paths/~") for place in found]   # a path's own "/"
    rows = {}
    for place in found:
        matching = [row for row, pattern in DIFFERENCE_ROWS if re.search(pattern, place)]
        assert matching, "the lines' documents differ where no row of the table says: " + place
        rows.setdefault(matching[0], []).append(place)
    assert set(rows) == {row for row, _ in DIFFERENCE_ROWS}


@LOCAL_ONLY
def test_openapi_over_http_and_from_the_command_line():
    for line in eg.LINES:
        gw = make_gateway(line)
        status, headers, payload = gw.handle("GET", "/__admin/openapi.json", {}, None)
        assert status == 200 and dict(headers)["Content-Type"] == "application/json"
        assert json.loads(payload) == json.loads(json.dumps(openapi(line)))
        assert gw.handle("GET", "/__admin/openapi.json", {"Host": "evil.example"}, None)[0] == 403
        result = subprocess.run([sys.executable, SCRIPT, "--openapi", "--gateway-version", line],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0 and json.loads(result.stdout) == json.loads(payload)
    assert '<a id="openapi" href="/__admin/openapi.json">' in eg.PAGE_HTML


@pytest.mark.parametrize("host, server", [
    pytest.param("127.0.0.1:41234", "http://127.0.0.1:41234", id="ip-and-port"),
    pytest.param("[::1]:8666", "http://[::1]:8666", id="ipv6"),
    pytest.param("gateway.localhost", "http://gateway.localhost", id="localhost-name"),
])
def test_openapi_names_the_address_it_was_fetched_from(host, server):
    gw = make_gateway()
    payload = gw.handle("GET", "/__admin/openapi.json", {"Host": host}, None)[2]
    assert json.loads(payload)["servers"] == [{"url": server}]
    absolute = gw.handle("GET", "http://%s/__admin/openapi.json" % host, {}, None)[2]
    assert json.loads(absolute)["servers"] == [{"url": server}]
    assert openapi("1.3")["servers"] == [{"url": "http://127.0.0.1:%d" % eg.DEFAULT_PORT}]


@pytest.mark.parametrize("line", list(eg.LINES))
def test_openapi_declares_accept_language_on_every_operation(line):
    document = openapi(line)
    parameter = document["components"]["parameters"]["Accept-Language"]
    assert (parameter["in"], parameter["name"]) == ("header", "Accept-Language")
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert {"$ref": "#/components/parameters/Accept-Language"} in operation[
                "parameters"], (path, method)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert "Content-Language" in response["headers"], (path, method, status)


# Codes that step 9 makes unreachable on a route: the field is refused before its rule.
UNREACHABLE = [(eg.CREATE, "event_id_required"), (eg.CREATE, "invalid_event_id"),
               (eg.CREATE, "invalid_ended_at"), (eg.UPDATE, "invalid_started_at"),
               (eg.UPDATE, "invalid_ended_at"), (eg.CLOSE, "invalid_started_at")]


@pytest.mark.parametrize("route, code", UNREACHABLE, ids=["%s-%s" % pair for pair in UNREACHABLE])
def test_openapi_lists_no_code_a_route_cannot_reach(route, code):
    for line in eg.LINES:
        assert code not in eg.route_codes(eg.LINES[line], route, "POST")
    # ... and indeed the route never answers it: the field is refused at step 9 first.
    field = "event_id" if "event_id" in code else code.split("_", 1)[1]
    for value in ("", "x" * 200, -1, "bad value"):
        gw = make_gateway()
        answer = post(gw, route, valid_body(route, **{field: value}))
        assert answer[0] != 200 and answer[2]["error_code"] != code
    reachable = {eg.CLOSE: "invalid_ended_at", eg.UPDATE: "invalid_event_id"}
    for action, listed in reachable.items():
        assert listed in eg.route_codes(eg.LINES["1.3"], action, "POST")


# Robustness: no input gets a 5xx ##################################################

ODD_VALUES = [None, True, False, 0, -1, -0.0, 10 ** 30, 1.5, "", " ", "x" * 3000,
              "\U0001F600", "e\u0301\u0301\u0301", "\u0000", [], [None], {}, {"": None},
              {"a": {"b": {"c": []}}}, ["\U0001F600"] * 40, 10 ** 12, "NaN"]
RAW_TOKENS = [b"1e400", b"-1e400", b"-0.0", b'"\\ud800"', b'"\\udc00x"', b'"\\u0000"',
              b"[" * 5000 + b"]" * 5000, b"1" * 5000, b'"\\ud83d\\ude00"']
ODD_CONTENT_TYPES = [None, "application/json", "application/json; charset=latin-1",
                     "text/plain", "APPLICATION/JSON", "application/json;;;", "", "*/*"]


def mutate(rng, route, event_id):
    """One random request: a valid body of route with one to three mutations."""
    body = valid_body(route, event_id=event_id) if route != eg.CREATE else valid_body(route)
    keys = list(body)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        key = rng.choice(keys)
        if kind == 0:
            body.pop(key, None)                                       # drop a key
        elif kind == 1:
            body[key + rng.choice(["", "_x", "\u00e9"])] = body.get(key)   # rename/duplicate
        elif kind == 2:
            body[key] = rng.choice(ODD_VALUES)                        # swap a type
        elif kind == 3:
            body[rng.choice(["tags", "images", "attrs", "metadata"])] = rng.choice(ODD_VALUES)
        elif kind == 4:
            body[key] = rng.choice([body.get(key), [body.get(key)], {"k": body.get(key)}])
        else:
            body["op_id"] = rng.choice(["op-1", "op-2", "", None, 5])
    data = json.dumps(body).encode()
    damage = rng.randrange(8)
    if damage == 0:
        data = data[:rng.randrange(len(data))]                          # truncated
    elif damage == 1:
        index = rng.randrange(len(data))                                # a byte flipped
        data = data[:index] + bytes([data[index] ^ (1 << rng.randrange(8))]) + data[index + 1:]
    elif damage == 2:
        data = data[:-1] + b', "title": ' + rng.choice(RAW_TOKENS) + b"}"  # raw JSON token
    elif damage == 3:
        data = data.replace(b'"', b'"\xff', 1)                          # invalid UTF-8
    elif damage == 4:
        data = data.replace(b"}", b', "title": "x", "title": "y"}', 1)  # a repeated key
    content_type = rng.choice(ODD_CONTENT_TYPES) if rng.random() < 0.2 else "application/json"
    headers = {} if content_type is None else {"Content-Type": content_type}
    return headers, data


@LOCAL_ONLY
def test_random_mutations_never_get_a_5xx():
    import io
    import random
    rng = random.Random(20261126)
    log = io.StringIO()
    gw = eg.EventGateway(token="fuzz-t0ken", log=log)
    auth = {"Authorization": "Bearer fuzz-t0ken"}
    event_ids = []
    headers = dict(JSON_HEADERS, **auth)
    for _ in range(3):
        status, _, payload = gw.handle("POST", eg.CREATE, headers,
                                       json.dumps(valid_body(eg.CREATE)).encode())
        event_ids.append(json.loads(payload)["data"]["event_id"])
    statuses = set()
    for _ in range(3000):
        route = rng.choice(eg.EVENT_ROUTES)
        request_headers, data = mutate(rng, route, rng.choice(event_ids))
        request_headers.update(auth)
        status, response_headers, payload = gw.handle("POST", route, request_headers, data)
        envelope = assert_envelope(status, response_headers, payload)
        assert status < 500, (data, envelope)
        assert PASSWORD.encode() not in payload and b"fuzz-t0ken" not in payload
        statuses.add(status)
    assert gw.internal_errors == []
    assert {200, 400, 404, 409} <= statuses          # the mutations reach deep into the rules
    assert "fuzz-t0ken" not in log.getvalue() and PASSWORD not in log.getvalue()


def test_thousands_of_concurrent_creates_lose_nothing(gw):
    def send(i):
        ids = []
        for j in range(200):
            body = valid_body(eg.CREATE, op_id="t%d-%d" % (i, j))
            status, _, payload = gw.handle("POST", eg.CREATE, JSON_HEADERS,
                                           json.dumps(body).encode())
            assert status == 200
            ids.append(json.loads(payload)["data"]["event_id"])
        return ids

    results = run_threads(16, send)
    ids = [event_id for batch in results for event_id in batch]
    assert len(ids) == len(set(ids)) == 3200
    assert len(gw.events()) == 3200


# Conformance mode #################################################################

def run_conformance(url, token=None, selection="healthz"):
    env = dict(os.environ, EVENT_GATEWAY_URL=url)
    env.pop("EVENT_GATEWAY_TOKEN", None)
    if token:
        env["EVENT_GATEWAY_TOKEN"] = token
    # --assert=plain: rewriting this file's asserts would cost each run seconds (no
    # bytecode cache where PYTHONDONTWRITEBYTECODE is set); a failure still names its test.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "--assert=plain", os.path.abspath(__file__), "-k", selection],
                          capture_output=True, text=True, timeout=60, env=env,
                          cwd=os.path.dirname(SCRIPT))


# What a conformance run checks: the answers the two lines give differently, and the
# tests that write requests byte by byte (they must carry the token too).
CONFORMANCE_SELECTION = ("line or order or locale or field_rule or envelope or conflict or "
                         "probes or head or tab or whitespace or keep_alive or expect")


@LOCAL_ONLY
@pytest.mark.parametrize("line, token", [("1.2", "conformance-t0ken"), ("1.3", None)],
                         ids=["line-1.2-with-a-token", "line-1.3"])
def test_conformance_mode_checks_a_server_of_each_line(line, token):
    with eg.serve_in_thread(eg.EventGateway(gateway_version=line, token=token)) as served:
        result = run_conformance(served.url, token, selection=CONFORMANCE_SELECTION)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = int(re.search(r"(\d+) passed", output).group(1))
    skipped_other_line = len(re.findall(r"runs line", output))
    assert passed > 150 and skipped_other_line == 0, output


@LOCAL_ONLY
def test_conformance_mode_says_once_when_the_server_does_not_answer():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = run_conformance("http://127.0.0.1:%d" % port)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and output.count("does not answer") == 1, output
    assert "passed" not in output


@LOCAL_ONLY
def test_conformance_mode_says_once_that_a_token_is_needed():
    with eg.serve_in_thread(eg.EventGateway(token="conformance-t0ken")) as served:
        result = run_conformance(served.url)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and output.count("EVENT_GATEWAY_TOKEN") == 1, output
        # With the token the run passes: the test of the lines above, with line 1.2.


# The README's examples ############################################################

README = os.path.join(os.path.dirname(SCRIPT), "README.md")


def readme_files():
    """The README's Python blocks that begin with "# NAME.py", as {NAME.py: text}."""
    text = read_text(README)
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        match = re.match(r"# (\w+\.py)\b", block)
        if match:
            files[match.group(1)] = block
    return files


def run_readme_tests(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "event_gateway.py").write_bytes(read_bytes(SCRIPT))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))


@LOCAL_ONLY
def test_readme_examples_pass_as_written(tmp_path):
    files = readme_files()
    assert {"pushgo_client.py", "conftest.py", "test_my_client.py"} <= set(files)
    result = run_readme_tests(tmp_path, files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b10 passed\b", result.stdout), result.stdout     # 5 tests x 2 lines


@LOCAL_ONLY
def test_readme_examples_fail_a_client_that_changes_its_op_id_on_retry(tmp_path):
    files = readme_files()
    marker = "        for attempt in range(self.retries + 1):\n"
    assert marker in files["pushgo_client.py"]
    files["pushgo_client.py"] = files["pushgo_client.py"].replace(
        marker, marker + '            body["op_id"] = uuid.uuid4().hex     # the bug\n')
    result = run_readme_tests(tmp_path, files)
    assert result.returncode == 1
    failed = set(re.findall(r"FAILED test_my_client.py::(\w+)", result.stdout))
    assert failed == {"test_client_retries_a_503_with_the_same_op_id",
                      "test_client_survives_a_lost_answer"}, result.stdout


@LOCAL_ONLY
def test_readme_ceiling_answers_a_create_as_the_gateway_does(tmp_path):
    # The performance section's ceiling, run as written: same reply size, keep-alive.
    path = tmp_path / "ceiling.py"
    path.write_text(readme_files()["ceiling.py"], encoding="utf-8")
    ceiling = subprocess.Popen([sys.executable, str(path), "0"], stdout=subprocess.PIPE,
                               text=True)
    try:
        url = re.search(r"http://\S+", ceiling.stdout.readline()).group(0).rstrip("/")
        conn = http_connection(url, 5)
        sizes = []
        for _ in range(2):          # the second request rides the same connection
            conn.request("POST", eg.CREATE, CREATE_BYTES, HTTP_HEADERS)
            response = conn.getresponse()
            assert response.status == 200 and not response.will_close
            sizes.append(len(response.read()))
        gateway = eg.EventGateway()
        created = gateway.handle("POST", eg.CREATE, JSON_HEADERS, CREATE_BYTES)[2]
        assert sizes == [len(created)] * 2
    finally:
        ceiling.terminate()
        ceiling.wait(timeout=10)
        ceiling.stdout.close()


@LOCAL_ONLY
def test_every_error_code_is_expected_by_some_test():
    # Guards the tables: a code added to ERRORS needs a test that expects it by name.
    source = read_text(__file__)
    source = source[:source.index("def test_every_error_code_is_expected_by_some_test")]
    missing = [code for code in eg.ERRORS if '"%s"' % code not in source]
    assert not missing, "no test names these codes: %s" % missing

"""The web page's security and input checks with Flask's test client, against a real retrieval
server in this process (production gRPC wiring, bearer tokens): CSRF tokens and Origin checks,
server-side sessions (cookie attributes, sign-out, expiry, a bounded table), the bounded client
cache, local `next` redirects, security headers, and a 4xx with a message for every bad input
(JSON under /api/). What only a browser does (framing, cross-origin form posts, URL normalisation,
the content security policy) is in test_browser.py."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import url_for
from PIL import Image

from moco_retrieval.labels import MAX_LABEL_CHARS
from retrieval_client import RetrievalClient, RetrievalError, UpsertItem
from retrieval_client.labels import MEDIA_TYPES, label_rows, write_labels
from retrieval_server.config import ServerConfig
from retrieval_web.app import SECURE_COOKIE, create_app, local_path
from retrieval_web.cli import main as cli_main
from retrieval_web.sessions import Clients, SessionTable
from retrieval_web.thumbnails import ThumbnailRefused, resolve
from tests.retrieval_server.calls import InProcess
from tests.server_harness import make_export

TOKEN, READ_ONLY = "full-token", "read-token"
HOST = "http://localhost"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server with tokens holding items i0..i5 (uri: PNG files under two image roots) and the
    tricky ones the audit found (uri with NUL, uri longer than the OS allows)."""
    root = tmp_path_factory.mktemp("webapp")
    first, second = root / "first", root / "second"
    first.mkdir()
    second.mkdir()
    for n in range(6):
        Image.new("RGB", (40, 40), (40 * n, 0, 0)).save((first if n < 3 else second) / f"i{n}.png")
    server = InProcess(
        ServerConfig(
            model=make_export(root),
            store=root / "store",
            port=0,
            metrics_port=0,
            auth_token=TOKEN,
            read_only_token=READ_ONLY,
        )
    )
    address = f"127.0.0.1:{server.grpc.port}"
    client = RetrievalClient(address, token=TOKEN, timeout=60)
    vectors = client.embed([(first / "i0.png").read_bytes()])
    uris = {f"i{n}": f"i{n}.png" for n in range(6)}  # relative: under whichever root holds them
    uris |= {"nul": str(first / "i0\0.png"), "long": str(first / ("x" * 5000 + ".png")), "deep": "a/" * 3000 + "b.png"}
    client.upsert_many([UpsertItem(i, embedding=vectors[0], metadata={"uri": u}) for i, u in uris.items()])
    yield {"server": server, "address": address, "client": client, "roots": [first, second]}
    client.close()
    server.close()


def make(world, token: str | None = TOKEN, **kwargs):
    app = create_app(world["address"], token=token, image_roots=world["roots"], **kwargs)
    app.testing = True
    return app


@pytest.fixture
def app(world):
    """A page started with the service's token (no sign-in; the CSRF attacks need no cookie)."""
    app = make(world)
    yield app
    app.extensions["retrieval_clients"].close()


@pytest.fixture
def signin_app(world):
    """A page without a token: sign in first."""
    app = make(world, token=None)
    yield app
    app.extensions["retrieval_clients"].close()


def csrf_of(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)">', html).group(1)


def page_csrf(browser, path: str = "/") -> str:
    reply = browser.get(path)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return csrf_of(reply.get_data(as_text=True))


def post_json(browser, path: str, body, csrf: str | None, origin: str | None = HOST, **headers):
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    if origin is not None:
        headers["Origin"] = origin
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers.setdefault("Content-Type", "application/json")
    return browser.post(path, data=data, headers=headers)


def label_of(world, item_id: str) -> str:
    return world["client"].get([item_id])[0].label


def sign_in(browser, token: str = TOKEN, next_: str | None = None, **headers):
    csrf = page_csrf(browser, "/sign-in")
    url = "/sign-in" + (f"?next={next_}" if next_ is not None else "")
    return browser.post(url, data={"token": token, "csrf_token": csrf}, headers={"Origin": HOST, **headers})


# -- CSRF ------------------------------------------------------------------------------------------
def test_a_write_needs_the_sessions_csrf_token(app, world):
    browser = app.test_client()
    csrf = page_csrf(browser)
    for body, token, status, error in [
        ({"labels": {"i1": "cat"}}, None, 403, "CSRF"),
        ({"labels": {"i1": "cat"}}, "forged", 403, "CSRF"),
        ({"ids": ["i1"]}, None, 403, "CSRF"),
    ]:
        path = "/api/labels" if "labels" in body else "/api/reject"
        reply = post_json(browser, path, body, token)
        assert (reply.status_code, reply.json["error"]) == (status, error) and "CSRF token" in reply.json["message"]
    assert label_of(world, "i1") == ""
    # another browser's token is no good either: the token belongs to a session
    other = app.test_client()
    assert post_json(other, "/api/labels", {"labels": {"i1": "cat"}}, csrf).status_code == 403
    reply = post_json(browser, "/api/labels", {"labels": {"i1": "cat"}}, csrf)
    assert reply.status_code == 200 and reply.json == {"updated": 1} and label_of(world, "i1") == "cat"
    assert post_json(browser, "/api/labels", {"labels": {"i1": ""}}, csrf).json == {"updated": 1}


def test_json_is_taken_as_application_json_only(app, world):
    """The text/plain body of an auto-submitted form or a no-cors fetch is refused, even with the
    right token (the audit's page was parsed as JSON whatever its type)."""
    browser = app.test_client()
    csrf = page_csrf(browser)
    body = json.dumps({"labels": {"i1": "cat"}})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
        reply = post_json(browser, "/api/labels", body, csrf, **{"Content-Type": content_type})
        assert reply.status_code == 415 and "application/json" in reply.json["message"], content_type
    reply = post_json(browser, "/api/labels", body, csrf, **{"Content-Type": "application/json; charset=utf-8"})
    assert reply.status_code == 200
    post_json(browser, "/api/labels", {"labels": {"i1": ""}}, csrf)
    assert label_of(world, "i1") == ""


@pytest.mark.parametrize(
    ("origin", "referer"),
    [
        ("http://127.0.0.1:9999", None),  # another port of the same site
        ("http://evil.example", None),
        ("null", None),  # a sandboxed frame, a data: URL
        ("https://localhost", None),  # another scheme
        (None, "http://evil.example/page"),
    ],
)
def test_a_write_from_another_origin_is_refused_even_with_the_token(app, world, origin, referer):
    browser = app.test_client()
    csrf = page_csrf(browser)
    headers = {"Referer": referer} if referer else {}
    reply = post_json(browser, "/api/labels", {"labels": {"i1": "cat"}}, csrf, origin=origin, **headers)
    assert (reply.status_code, reply.json["error"]) == (403, "CROSS_ORIGIN")
    assert label_of(world, "i1") == ""


def test_a_write_without_origin_or_referer_needs_only_the_token(app, world):
    """Some privacy settings drop both headers; the CSRF token alone still protects the write."""
    browser = app.test_client()
    csrf = page_csrf(browser)
    reply = post_json(browser, "/api/labels", {"labels": {"i1": "cat"}}, csrf, origin=None, Referer=HOST + "/label")
    assert reply.status_code == 200
    assert post_json(browser, "/api/labels", {"labels": {"i1": ""}}, csrf, origin=None).status_code == 200


def test_forms_carry_the_csrf_token_and_the_upload_search_needs_it(app, world):
    browser = app.test_client()
    html = browser.get("/search").get_data(as_text=True)
    csrf = csrf_of(html)
    assert f'name="csrf_token" value="{csrf}"' in html
    image = (world["roots"][0] / "i0.png").read_bytes()

    def upload(fields):
        return browser.post("/search", data={**fields, "image": (io.BytesIO(image), "q.png")}, headers={"Origin": HOST})

    assert upload({}).status_code == 403
    reply = upload({"csrf_token": csrf})
    assert reply.status_code == 200 and "Most similar to the uploaded q.png" in reply.get_data(as_text=True)


# -- sign-in, sessions, cookies --------------------------------------------------------------------
def test_sign_in_needs_the_csrf_token_and_the_same_origin(signin_app):
    """Login CSRF: a cross-origin sign-in (the attacker's own token) sets no session."""
    sessions = signin_app.extensions["retrieval_sessions"]
    browser = signin_app.test_client()
    csrf = page_csrf(browser, "/sign-in")
    assert browser.post("/sign-in", data={"token": TOKEN}, headers={"Origin": HOST}).status_code == 403
    reply = browser.post(
        "/sign-in", data={"token": TOKEN, "csrf_token": csrf}, headers={"Origin": "http://evil.example"}
    )
    assert reply.status_code == 403
    fresh = signin_app.test_client()  # no cookie at all, as a cross-site form post sends none
    assert fresh.post("/sign-in", data={"token": TOKEN, "csrf_token": csrf}).status_code == 403
    assert sessions.counts()[0] == 0
    assert browser.get("/").status_code == 302  # still not signed in


def test_sign_in_checks_the_token_with_the_service(signin_app):
    sessions = signin_app.extensions["retrieval_sessions"]
    browser = signin_app.test_client()
    reply = sign_in(browser, "wrong-token")
    assert reply.status_code == 401 and "refused this token" in reply.get_data(as_text=True)
    for bad in ("", "tok\x00en", "tök", "x" * 5000):
        reply = sign_in(browser, bad)
        assert reply.status_code == 400 and "printable ASCII" in reply.get_data(as_text=True), bad
    assert sessions.counts()[0] == 0 and len(signin_app.extensions["retrieval_clients"]) <= 1
    assert sign_in(browser, READ_ONLY).status_code == 303
    html = browser.get("/label").get_data(as_text=True)
    assert 'id="read-only"' in html and 'class="actions"' not in html and 'id="sign-out"' in html


def test_the_cookie_holds_an_opaque_id_only_with_strict_attributes(signin_app):
    browser = signin_app.test_client()
    browser.get("/sign-in")
    anonymous = browser.get_cookie("moco_session").value  # before sign-in: a CSRF token only
    reply = sign_in(browser)
    assert reply.status_code == 303
    (cookie,) = reply.headers.getlist("Set-Cookie")
    assert anonymous not in cookie  # a new id at sign-in: a planted (fixed) id is worth nothing
    name, value = cookie.split(";")[0].split("=", 1)
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert name == "moco_session" and {"httponly", "samesite=strict", "path=/"} <= attributes
    assert "secure" not in attributes  # plain http on 127.0.0.1: a Secure cookie would not come back
    assert TOKEN not in cookie and re.fullmatch(r"[A-Za-z0-9_-]{43}", value)  # 256 random bits, nothing else
    session = signin_app.extensions["retrieval_sessions"].get(value)
    assert session.token == TOKEN and session.id == value


def test_the_cookie_is_secure_over_tls_and_behind_a_tls_proxy(world):
    app = make(world, token=None)
    browser = app.test_client()
    reply = browser.get("/sign-in", base_url="https://localhost")
    assert reply.headers["Set-Cookie"].startswith(f"{SECURE_COOKIE}=") and "Secure" in reply.headers["Set-Cookie"]
    behind = make(world, token=TOKEN, behind_tls=True)
    browser = behind.test_client()
    reply = browser.get("/")
    assert "Secure" in reply.headers["Set-Cookie"] and reply.headers["Set-Cookie"].startswith(SECURE_COOKIE)
    csrf = csrf_of(reply.get_data(as_text=True))
    # behind the proxy the page's origin is https (X-Forwarded-Proto believed, https when absent)
    assert post_json(browser, "/api/labels", {"labels": {}}, csrf, origin="https://localhost").status_code == 200
    assert post_json(browser, "/api/labels", {"labels": {}}, csrf, origin="http://localhost").status_code == 403
    forwarded = {"X-Forwarded-Proto": "http"}
    assert (
        post_json(browser, "/api/labels", {"labels": {}}, csrf, origin="http://localhost", **forwarded).status_code
        == 200
    )
    # without the flag the header is ignored: the page is http, whatever a request says
    plain = make(world, token=TOKEN).test_client()
    csrf = page_csrf(plain)
    forwarded = {"X-Forwarded-Proto": "https"}
    assert (
        post_json(plain, "/api/labels", {"labels": {}}, csrf, origin="https://localhost", **forwarded).status_code
        == 403
    )
    assert "Secure" not in (plain.get("/").headers.get("Set-Cookie") or "")


def test_sign_out_ends_the_session_on_the_server(signin_app):
    browser = signin_app.test_client()
    sign_in(browser)
    copied = browser.get_cookie("moco_session").value
    csrf = page_csrf(browser)
    assert browser.post("/sign-out", headers={"Origin": HOST}).status_code == 403  # CSRF here too
    assert browser.get("/sign-out").status_code == 405
    reply = browser.post("/sign-out", data={"csrf_token": csrf}, headers={"Origin": HOST})
    assert reply.status_code == 303 and reply.headers["Location"].endswith("/sign-in")
    thief = signin_app.test_client()
    thief.set_cookie("moco_session", copied)
    assert thief.get("/").status_code == 302  # to the sign-in page: the copied cookie is worth nothing
    assert post_json(thief, "/api/labels", {"labels": {"i1": "x"}}, csrf).status_code == 403
    assert signin_app.extensions["retrieval_sessions"].counts()[0] == 0


def test_sessions_expire_when_idle_and_after_their_lifetime(world):
    now = [0.0]
    app = make(world, token=None, session_idle_s=60, session_lifetime_s=300, clock=lambda: now[0])
    browser = app.test_client()
    sign_in(browser)
    for t in (50, 100, 150, 200, 250, 299):  # active: idle time never reached, lifetime not yet
        now[0] = t
        assert browser.get("/").status_code == 200, t
    now[0] = 301
    assert browser.get("/").status_code == 302  # absolute lifetime over, active or not
    sign_in(browser)
    now[0] += 61
    assert browser.get("/").status_code == 302  # idle too long


def test_the_session_table_is_bounded(world):
    app = make(world, token=None, max_sessions=3)
    sessions = app.extensions["retrieval_sessions"]
    browsers = [app.test_client() for _ in range(5)]
    for browser in browsers:
        assert sign_in(browser).status_code == 303
    assert sessions.counts()[0] == 3
    assert browsers[0].get("/").status_code == 302 and browsers[-1].get("/").status_code == 200
    for _ in range(20):  # anonymous visitors (no valid token) push out anonymous sessions only
        app.test_client().get("/sign-in")
    assert sessions.counts() == (3, 3)
    assert browsers[-1].get("/").status_code == 200


def test_session_table_unit():
    now = [0.0]
    table = SessionTable(idle_s=10, lifetime_s=100, max_sessions=2, clock=lambda: now[0])
    a, b = table.new("t"), table.new("t")
    assert a.id != b.id and a.csrf != b.csrf and table.get(a.id) is a
    c = table.new("t")  # full: b, the least recently used, goes
    assert table.get(b.id) is None and table.get(a.id) is a and table.get(c.id) is c
    table.end(a.id)
    assert table.get(a.id) is None and table.get(None) is None and table.get("") is None
    with pytest.raises(ValueError):
        SessionTable(idle_s=0)


def open_channel(client: RetrievalClient) -> bool:
    """Whether the client's channel still makes calls (a refused token is an answer too)."""
    try:
        client.info()
    except ValueError:  # grpc: "Cannot invoke RPC on closed channel!"
        return False
    except RetrievalError:
        pass
    return True


def test_the_client_cache_is_bounded_and_closes_evicted_channels(world):
    clients = Clients(world["address"], False, max_clients=2)
    a = clients.acquire("a")
    clients.release(a)
    b = clients.acquire("b")  # still held by a request when evicted: closed once released
    c = clients.acquire("c")
    assert len(clients) == 2 and not open_channel(a)
    d = clients.acquire("d")
    assert len(clients) == 2 and open_channel(b)
    clients.release(b)
    assert not open_channel(b) and open_channel(c) and open_channel(d)
    assert clients.acquire("c") is c and clients.acquire(TOKEN) is not None and len(clients) == 2
    clients.close()
    assert not open_channel(c)


def test_sign_in_attempts_do_not_grow_the_client_cache(signin_app):
    """The audit's page kept one client per distinct token forever; wrong tokens now leave none."""
    browser = signin_app.test_client()
    for n in range(40):
        assert sign_in(browser, f"guess-{n}").status_code == 401
    assert len(signin_app.extensions["retrieval_clients"]) <= 1


# -- redirects -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/x",
        "//evil.example/x",
        "/\\evil.example/x",
        "\\\\evil.example",
        "/\t/evil.example",
        "http:/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "",
    ],
)
def test_next_is_limited_to_local_paths(signin_app, target):
    assert local_path(target) is None
    browser = signin_app.test_client()
    reply = sign_in(browser, next_=quote(target, safe=""))
    assert reply.status_code == 303 and reply.headers["Location"] == "/"


def test_next_keeps_a_local_path(signin_app):
    browser = signin_app.test_client()
    reply = browser.get("/label?n=3")
    assert reply.status_code == 302 and reply.headers["Location"] == "/sign-in?next=/label?n%3D3"
    reply = sign_in(browser, next_="/label?n%3D3")
    assert reply.headers["Location"] == "/label?n=3"


# -- headers ---------------------------------------------------------------------------------------
def test_every_reply_carries_the_security_headers(app):
    browser = app.test_client()
    for path in ("/", "/review", "/static/app.js", "/thumb?id=i0", "/nope"):
        reply = browser.get(path)
        headers = reply.headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert (
            "script-src 'self'" in headers["Content-Security-Policy"]
            and "unsafe" not in headers["Content-Security-Policy"]
        )
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "same-origin"
    reply = post_json(browser, "/api/labels", {}, None)
    assert reply.headers["X-Frame-Options"] == "DENY" and reply.headers["Cache-Control"] == "no-store"


def test_a_host_name_the_page_does_not_answer_to_is_refused(world):
    """DNS rebinding: evil.example resolving to 127.0.0.1 reaches the page with its own Host."""
    app = make(world, allowed_hosts=["127.0.0.1", "localhost"])
    assert app.test_client().get("/", base_url="http://evil.example:8080").status_code == 400
    assert app.test_client().get("/", base_url="http://localhost:8080").status_code == 200


# -- every bad input is a 4xx with a message -------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/search?k=99999999999", "k must be from 1 to 500"),
        ("/search?k=0", "k must be"),
        ("/search?k=abc", "whole number"),
        ("/search?id=" + "x" * 600, "1 to 512 bytes"),
        ("/label?n=-1", "n must be"),
        ("/label?n=99999999999", "n must be"),
        ("/label?seed=-1", "seed must be"),
        ("/label?seed=1e99", "whole number"),
        ("/review?threshold=nan", "threshold"),
        ("/review?threshold=2", "threshold"),
        ("/duplicates?min_score=0", "min_score"),
        ("/duplicates?min_score=inf", "min_score"),
        ("/thumb", "1 to 512 bytes"),
        ("/thumb?id=" + "y" * 600, "1 to 512 bytes"),
        ("/review?low=2", "low must be in"),
        ("/review?low=0.8&high=0.2", "must not be above high"),
        ("/review?order=up", "order must be one of lowest, highest"),
        ("/review?show=mine", "show must be one of open, decided, all"),
        ("/review?per_page=0", "per_page must be from 1 to 200"),
        ("/review?per_page=100000", "per_page must be"),
        ("/review?after=abc", "after must be a number"),
        ("/review?after=0.5", "the id of after must be 1 to 512 bytes"),
        ("/review?before=nan%20i1", "before must be in"),
        ("/review?label=c%00t", "control character"),
        ("/search?min_score=2", "min_score must be in [-1.0, 1.0]"),
        ("/search?meta=novalue", "key=value"),
        ("/search?meta==v", "key=value"),
        ("/search?" + "&".join(f"meta=k{n}=v" for n in range(9)), "at most 8 metadata filters"),
        ("/search?meta=k=" + "v" * 2000, "at most 1000 printable characters"),
        ("/search?label=%20%20", "blank"),
        ("/search?upload=1", "upload it again"),
        ("/api/review/count", "threshold must be a number"),
        ("/api/review/count?threshold=0.5&low=x", "low must be a number"),
    ],
)
def test_a_bad_query_parameter_is_a_400_page(app, path, words):
    reply = app.test_client().get(path)
    assert reply.status_code == 400 and words in reply.get_data(as_text=True), reply.get_data(as_text=True)[-500:]


@pytest.mark.parametrize("item_id", ["nul", "long", "deep", "unknown"])
def test_a_thumbnail_that_cannot_be_read_is_a_404(app, item_id):
    reply = app.test_client().get(f"/thumb?id={item_id}")
    assert reply.status_code == 404


ACCEPT_ABOVE = {"threshold": 0.5, "label": "", "low": 0.0, "high": 1.0, "snapshot": 1}
LABEL_CASES = {  # path and body of a JSON write -> status, words of the message
    "list-body": ("/api/labels", "[1, 2]", 400, "JSON object"),
    "not-json": ("/api/labels", "{labels", 400, "not valid JSON"),
    "deeply-nested": ("/api/labels", "[" * 100_000 + "]" * 100_000, 400, "not valid JSON"),
    "bad-utf8": ("/api/labels", b'{"labels": {"i1": "\xff"}}', 400, "not valid JSON"),
    "no-labels": ("/api/labels", "{}", 400, "exactly the fields labels"),
    "extra-field": ("/api/labels", '{"labels": {}, "predicted": true}', 400, "exactly the fields"),
    "labels-a-list": ("/api/labels", '{"labels": [["i1", "cat"]]}', 400, "JSON object of id: label"),
    "labels-a-string": ("/api/labels", '{"labels": "cat"}', 400, "JSON object"),
    "label-null": ("/api/labels", '{"labels": {"i1": null}}', 400, "must be a string, not null"),
    "label-number": ("/api/labels", '{"labels": {"i1": 3}}', 400, "must be a string, not int"),
    "label-object": ("/api/labels", '{"labels": {"i1": {"a": 1}}}', 400, "must be a string"),
    "label-lone-surrogate": ("/api/labels", '{"labels": {"i1": "\\ud800"}}', 400, "lone surrogate"),
    "id-lone-surrogate": ("/api/labels", '{"labels": {"\\udc00": "cat"}}', 400, "not valid Unicode"),
    "label-whitespace": ("/api/labels", '{"labels": {"i1": " \\t "}}', 400, "blank"),
    "label-nul": ("/api/labels", '{"labels": {"i1": "c\\u0000t"}}', 400, "control character"),
    "label-newline": ("/api/labels", '{"labels": {"i1": "c\\nt"}}', 400, "control character"),
    "label-huge": ("/api/labels", json.dumps({"labels": {"i1": "x" * 100_000}}), 400, "at most 200 characters"),
    "id-empty": ("/api/labels", '{"labels": {"": "cat"}}', 400, "1 to 512 bytes"),
    "id-unknown": ("/api/labels", '{"labels": {"nope": "cat"}}', 404, "nope"),
    "too-many": ("/api/reject", json.dumps({"ids": [f"i{n}" for n in range(10_001)]}), 400, "at most 10000 ids"),
    "ids-a-string": ("/api/reject", '{"ids": "i1"}', 400, "JSON list"),
    "ids-an-object": ("/api/reject", '{"ids": {"i1": 1}}', 400, "JSON list"),
    "ids-numbers": ("/api/reject", '{"ids": [1, 2]}', 400, "must be a string"),
    "ids-null": ("/api/reject", '{"ids": null}', 400, "JSON list"),
    "delete-empty": ("/api/delete", '{"ids": []}', 400, "non-empty JSON list"),
    "delete-a-string": ("/api/delete", '{"ids": "i1"}', 400, "non-empty JSON list"),
    "delete-too-many": ("/api/delete", json.dumps({"ids": [f"x{n}" for n in range(10_001)]}), 400, "at most 10000"),
    "delete-extra-field": ("/api/delete", '{"ids": ["i1"], "all": true}', 400, "exactly the fields ids"),
    "delete-id-number": ("/api/delete", '{"ids": [7]}', 400, "must be a string"),
    "skip-not-bool": ("/api/skipped", '{"ids": ["i1"], "skipped": 1}', 400, "true or false"),
    "skip-ids-object": ("/api/skipped", '{"ids": {"i1": 1}, "skipped": true}', 400, "JSON list"),
    "skip-too-many": ("/api/skipped", json.dumps({"ids": ["i1"] * 501, "skipped": True}), 400, "at most 500"),
    "skip-no-flag": ("/api/skipped", '{"ids": []}', 400, "exactly the fields ids, skipped"),
    "clear-with-fields": ("/api/skipped/clear", '{"all": true}', 400, "exactly the fields (none)"),
    "recompute-no-labels": ("/api/review/recompute", "{}", 409, "no human labels"),
    "accept-no-snapshot": ("/api/review/accept-above", json.dumps(ACCEPT_ABOVE), 409, "no proposals computed"),
    "accept-threshold-text": (
        "/api/review/accept-above",
        json.dumps(ACCEPT_ABOVE | {"threshold": "x"}),
        400,
        "threshold must be a number",
    ),
    "accept-threshold-bool": (
        "/api/review/accept-above",
        json.dumps(ACCEPT_ABOVE | {"threshold": True}),
        400,
        "threshold must be a number",
    ),
    "accept-threshold-2": (
        "/api/review/accept-above",
        json.dumps(ACCEPT_ABOVE | {"threshold": 2}),
        400,
        "threshold must be in",
    ),
    "accept-label-number": (
        "/api/review/accept-above",
        json.dumps(ACCEPT_ABOVE | {"label": 5}),
        400,
        "label must be a string",
    ),
    "accept-label-blank": ("/api/review/accept-above", json.dumps(ACCEPT_ABOVE | {"label": " "}), 400, "blank"),
    "accept-low-above-high": (
        "/api/review/accept-above",
        json.dumps(ACCEPT_ABOVE | {"low": 0.9, "high": 0.1}),
        400,
        "must not be above",
    ),
    "accept-snapshot-text": (
        "/api/review/accept-above",
        json.dumps(ACCEPT_ABOVE | {"snapshot": "1"}),
        400,
        "snapshot must be the number",
    ),
    "accept-missing-field": ("/api/review/accept-above", '{"threshold": 0.5}', 400, "exactly the fields"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_a_bad_write_is_a_json_4xx_and_changes_nothing(app, world, case):
    path, body, status, words = LABEL_CASES[case]
    browser = app.test_client()
    before = world["client"].info()
    reply = post_json(browser, path, body, page_csrf(browser))
    assert reply.status_code == status and reply.is_json, reply.get_data(as_text=True)[:300]
    assert words in reply.json["message"] and reply.json["error"], reply.json
    after = world["client"].info()
    assert (after.labelled_count, after.predicted_count) == (before.labelled_count, before.predicted_count)


def test_a_label_is_trimmed_then_stored_and_empty_clears(app, world):
    browser = app.test_client()
    csrf = page_csrf(browser)
    assert post_json(browser, "/api/labels", {"labels": {"i2": "  tabby cat \t"}}, csrf).json == {"updated": 1}
    assert label_of(world, "i2") == "tabby cat"
    long = "é" * MAX_LABEL_CHARS
    assert post_json(browser, "/api/labels", {"labels": {"i2": f" {long} "}}, csrf).status_code == 200
    assert label_of(world, "i2") == long
    assert post_json(browser, "/api/labels", {"labels": {"i2": ""}}, csrf).json == {"updated": 1}
    assert label_of(world, "i2") == ""


def test_the_service_errors_of_a_write_keep_their_meaning(signin_app, world):
    browser = signin_app.test_client()
    sign_in(browser, READ_ONLY)
    reply = post_json(browser, "/api/labels", {"labels": {"i1": "cat"}}, page_csrf(browser))
    assert (reply.status_code, reply.json["error"]) == (403, "PERMISSION_DENIED")


# -- thumbnails ------------------------------------------------------------------------------------
def test_a_relative_uri_is_looked_up_under_every_image_root(world, app):
    first, second = world["roots"]
    assert resolve("i4.png", [first, second]) == (second / "i4.png").resolve()
    assert resolve("i1.png", [first, second]) == (first / "i1.png").resolve()
    with pytest.raises(ThumbnailRefused, match="no such file"):
        resolve("i9.png", [first, second])
    for uri in (str(first / "a\0.png"), "x" * 5000 + ".png", "file://other-host/etc/x.png", "../second/../../x.png"):
        with pytest.raises(ThumbnailRefused):
            resolve(uri, [first, second])
    browser = app.test_client()
    for n in range(6):  # i3..i5 live in the second root
        reply = browser.get(f"/thumb?id=i{n}")
        assert reply.status_code == 200 and reply.data[:2] == b"\xff\xd8", n


def test_tiles_address_thumbnails_by_a_query_parameter(app, world):
    """An id with "..", "./" or a leading "/" goes into the query string, percent-encoded, where a
    browser does not normalise it (see test_browser.py for the browser's side)."""
    with app.test_request_context():
        assert url_for("thumb", id="a/../b") == "/thumb?id=a/../b"  # a query string is never normalised
        assert url_for("thumb", id="x y&id=i1#f") == "/thumb?id=x+y%26id%3Di1%23f"
    html = app.test_client().get("/search?id=i0").get_data(as_text=True)
    assert 'src="/thumb?id=i1"' in html


def test_pb_label_fields_document_the_rule():
    """The label rule is part of the contract: its comment in the proto names the limit."""
    proto = (Path(__file__).parents[2] / "proto" / "retrieval" / "v1" / "retrieval.proto").read_text()
    assert f"1 to {MAX_LABEL_CHARS} characters" in proto and "refuses an untrimmed label" in proto


# -- every state-changing route ---------------------------------------------------------------------
def test_every_state_changing_route_needs_the_csrf_token_and_the_same_origin(app, world):
    """Whatever route is added later: a POST without the session's token, or from another origin
    with it, is refused before the handler runs."""
    routes = sorted(r.rule for r in app.url_map.iter_rules() if "POST" in (r.methods or ()))
    assert {"/api/delete", "/api/skipped", "/api/review/accept-above", "/api/review/recompute"} <= set(routes)
    browser = app.test_client()
    csrf = page_csrf(browser)
    for path in routes:
        reply = post_json(browser, path, {}, None)
        assert (reply.status_code, reply.json and reply.json.get("error")) in ((403, "CSRF"), (403, None)), path
        reply = post_json(browser, path, {}, csrf, origin="http://127.0.0.1:9999")
        assert reply.status_code == 403 and b"cross-origin" in reply.data, path


# -- label page: keys, skipped cards, counts --------------------------------------------------------
def queue_ids(html: str) -> list[str]:
    return re.findall(r'<div class="card[^"]*" data-id="([^"]+)"', html)


def test_the_label_page_shows_one_key_per_label_and_the_counts(app, world):
    client = world["client"]
    client.set_labels({f"i{n}": label for n, label in enumerate("abcdefghijk"[:6])})
    client.set_labels({"nul": "zz-ten", "long": "zz-eleven"})
    try:
        html = app.test_client().get("/label?n=1").get_data(as_text=True)
        keys = re.findall(r'<span class="key-label"><kbd>(\w)</kbd> ([\w-]+)</span>', html)
        assert keys == [(str(n), lab) for n, lab in enumerate("abcdef", 1)] + [("7", "zz-eleven"), ("8", "zz-ten")]
        info = client.info()
        assert f'id="count-labelled">{info.labelled_count}<' in html
        assert f'id="count-unlabelled">{info.item_count - info.labelled_count}<' in html
        counts = app.test_client().get("/api/counts").json
        assert counts == {
            "items": info.item_count,
            "labelled": info.labelled_count,
            "predicted": info.predicted_count,
            "unlabelled": info.item_count - info.labelled_count,
        }
    finally:
        client.set_labels({i: "" for i in ("i0", "i1", "i2", "i3", "i4", "i5", "nul", "long")})


def test_skipped_cards_stay_out_of_this_sessions_queue(app):
    browser, other = app.test_client(), app.test_client()
    csrf = page_csrf(browser)
    first = queue_ids(browser.get("/label?n=3").get_data(as_text=True))
    assert len(first) == 3
    reply = post_json(browser, "/api/skipped", {"ids": [first[0], "not-stored"], "skipped": True}, csrf)
    assert reply.json == {"skipped": 1}  # an id the service does not hold is not kept
    again = queue_ids(browser.get("/label?n=3").get_data(as_text=True))
    assert first[0] not in again and len(again) == 3 and again[:2] == first[1:]
    assert first[0] in queue_ids(other.get("/label?n=3").get_data(as_text=True))  # this session only
    assert post_json(browser, "/api/skipped", {"ids": [first[0]], "skipped": False}, csrf).json == {"skipped": 0}
    assert queue_ids(browser.get("/label?n=3").get_data(as_text=True)) == first
    post_json(browser, "/api/skipped", {"ids": first, "skipped": True}, csrf)
    html = browser.get("/label?n=3").get_data(as_text=True)
    assert not set(first) & set(queue_ids(html)) and 'id="skipped-count">3<' in html
    assert post_json(browser, "/api/skipped/clear", {}, csrf).json == {"skipped": 0}
    assert queue_ids(browser.get("/label?n=3").get_data(as_text=True)) == first


# -- search: uploaded query, filters, more ----------------------------------------------------------
def test_an_uploaded_query_stays_in_its_session_for_more_and_filters(app, world):
    browser, other = app.test_client(), app.test_client()
    csrf = page_csrf(browser)
    image = (world["roots"][0] / "i1.png").read_bytes()
    reply = browser.post(
        "/search",
        data={"csrf_token": csrf, "k": "2", "image": (io.BytesIO(image), "mine.png")},
        headers={"Origin": HOST},
    )
    html = reply.get_data(as_text=True)
    preview = re.search(r'<img src="(/search/upload\.jpg\?n=\d+)" alt="the query"', html).group(1)
    thumb = browser.get(preview)
    assert thumb.status_code == 200 and thumb.data[:2] == b"\xff\xd8"
    assert other.get(preview).status_code == 404  # another session has no upload: nothing to see
    assert 'href="/search?upload=1&amp;k=2&amp;pages=2#r3"' in html  # "more": the same query, 2 more
    more = browser.get("/search?upload=1&k=2&pages=2").get_data(as_text=True)
    assert "Most similar to the uploaded mine.png" in more and len(re.findall(r'class="card result"', more)) == 4
    only = browser.get("/search?upload=1&meta=uri%3Di4.png").get_data(as_text=True)
    assert re.findall(r'class="card result" data-id="([^"]+)"', only) == ["i4"]
    assert other.get("/search?upload=1").status_code == 400


def test_search_filters_by_label_metadata_and_score(app, world):
    client = world["client"]
    client.set_labels({"i1": "red", "i2": "blue"})
    try:
        browser = app.test_client()

        def results(query: str) -> list[str]:
            reply = browser.get("/search?id=i0&" + query)
            assert reply.status_code == 200, reply.get_data(as_text=True)[-300:]
            return re.findall(r'class="card result" data-id="([^"]+)"', reply.get_data(as_text=True))

        assert results("label=red") == ["i1"]
        assert results("meta=uri%3Di2.png") == ["i2"]
        assert results("meta=uri%3Di2.png&label=red") == []
        assert sorted(results("min_score=0.5&k=50")) == sorted(h.id for h in client.search(id="i0", k=50))
        assert results("min_score=-1&k=3") == [h.id for h in client.search(id="i0", k=3, min_score=-1)]
    finally:
        client.set_labels({"i1": "", "i2": ""})


# -- review: snapshot, pages, accept above, reject -----------------------------------------------------
def review_page(browser, query: str = "") -> str:
    """The review page once its proposals are computed (it shows their progress until then)."""
    for _ in range(600):
        html = browser.get("/review" + query).get_data(as_text=True)
        if 'id="review-progress"' not in html:
            return html
        time.sleep(0.1)
    raise AssertionError("the proposals were not computed within a minute")


def review_ids(html: str) -> list[str]:
    return re.findall(r'<div class="card state-\w+" data-id="([^"]+)"', html)


def test_the_review_pages_accepts_above_a_threshold_and_remembers_rejections(app, world):
    client = world["client"]
    client.set_labels({"i0": "red", "i3": "blue"})
    try:
        browser = app.test_client()
        csrf = page_csrf(browser)
        proposals = {p.id: p for p in client.label_corpus()}
        html = review_page(browser, "?per_page=3")
        lowest = sorted(proposals.values(), key=lambda p: (p.confidence, p.id))
        assert review_ids(html) == [p.id for p in lowest[:3]]
        next_url = re.search(r'id="next-page" href="([^"]+)"', html).group(1).replace("&amp;", "&")
        assert review_ids(browser.get(next_url).get_data(as_text=True)) == [p.id for p in lowest[3:6]]
        snapshot = int(re.search(r'data-snapshot="(\d+)"', html).group(1))
        # a reject is remembered: not listed again, shown as rejected among the decided ones
        gone = lowest[0].id
        assert post_json(browser, "/api/reject", {"ids": [gone]}, csrf).status_code == 200
        assert gone not in review_ids(review_page(browser))
        decided = review_page(browser, "?show=decided")
        assert review_ids(decided) == [gone] and 'class="card state-rejected"' in decided
        # accept above a threshold: an item labelled elsewhere meanwhile keeps its own label
        count = browser.get("/api/review/count?threshold=0").json
        assert count["count"] == len(proposals) - 1 and count["highest"] == pytest.approx(lowest[-1].confidence)
        elsewhere = lowest[1].id
        client.set_labels({elsewhere: "green"})
        body = {"threshold": 0.0, "label": "", "low": 0.0, "high": 1.0, "snapshot": snapshot + 1}
        assert post_json(browser, "/api/review/accept-above", body, csrf).status_code == 409  # another snapshot
        reply = post_json(browser, "/api/review/accept-above", body | {"snapshot": snapshot}, csrf)
        assert reply.json == {"accepted": len(proposals) - 2, "skipped": 1}
        stored = {item.id: item.label for item in client.get(list(proposals))}
        assert stored[elsewhere] == "green" and stored[gone] == ""
        assert all(stored[i] == p.label for i, p in proposals.items() if i not in (elsewhere, gone))
        reply = post_json(browser, "/api/review/accept-above", body | {"snapshot": snapshot}, csrf)
        assert reply.json["accepted"] == 0 and "no open proposal reaches" in reply.json["message"]
        # the store changed and the last computation was quick: the next visit recomputes, and the
        # rejection holds in the new snapshot (LabelCorpus proposes the same label again)
        again = review_page(browser, "?show=all")
        assert int(re.search(r'id="proposals" data-snapshot="(\d+)"', again).group(1)) > snapshot
        assert review_ids(again) == [gone] and 'class="card state-rejected"' in again
    finally:
        client.set_labels({i: "" for i in ("i0", "i1", "i2", "i3", "i4", "i5", "nul", "long", "deep")})


def test_recompute_starts_a_job_and_reports_progress(app, world):
    client = world["client"]
    client.set_labels({"i0": "red"})
    try:
        browser = app.test_client()
        csrf = page_csrf(browser)
        reply = post_json(browser, "/api/review/recompute", {}, csrf)
        assert reply.status_code == 200 and reply.json["expected"] == client.info().item_count - 1
        for _ in range(600):
            progress = browser.get("/api/review/progress").json
            if not progress["computing"]:
                break
            time.sleep(0.1)
        assert progress["error"] is None and progress["snapshot"] == 1 and progress["received"] == progress["expected"]
    finally:
        client.set_labels({"i0": ""})


def test_the_shared_proposals_need_a_session_the_service_accepts(signin_app, world):
    """The snapshot belongs to the page's process: a visitor who has not signed in reads nothing of
    it, one with a read-only token does."""
    client = world["client"]
    client.set_labels({"i0": "red"})
    try:
        reader, stranger = signin_app.test_client(), signin_app.test_client()
        sign_in(reader, READ_ONLY)
        assert 'class="card state-open"' in review_page(reader)  # computed with the read-only token
        for path in ("/api/review/progress", "/api/review/count?threshold=0.5", "/api/counts"):
            reply = stranger.get(path)
            assert (reply.status_code, reply.json["error"]) == (401, "UNAUTHENTICATED"), path
            assert reader.get(path).status_code == 200, path
    finally:
        client.set_labels({"i0": ""})


def test_a_read_only_session_cannot_replace_the_shared_proposals(world):
    """Recompute replaces the snapshot every user reviews: it needs a write session, and a read-only
    one is offered no button (a page told never to recompute on its own, as in front of a large store)."""
    client = world["client"]
    client.set_labels({"i0": "red"})
    signin_app = make(world, token=None, review_auto_refresh_s=0)
    try:
        reader = signin_app.test_client()
        sign_in(reader, READ_ONLY)
        review_page(reader)  # the snapshot, computed
        client.set_labels({"i1": "red"})  # now stale
        html = reader.get("/review").get_data(as_text=True)
        assert 'id="stale"' in html and 'id="recompute"' not in html
        reply = post_json(reader, "/api/review/recompute", {}, page_csrf(reader, "/review"))
        assert (reply.status_code, reply.json["error"]) == (403, "PERMISSION_DENIED")
        assert "needs a token that may write" in reply.json["message"]
        writer = signin_app.test_client()
        sign_in(writer)
        assert 'id="recompute"' in writer.get("/review").get_data(as_text=True)
        assert post_json(writer, "/api/review/recompute", {}, page_csrf(writer, "/review")).status_code == 200
        review_page(writer)  # the job done before the labels are cleared
    finally:
        client.set_labels({"i0": "", "i1": ""})
        signin_app.extensions["retrieval_clients"].close()


# -- duplicates: groups and "keep one" ----------------------------------------------------------------
def test_duplicate_groups_are_boxed_and_the_rest_can_be_deleted(app, world, signin_app):
    client = world["client"]
    html = app.test_client().get("/duplicates?min_score=0.99").get_data(as_text=True)
    groups = list(client.duplicates(0.99))
    assert html.count('<section class="dup-group"') == len(groups) >= 1
    assert f'<span class="group-size">{len(groups[0])} items</span>' in html
    vector = client.get(["i0"], include_embedding=True)[0].embedding
    client.upsert_many([UpsertItem(f"copy{n}", embedding=vector) for n in range(3)])
    browser = app.test_client()
    reply = post_json(browser, "/api/delete", {"ids": ["copy1", "copy2", "never-stored"]}, page_csrf(browser))
    assert reply.json == {"deleted": 2}
    assert [i.id for i in client.get(["copy0", "copy1", "copy2"], ignore_missing=True)] == ["copy0"]
    reader = signin_app.test_client()
    sign_in(reader, READ_ONLY)
    reply = post_json(reader, "/api/delete", {"ids": ["copy0"]}, page_csrf(reader))
    assert (reply.status_code, reply.json["error"]) == (403, "PERMISSION_DENIED")
    assert 'class="keep-one"' not in reader.get("/duplicates?min_score=0.99").get_data(as_text=True)
    client.delete(["copy0"])


def test_labels_ids_and_upload_names_are_escaped_on_the_new_pages(app, world):
    """A label, a label filter and an upload's file name that are markup come back as text (the
    content security policy would refuse an inline handler anyway: test_browser.py)."""
    client = world["client"]
    markup = "<img src=x onerror=alert(1)>"
    client.set_labels({"i1": markup})
    try:
        browser = app.test_client()
        image = (world["roots"][0] / "i0.png").read_bytes()
        upload = browser.post(
            "/search",
            data={"csrf_token": page_csrf(browser), "image": (io.BytesIO(image), f"{markup}.png")},
            headers={"Origin": HOST},
        )
        pages = [
            browser.get(p).get_data(as_text=True) for p in ("/label", "/search?id=i0", f"/search?label={quote(markup)}")
        ]
        for html in [*pages, review_page(browser), upload.get_data(as_text=True)]:
            assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    finally:
        client.set_labels({"i1": ""})


def test_the_review_auto_refresh_flag_is_checked(capsys):
    assert cli_main(["--review-auto-refresh-seconds", "-1"]) == 2
    assert "--review-auto-refresh-seconds must be 0 or more" in capsys.readouterr().err


def test_no_redirect_is_built_from_the_host_header(app):
    """With no --allowed-host the page answers to any Host: a doubled slash was redirected there."""
    for path in ("/static//app.js", "//static/app.js", "/static/.//app.js"):
        reply = app.test_client().get(path, headers={"Host": "evil.example"})
        assert not 300 <= reply.status_code < 400 and "Location" not in reply.headers, (path, reply.headers)
    assert app.test_client().get("/static/app.js", headers={"Host": "evil.example"}).status_code == 200


def test_an_unreachable_service_is_a_502_that_names_no_address(caplog):
    """The page's 502 says the service is unreachable; its address and the socket error go to the log."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    app = create_app(address, token=TOKEN)
    app.testing = True
    try:
        for path in ("/", "/api/counts"):
            reply = app.test_client().get(path)
            body = reply.get_data(as_text=True)
            assert reply.status_code == 502 and "unreachable" in body, body
            assert address not in body and address.split(":")[1] not in body and "refused" not in body.lower()
        assert any(address in record.getMessage() for record in caplog.records)
    finally:
        app.extensions["retrieval_clients"].close()


# -- labels export ---------------------------------------------------------------------------------
def test_the_labels_csv_is_safe_to_open_in_a_spreadsheet(app, world):
    """Formula cells neutralised (?raw=1: verbatim), one charset, and not cached."""
    client = world["client"]
    client.set_labels({"i1": '=HYPERLINK("http://evil.example/","click")', "i2": "@SUM(1+1)"})
    try:
        browser = app.test_client()
        reply = browser.get("/labels.csv")
        assert reply.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert reply.headers["Cache-Control"] == "no-store"
        rows = {row["id"]: row["label"] for row in csv.DictReader(io.StringIO(reply.get_data(as_text=True)))}
        assert rows == {"i1": '\'=HYPERLINK("http://evil.example/","click")', "i2": "'@SUM(1+1)"}
        raw = browser.get("/labels.csv?raw=1").get_data(as_text=True)
        assert {row["id"]: row["label"] for row in csv.DictReader(io.StringIO(raw))}["i2"] == "@SUM(1+1)"
        assert browser.get("/labels.jsonl").headers["Content-Type"] == "application/jsonl; charset=utf-8"
    finally:
        client.set_labels({"i1": "", "i2": ""})


def test_the_labels_export_is_the_files_of_retrieval_client_labels_export(app, signin_app, world):
    client = world["client"]
    client.set_labels({"i1": "cat", "i2": "dog"})
    client.set_labels({"i3": "dog"}, predicted=True, confidences={"i3": 0.75})
    try:
        browser = app.test_client()
        for fmt in ("csv", "jsonl"):
            for human_only in (False, True):
                out = io.StringIO()
                write_labels(label_rows(client, human_only=human_only), out, fmt)
                reply = browser.get(f"/labels.{fmt}" + ("?human_only=1" if human_only else ""))
                assert reply.status_code == 200 and reply.mimetype == MEDIA_TYPES[fmt].split(";")[0]
                assert reply.headers["Content-Disposition"] == f'attachment; filename="labels.{fmt}"'
                assert reply.get_data(as_text=True) == out.getvalue()
                assert ("i3" in out.getvalue()) != human_only and "i1" in out.getvalue()
        assert 'href="/labels.csv"' in browser.get("/").get_data(as_text=True)  # offered on the overview
        missing = browser.get("/labels.xlsx")
        assert missing.status_code == 404 and "csv or jsonl" in missing.get_data(as_text=True)
        assert signin_app.test_client().get("/labels.csv").status_code == 302  # not signed in: sign in first
    finally:
        client.set_labels({"i1": "", "i2": ""})
        client.set_labels({"i3": ""}, predicted=True)

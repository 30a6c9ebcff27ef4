"""The web page's security and input checks with Flask's test client, against a real retrieval
server in this process (production gRPC wiring, bearer tokens): CSRF tokens and Origin checks,
server-side sessions (cookie attributes, sign-out, expiry, a bounded table), the bounded client
cache, local `next` redirects, security headers, and a 4xx with a message for every bad input
(JSON under /api/). What only a browser does (framing, cross-origin form posts, URL normalisation,
the content security policy) is in test_browser.py."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import url_for
from PIL import Image

from moco_retrieval.labels import MAX_LABEL_CHARS
from retrieval_client import RetrievalClient, RetrievalError, UpsertItem
from retrieval_server.config import ServerConfig
from retrieval_web.app import SECURE_COOKIE, create_app, local_path
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
    ],
)
def test_a_bad_query_parameter_is_a_400_page(app, path, words):
    reply = app.test_client().get(path)
    assert reply.status_code == 400 and words in reply.get_data(as_text=True), reply.get_data(as_text=True)[-500:]


@pytest.mark.parametrize("item_id", ["nul", "long", "deep", "unknown"])
def test_a_thumbnail_that_cannot_be_read_is_a_404(app, item_id):
    reply = app.test_client().get(f"/thumb?id={item_id}")
    assert reply.status_code == 404


LABEL_CASES = {  # body of /api/labels or /api/reject -> status, words of the message
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

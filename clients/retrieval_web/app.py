"""The Flask application: pages rendered on the server, and a few JSON endpoints for the writes.

Every request goes to the gRPC service with a token: the one the page was started with, or the one
typed into the sign-in page, which the service must accept first. That token is kept in a
server-side session (sessions.py); the browser's cookie holds only the session's random id
(HttpOnly, SameSite=Strict, Secure over TLS). Whether the token may write is asked once per session
(an empty SetLabels, which a read-only token is refused): a read-only session sees no write action,
and the service refuses writes anyway.

Every request that is not a GET (the JSON writes, sign-in and sign-out, the search upload) must
carry the session's CSRF token (the X-CSRF-Token header the page's script sends, or the hidden
csrf_token field of a form) and must not come from another origin (Origin, else Referer); the JSON
endpoints take `Content-Type: application/json` only. Pages may not be framed, the content
security policy lets only the page's own scripts, styles and images run, and every input is
checked: a bad one gets a 4xx with a message (JSON under /api/).
"""

from __future__ import annotations

import functools
import hmac
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from flask import Flask, Response, g, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest, HTTPException

from moco_retrieval.labels import LabelError, clean_label
from retrieval_client import RetrievalClient, RetrievalError

from .sessions import (
    DEFAULT_IDLE_MINUTES,
    DEFAULT_LIFETIME_HOURS,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_SESSIONS,
    Clients,
    Session,
    SessionTable,
)
from .thumbnails import ThumbnailRefused, thumbnail

REVIEW_LIMIT = 500  # proposals shown per label on the review page
MAX_K = 500  # results of one search
MAX_SUGGESTIONS = 500  # cards of the label page
MAX_ASSIGNMENTS = 10_000  # ids of one JSON write (the page sends bigger ones in chunks)
MAX_ID_BYTES = 512  # as the service (proto: Item.id)
MAX_TOKEN_CHARS = 4096
COOKIE, SECURE_COOKIE = "moco_session", "__Host-moco_session"  # __Host-: Secure, Path=/, no Domain
CSRF_HEADER, CSRF_FIELD = "X-CSRF-Token", "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
HTTP_STATUS = {  # the service's refusals as HTTP statuses; anything else is the caller's 400
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 502,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
DEFAULT_PORTS = {"http": "80", "https": "443"}


class InputError(Exception):
    """A request the page refuses: its HTTP status and a message for the person or the script."""

    def __init__(self, message: str, status: int = 400, error: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.message, self.status, self.error = message, status, error


def local_path(target: str | None) -> str | None:
    """`target` when it is a path on this site ("/label?n=5"), else None: no scheme, no host, not
    "//host" nor "/\\host" (which browsers read as "//host"), no control character or space (which
    browsers drop from URLs)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _origin(url: str) -> str | None:
    """scheme://host[:port] of a URL, lower case, default port left out; None when it has none."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None
    if not scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port and str(port) != DEFAULT_PORTS.get(scheme) else "")


def check_id(item_id: object, what: str = "id") -> str:
    if not isinstance(item_id, str):
        raise InputError(f"{what} must be a string")
    try:
        size = len(item_id.encode())
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid Unicode (a lone surrogate)") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise InputError(f"{what} must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {size}")
    return item_id


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.values.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise InputError(f"{name} must be from {low} to {high}, got {value}")
    return value


def float_arg(name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    raw = request.values.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{name} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise InputError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {raw[:40]}")
    return value


def json_body(*fields: str) -> dict:
    """The request's JSON object, with only `fields` (each required)."""
    if request.mimetype != "application/json":
        raise InputError("send JSON, with Content-Type: application/json", 415, "UNSUPPORTED_MEDIA_TYPE")
    try:
        body = request.get_json()
    except (BadRequest, RecursionError):
        raise InputError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    unknown, missing = sorted(set(body) - set(fields)), [f for f in fields if f not in body]
    if unknown or missing:
        raise InputError(f"the body must have exactly the fields {', '.join(fields)}")
    return body


def create_app(
    address: str,
    token: str | None = None,
    image_roots: Iterable[Path] = (),
    tls: bool | str = False,
    *,
    behind_tls: bool = False,
    allowed_hosts: Iterable[str] | None = None,
    session_idle_s: float = DEFAULT_IDLE_MINUTES * 60,
    session_lifetime_s: float = DEFAULT_LIFETIME_HOURS * 3600,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    clock: Callable[[], float] = time.monotonic,
) -> Flask:
    """The page for the service at `address`. behind_tls: a TLS proxy is in front (cookies are
    Secure, X-Forwarded-Proto is believed, https when absent); allowed_hosts: the host names the
    page answers to (the Host header; None: any), against DNS rebinding."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 32 * 2**20  # uploads for search
    roots = [Path(r).resolve() for r in image_roots]
    hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
    clients = Clients(address, tls, max_clients)
    sessions = SessionTable(session_idle_s, session_lifetime_s, max_sessions, clock)
    app.extensions["retrieval_clients"] = clients
    app.extensions["retrieval_sessions"] = sessions

    # -- the request's origin, session and client --------------------------------------------------
    def scheme() -> str:
        if behind_tls:
            return (request.headers.get("X-Forwarded-Proto") or "https").split(",")[0].strip().lower()
        return request.scheme

    def secure() -> bool:
        return behind_tls or request.is_secure

    def cookie_name() -> str:
        return SECURE_COOKIE if secure() else COOKIE

    def current_session() -> Session:
        """This browser's session; a new anonymous one (cookie set on the reply) when it has none."""
        if g.session is None:
            g.session = sessions.new()
            g.set_cookie = True
        return g.session

    def client() -> RetrievalClient:
        if "client" not in g:
            g.client = clients.acquire(token or (g.session.token if g.session else None))
        return g.client

    def can_write() -> bool | None:
        """Whether this session's token (or none) may write: asked once, with an empty SetLabels;
        None before sign-in or when the service cannot say (the page shows no read-only badge)."""
        session = current_session()
        if session.can_write is None:
            try:
                client().set_labels({})
                session.can_write = True
            except RetrievalError as exc:
                if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                    return None  # not signed in (yet), or the service is down: asked again
                session.can_write = False
        return session.can_write

    def check_origin() -> None:
        """A write from another origin is refused: Origin when the browser sends it (every POST in
        today's browsers), else the Referer (sent to this origin: Referrer-Policy same-origin)."""
        own = _origin(f"{scheme()}://{request.host}")
        origin, referer = request.headers.get("Origin"), request.headers.get("Referer")
        if origin is not None:
            if _origin(origin) != own:
                raise InputError(f"cross-origin request refused (from {origin[:100]})", 403, "CROSS_ORIGIN")
        elif referer and _origin(referer) != own:
            raise InputError("cross-origin request refused (Referer of another origin)", 403, "CROSS_ORIGIN")

    def check_csrf() -> None:
        given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD) or ""
        if g.session is None:
            raise InputError("no session (it expired or was ended): reload the page", 403, "CSRF")
        if not hmac.compare_digest(given.encode(), g.session.csrf.encode()):
            raise InputError("missing or wrong CSRF token: reload the page", 403, "CSRF")

    @app.before_request
    def before() -> None:
        g.session, g.set_cookie, g.clear_cookie = None, False, False
        if hosts is not None and (urlsplit(f"//{request.host}").hostname or "") not in hosts:
            raise InputError(f"this page does not answer to the host {request.host[:100]!r}", 400, "UNKNOWN_HOST")
        sid = request.cookies.get(cookie_name())
        g.session = sessions.get(sid)
        g.clear_cookie = bool(sid) and g.session is None  # ended or expired: drop the stale cookie
        if request.method not in SAFE_METHODS:
            check_origin()
            check_csrf()

    @app.after_request
    def after(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.mimetype in ("text/html", "application/json"):
            response.headers["Cache-Control"] = "no-store"
        if g.get("set_cookie") and g.session is not None:
            response.set_cookie(
                cookie_name(), g.session.id, httponly=True, samesite="Strict", secure=secure(), path="/"
            )
        elif g.get("clear_cookie"):
            response.delete_cookie(cookie_name(), httponly=True, samesite="Strict", secure=secure(), path="/")
        return response

    @app.teardown_request
    def release(_exc: BaseException | None) -> None:
        held = g.pop("client", None)
        if held is not None:
            clients.release(held)

    # -- errors ----------------------------------------------------------------------------------
    def error_reply(status: int, error: str, message: str, title: str = "Refused"):
        if request.path.startswith("/api/"):
            return jsonify(error=error, message=message), status
        g.error_page = True
        return render_template("error.html", title=title, error=message), status

    @app.errorhandler(InputError)
    def input_error(exc: InputError):
        return error_reply(exc.status, exc.error, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_reply(exc.code or 500, exc.name.upper().replace(" ", "_"), exc.description or exc.name)

    def service_error(exc: RetrievalError):
        status = HTTP_STATUS.get(exc.code, 400)
        return error_reply(status, exc.code.name, str(exc), "The service said no")

    def page(view: Callable) -> Callable:
        """A page: signs in first when the service wants a token; service errors as a page."""

        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except RetrievalError as exc:
                if exc.code == grpc.StatusCode.UNAUTHENTICATED and not token:
                    if g.session is not None and g.session.signed_in:  # the service no longer takes it
                        sessions.end(g.session.id)
                        g.session, g.clear_cookie = None, True
                    return redirect(url_for("sign_in", next=request.full_path))
                return service_error(exc)

        return wrapped

    def api(view: Callable) -> Callable:
        """A JSON write: the service's refusal (e.g. PERMISSION_DENIED) as a JSON error."""

        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except RetrievalError as exc:
                return service_error(exc)

        return wrapped

    @app.context_processor
    def common() -> dict:
        session = current_session()
        return {
            "writable": None if g.get("error_page") else can_write(),
            "csrf_token": session.csrf,
            "signed_in": session.signed_in,
            "own_token": token is not None,
            "max_k": MAX_K,
        }

    # -- sign-in and sign-out ----------------------------------------------------------------------
    @app.route("/sign-in", methods=["GET", "POST"])
    def sign_in():
        target = local_path(request.args.get("next")) or url_for("overview")
        if token is not None:  # the page's own token is used; there is nothing to sign in to
            if request.method == "POST":
                raise InputError("this page was started with a token: there is nothing to sign in to")
            return redirect(target)
        if request.method == "GET":
            return render_template("sign_in.html", message=None)
        typed = request.form.get("token", "").strip()
        if not typed or len(typed) > MAX_TOKEN_CHARS or not all(0x20 <= ord(c) < 0x7F for c in typed):
            message = f"a token is 1 to {MAX_TOKEN_CHARS} printable ASCII characters"
            return render_template("sign_in.html", message=message), 400
        probe = RetrievalClient(address, token=typed, tls=tls, timeout=30)  # not cached: it may be wrong
        try:
            probe.set_labels({})
            writable = True
        except RetrievalError as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                return render_template("sign_in.html", message="the service refused this token"), 401
            if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                return service_error(exc)
            writable = False
        finally:
            probe.close()
        if g.session is not None:
            sessions.end(g.session.id)
        g.session, g.set_cookie = sessions.new(token=typed, can_write=writable), True  # a new id
        return redirect(target, 303)

    @app.post("/sign-out")
    def sign_out():
        """Ends the session here: its id is forgotten, so a copy of the cookie no longer works."""
        if g.session is not None:
            sessions.end(g.session.id)
        g.session, g.clear_cookie = None, True
        return redirect(url_for("sign_in") if token is None else url_for("overview"), 303)

    # -- pages -----------------------------------------------------------------------------------
    @app.route("/")
    @page
    def overview():
        info = client().info()
        unlabelled = info.item_count - info.labelled_count
        return render_template("overview.html", info=info, unlabelled=unlabelled)

    @app.route("/search", methods=["GET", "POST"])
    @page
    def search():
        k = int_arg("k", 24, 1, MAX_K)
        if request.method == "POST":
            upload = request.files.get("image")
            if upload is None or not upload.filename:
                return render_template("search.html", hits=None, query=None, k=k, message="choose an image first"), 400
            data = upload.read()
            if not data:
                return render_template("search.html", hits=None, query=None, k=k, message="the file is empty"), 400
            hits = client().search(image=data, k=k)
            return render_template("search.html", hits=hits, query=f"the uploaded {upload.filename}", k=k)
        item_id = request.args.get("id")
        if not item_id:
            return render_template("search.html", hits=None, query=None, k=k)
        check_id(item_id)
        return render_template("search.html", hits=client().search(id=item_id, k=k), query=item_id, k=k)

    @app.route("/label")
    @page
    def label():
        n = int_arg("n", 12, 1, MAX_SUGGESTIONS)
        seed = int_arg("seed", 0, 0, 2**64 - 1)
        info = client().info()
        unlabelled = info.item_count > info.labelled_count
        suggestions = client().suggest(n, seed=seed) if unlabelled else []
        return render_template("label.html", suggestions=suggestions, labels=sorted(info.label_counts), n=n)

    @app.route("/review")
    @page
    def review():
        threshold = float_arg("threshold", 0.9, 0.0, 1.0)
        groups: dict[str, list] = defaultdict(list)
        if client().info().labelled_count:
            for proposal in client().label_corpus():
                groups[proposal.label].append(proposal)
        for proposals in groups.values():
            proposals.sort(key=lambda p: (-p.confidence, p.id))
        shown = {label: proposals[:REVIEW_LIMIT] for label, proposals in sorted(groups.items())}
        return render_template("review.html", groups=shown, threshold=threshold, labels=sorted(groups))

    @app.route("/duplicates")
    @page
    def duplicates():
        min_score = float_arg("min_score", 0.95, 0.0, 1.0, low_open=True)
        groups = list(client().duplicates(min_score))
        return render_template("duplicates.html", groups=groups, min_score=min_score)

    @app.get("/thumb")
    def thumb():
        """?id=: the id in the query string, which browsers do not normalise as they do a path
        (an id holding "..", "./" or a leading "/" would otherwise fetch another item's thumbnail)."""
        item_id = check_id(request.args.get("id", ""))
        try:
            items = client().get([item_id], ignore_missing=True)
        except RetrievalError as exc:
            raise InputError(str(exc), HTTP_STATUS.get(exc.code, 400), exc.code.name) from None
        if not items:
            raise InputError(f"no item {item_id!r}", 404, "NOT_FOUND")
        try:
            data = thumbnail(items[0].metadata.get("uri", ""), roots)
        except ThumbnailRefused as exc:
            app.logger.info("thumbnail of %r refused: %s", item_id, exc)
            raise InputError(f"no thumbnail for {item_id!r}", 404, "NOT_FOUND") from None
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    # -- JSON writes -----------------------------------------------------------------------------
    def ids_of(value: object, what: str) -> list:
        if not isinstance(value, (list, dict)):
            raise InputError(f"{what} must be a JSON {'object' if what == 'labels' else 'list'}")
        if len(value) > MAX_ASSIGNMENTS:
            raise InputError(f"at most {MAX_ASSIGNMENTS} ids per request, got {len(value)}")
        return [check_id(i, f"an id of {what}") for i in value]

    @app.post("/api/labels")
    @api
    def set_labels():
        """{"labels": {id: label}} as human labels ("" clears); each label is trimmed, then must
        follow the label rule (moco_retrieval.labels) that the service applies."""
        labels = json_body("labels")["labels"]
        if not isinstance(labels, dict):
            raise InputError("labels must be a JSON object of id: label")
        ids_of(labels, "labels")
        cleaned = {}
        for item_id, value in labels.items():
            try:
                cleaned[item_id] = clean_label(value, allow_empty=True)
            except LabelError as exc:
                raise InputError(f"label of {item_id[:100]!r}: {exc}") from None
        return jsonify(updated=client().set_labels(cleaned))

    @app.post("/api/reject")
    @api
    def reject():
        """{"ids": [...]}: drop their predicted labels."""
        ids = json_body("ids")["ids"]
        if not isinstance(ids, list):
            raise InputError("ids must be a JSON list of ids")
        return jsonify(updated=client().set_labels({i: "" for i in ids_of(ids, "ids")}, predicted=True))

    return app

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
checked (params.py): a bad one gets a 4xx with a message (JSON under /api/).

The handlers only read the request, call the service and render: the label page's keys are in
keys.py, the review page's proposals (a snapshot of LabelCorpus, paged and filtered) in review.py.
"""

from __future__ import annotations

import functools
import hmac
import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from flask import Flask, Response, g, jsonify, redirect, render_template, request, stream_with_context, url_for
from werkzeug.exceptions import HTTPException

from retrieval_client import RetrievalClient, RetrievalError
from retrieval_client.labels import FORMATS as LABEL_FORMATS
from retrieval_client.labels import MEDIA_TYPES as LABEL_MEDIA_TYPES
from retrieval_client.labels import label_rows, stream_labels

from .keys import label_keys
from .params import (
    MAX_ASSIGNMENTS,
    InputError,
    check_float,
    check_id,
    check_ids,
    check_label,
    choice_arg,
    cursor_arg,
    float_arg,
    int_arg,
    json_body,
    metadata_filter,
)
from .review import AUTO_REFRESH_S, ORDERS, SHOW, Proposals, View, cursor_text, default_threshold
from .sessions import (
    DEFAULT_IDLE_MINUTES,
    DEFAULT_LIFETIME_HOURS,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_SESSIONS,
    MAX_SKIPPED,
    Clients,
    Session,
    SessionTable,
    UploadedQuery,
)
from .thumbnails import ThumbnailRefused, thumbnail, upload_thumbnail

MAX_K = 500  # results of one search
SEARCH_STEP = 24  # results of a search's first page (the default k), and how many more "more" adds
MAX_SUGGESTIONS = 500  # cards of the label page
REVIEW_PAGE = 100  # proposals on one review page (at most MAX_REVIEW_PAGE)
MAX_REVIEW_PAGE = 200
MAX_GROUPS = 200  # duplicate groups shown, largest first
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
UNREACHABLE = "the retrieval service is unreachable or not serving; try again in a moment"


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
    review_auto_refresh_s: float = AUTO_REFRESH_S,
    clock: Callable[[], float] = time.monotonic,
) -> Flask:
    """The page for the service at `address`. behind_tls: a TLS proxy is in front (cookies are
    Secure, X-Forwarded-Proto is believed, https when absent); allowed_hosts: the host names the
    page answers to (the Host header; None: any), against DNS rebinding; review_auto_refresh_s: see
    review.Proposals."""
    app = Flask(__name__)
    # No redirect that merges "//" in a path: werkzeug builds its Location from the Host header.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = 32 * 2**20  # uploads for search
    roots = [Path(r).resolve() for r in image_roots]
    hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
    clients = Clients(address, tls, max_clients)
    sessions = SessionTable(session_idle_s, session_lifetime_s, max_sessions, clock)
    proposals = Proposals(clients, review_auto_refresh_s)
    uploads = itertools.count(1)
    app.extensions["retrieval_clients"] = clients
    app.extensions["retrieval_sessions"] = sessions
    app.extensions["retrieval_proposals"] = proposals
    app.add_template_filter(lambda t: time.strftime("%H:%M:%S", time.localtime(t)), "clock")

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

    def session_token() -> str | None:
        return token or (g.session.token if g.session else None)

    def client() -> RetrievalClient:
        if "client" not in g:
            g.client = clients.acquire(session_token())
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
        if exc.code == grpc.StatusCode.UNAVAILABLE:  # the backend's address and socket error go to the log only
            app.logger.warning("the retrieval service is unavailable: %s", exc)
            return error_reply(status, exc.code.name, UNREACHABLE, "The service is unreachable")
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

    def search_request() -> dict:
        """What a search asks for beyond its query: k results a page, pages shown ("more" adds one),
        and the filters the Search RPC takes."""
        min_score = request.values.get("min_score", "")
        k, pages = int_arg("k", SEARCH_STEP, 1, MAX_K), int_arg("pages", 1, 1, MAX_K)
        return {
            "k": k,
            "pages": pages,
            "shown": min(k * pages, MAX_K),
            "labels": [check_label(v, "label filter") for v in request.values.getlist("label") if v],
            "metadata": metadata_filter(request.values.getlist("meta")),
            "min_score": None if min_score == "" else check_float("min_score", min_score, -1.0, 1.0),
        }

    def searched(asked: dict, **query) -> list:
        filters = {name: asked[name] for name in ("labels", "metadata", "min_score")}
        return client().search(**query, k=asked["shown"], **filters)

    def render_search(query: dict | None, hits, asked: dict, status: int = 200, message: str | None = None):
        """The search page; `query`: {"id": ...} or {"upload": 1} (what "more" and the filters repeat)."""
        more_url = None
        if query is not None and hits and len(hits) == asked["shown"] < MAX_K:
            more = {**query, "label": asked["labels"], "meta": [f"{k}={v}" for k, v in asked["metadata"].items()]}
            more |= {"min_score": asked["min_score"], "k": asked["k"], "pages": asked["pages"] + 1}
            more_url = url_for("search", **more) + f"#r{len(hits) + 1}"
        upload = g.session.upload if query and "upload" in query else None
        if upload is not None:
            title = f"the uploaded {upload.name}"
            preview = url_for("uploaded_query", n=upload.number) if upload.thumbnail else None
        else:
            title = query and query["id"]
            preview = query and url_for("thumb", id=query["id"])
        return render_template(
            "search.html",
            query=title,
            query_id=query and query.get("id"),
            upload=upload is not None,
            query_image=preview,
            hits=hits,
            asked=asked,
            more_url=more_url,
            labels=sorted(client().info().label_counts),
            message=message,
        ), status

    @app.route("/search", methods=["GET", "POST"])
    @page
    def search():
        """By an uploaded image (POST; its embedding is kept in the session for "more" and other
        filters: ?upload=1), or by a stored id (?id=). The filters and k travel in the query string."""
        asked = search_request()
        session = current_session()
        if request.method == "POST":
            upload = request.files.get("image")
            if upload is None or not upload.filename:
                return render_search(None, None, asked, 400, "choose an image first")
            data = upload.read()
            if not data:
                return render_search(None, None, asked, 400, "the file is empty")
            vector = client().embed([data])[0]
            try:
                preview = upload_thumbnail(data)
            except ThumbnailRefused:  # the service decoded it, this process could not: no preview
                preview = b""
            session.upload = UploadedQuery(upload.filename[:200], vector, preview, next(uploads))
        if request.method == "POST" or request.args.get("upload"):
            if session.upload is None:
                raise InputError("the uploaded image is no longer held (the session ended): upload it again")
            return render_search({"upload": 1}, searched(asked, vector=session.upload.vector), asked)
        item_id = request.args.get("id")
        if not item_id:
            return render_search(None, None, asked)
        check_id(item_id)
        return render_search({"id": item_id}, searched(asked, id=item_id), asked)

    @app.get("/search/upload.jpg")
    def uploaded_query():
        """The thumbnail of this session's uploaded search image (?n= only changes the URL)."""
        upload = g.session.upload if g.session else None
        if upload is None or not upload.thumbnail:
            raise InputError("no uploaded image in this session", 404, "NOT_FOUND")
        return Response(upload.thumbnail, mimetype="image/jpeg", headers={"Cache-Control": "private, no-store"})

    @app.route("/label")
    @page
    def label():
        """The Suggest queue, without the ids this session skipped."""
        n = int_arg("n", 12, 1, MAX_SUGGESTIONS)
        seed = int_arg("seed", 0, 0, 2**64 - 1)
        info = client().info()
        skipped = current_session().skipped
        suggestions = []
        if info.item_count > info.labelled_count:
            asked = min(n + len(skipped), info.max_suggestions or MAX_SUGGESTIONS, MAX_SUGGESTIONS)
            suggestions = [s for s in client().suggest(asked, seed=seed) if s.id not in skipped][:n]
        return render_template(
            "label.html",
            suggestions=suggestions,
            keys=label_keys(sorted(info.label_counts)),
            info=info,
            skipped=len(skipped),
            n=n,
        )

    def review_view() -> View:
        label = request.values.get("label", "")
        low, high = float_arg("low", 0.0, 0.0, 1.0), float_arg("high", 1.0, 0.0, 1.0)
        if low > high:
            raise InputError(f"low ({low}) must not be above high ({high})")
        return View(check_label(label, "label filter") if label else "", low, high, choice_arg("show", SHOW))

    @app.route("/review")
    @page
    def review():
        """A page of the proposals (review.py): filtered, ordered, from a cursor; the cards' states
        checked against the store."""
        view, order = review_view(), choice_arg("order", ORDERS)
        size = int_arg("per_page", REVIEW_PAGE, 1, MAX_REVIEW_PAGE)
        after, before = cursor_arg("after"), cursor_arg("before")
        asked_threshold = float_arg("threshold", None, 0.0, 1.0)  # the "accept all >=" field (None: from the data)
        info = client().info()
        if not info.labelled_count:
            return render_template("review.html", snapshot=None, progress=None, info=info)
        job = proposals.refresh(info, session_token())
        if job is not None:
            proposals.wait(job)
        snapshot = proposals.snapshot
        if snapshot is None:
            return render_template("review.html", snapshot=None, progress=proposals.job.progress(), info=info)
        shown = snapshot.page(view, order, size, after, before)
        stored = client().get([row.id for row in shown.rows], ignore_missing=True)
        shown = snapshot.checked(shown, stored)
        threshold = default_threshold(snapshot.open_confidences(view))
        if threshold is not None and asked_threshold is not None:
            threshold = asked_threshold
        args = {
            "label": view.label,
            "low": view.low,
            "high": view.high,
            "show": view.show,
            "order": order,
            "per_page": size,
        }
        job = proposals.job
        return render_template(
            "review.html",
            snapshot=snapshot,
            progress=job.progress() if job is not None and not job.finished.is_set() else None,
            stale=proposals.stale(info),
            info=info,
            view=view,
            order=order,
            page=shown,
            stored_labels={item.id: item.label for item in stored},
            next_url=shown.after and url_for("review", **args, after=cursor_text(shown.after)),
            previous_url=shown.before and url_for("review", **args, before=cursor_text(shown.before)),
            threshold=threshold,
            would_accept=len(snapshot.open_at_least(view, threshold)) if threshold is not None else 0,
            labels=sorted(info.label_counts),
        )

    @app.route("/duplicates")
    @page
    def duplicates():
        min_score = float_arg("min_score", 0.95, 0.0, 1.0, low_open=True)
        groups = list(client().duplicates(min_score))
        return render_template("duplicates.html", groups=groups[:MAX_GROUPS], total=len(groups), min_score=min_score)

    @app.get("/labels.<fmt>")
    @page
    def export_labels(fmt: str):
        """Every labelled item as CSV or JSONL (?human_only=1: human labels only; ?raw=1: CSV cells
        verbatim), streamed: the file `retrieval-client labels export` writes, which `labels import`
        reads back."""
        if fmt not in LABEL_FORMATS:
            raise InputError(f"labels can be exported as {' or '.join(LABEL_FORMATS)}, not {fmt[:20]!r}", 404)
        rows = label_rows(client(), human_only=request.args.get("human_only") == "1")
        first = next(rows, None)  # the first call, here: a refusal is this page's error, not a cut file
        raw = request.args.get("raw") == "1"  # CSV cells verbatim (by default formulas are neutralised)
        body = stream_labels(itertools.chain([first], rows) if first is not None else iter(()), fmt, raw)
        return Response(
            stream_with_context(body),
            content_type=LABEL_MEDIA_TYPES[fmt],  # the charset once (mimetype= would add another)
            headers={"Content-Disposition": f'attachment; filename="labels.{fmt}"', "Cache-Control": "no-store"},
        )

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

    # -- JSON reads --------------------------------------------------------------------------------
    @app.get("/api/counts")
    @api
    def counts():
        """The label page's progress: items, human labels, stored predictions, unlabelled items."""
        info = client().info()
        return jsonify(
            items=info.item_count,
            labelled=info.labelled_count,
            predicted=info.predicted_count,
            unlabelled=info.item_count - info.labelled_count,
        )

    def check_access() -> None:
        """The review snapshot is the process's, computed with someone's token: only a session
        whose token (or none) the service accepts reads it. What the session's first page learnt
        (can_write) says so without another call: Info scans the store (40 ms at 100k items)."""
        if can_write() is None:
            raise InputError("sign in first (or the service did not answer)", 401, "UNAUTHENTICATED")

    def current_snapshot(number: object = None):
        """The review snapshot; 409 without one, or when it is not `number`."""
        check_access()
        snapshot = proposals.snapshot
        if snapshot is None:
            raise InputError("no proposals computed yet: open the review page", 409, "CONFLICT")
        if number is not None and number != snapshot.number:
            raise InputError("the proposals were recomputed since this page was loaded: reload it", 409, "CONFLICT")
        return snapshot

    @app.get("/api/review/progress")
    @api
    def review_progress():
        check_access()
        job, snapshot = proposals.job, proposals.snapshot
        state = job.progress() if job else {"computing": False, "received": 0, "expected": 0, "error": None}
        return jsonify(snapshot=snapshot.number if snapshot else None, **state)

    @app.get("/api/review/count")
    @api
    def review_count():
        """How many open proposals of the view reach ?threshold= (what "accept all" would accept)."""
        view = review_view()
        threshold = check_float("threshold", request.args.get("threshold", ""), 0.0, 1.0)
        snapshot = current_snapshot()
        confidences = snapshot.open_confidences(view)
        return jsonify(
            count=int((confidences >= threshold).sum()),
            highest=float(confidences.max()) if len(confidences) else None,
        )

    # -- JSON writes -----------------------------------------------------------------------------
    @app.post("/api/labels")
    @api
    def set_labels():
        """{"labels": {id: label}} as human labels ("" clears); each label is trimmed, then must
        follow the label rule (moco_retrieval.labels) that the service applies."""
        labels = json_body("labels")["labels"]
        if not isinstance(labels, dict):
            raise InputError("labels must be a JSON object of id: label")
        check_ids(labels, "labels")
        cleaned = {i: check_label(v, f"label of {i[:100]!r}", allow_empty=True) for i, v in labels.items()}
        updated = client().set_labels(cleaned)
        proposals.record_labels(cleaned)
        return jsonify(updated=updated)

    @app.post("/api/reject")
    @api
    def reject():
        """{"ids": [...]}: drop their predicted labels, and hide their proposals from the review."""
        ids = json_body("ids")["ids"]
        if not isinstance(ids, list):
            raise InputError("ids must be a JSON list of ids")
        updated = client().set_labels({i: "" for i in check_ids(ids)}, predicted=True)
        proposals.record_rejected(ids)
        return jsonify(updated=updated)

    @app.post("/api/delete")
    @api
    def delete():
        """{"ids": [...]}: delete these items (the duplicates page's "keep one"); unknown ids are skipped."""
        ids = json_body("ids")["ids"]
        if not isinstance(ids, list) or not ids:
            raise InputError("ids must be a non-empty JSON list of ids")
        deleted = client().delete(check_ids(ids), ignore_missing=True)
        proposals.record_deleted(ids)
        return jsonify(deleted=deleted)

    @app.post("/api/skipped")
    @api
    def skip():
        """{"ids": [...], "skipped": true|false}: (un)skip label-queue cards for this session."""
        body = json_body("ids", "skipped")
        if not isinstance(body["ids"], list) or not isinstance(body["skipped"], bool):
            raise InputError("ids must be a JSON list and skipped true or false")
        ids = check_ids(body["ids"], limit=MAX_SKIPPED)
        session = current_session()
        if body["skipped"]:  # stored items only (and only once the service accepts this session)
            session.skip(item.id for item in client().get(ids, ignore_missing=True))
        else:
            session.unskip(ids)
        return jsonify(skipped=len(session.skipped))

    @app.post("/api/skipped/clear")
    @api
    def clear_skipped():
        json_body()
        current_session().skipped.clear()
        return jsonify(skipped=0)

    @app.post("/api/review/recompute")
    @api
    def recompute():
        """{}: compute the proposals again (in the background; poll /api/review/progress). The snapshot
        is every user's: a read-only session may read it but not replace it (which would turn others'
        pending "accept all" into 409s)."""
        json_body()
        if not can_write():
            raise InputError("recomputing the proposals needs a token that may write", 403, "PERMISSION_DENIED")
        info = client().info()
        if not info.labelled_count:
            raise InputError("no human labels yet: there is nothing to propose", 409, "FAILED_PRECONDITION")
        job = proposals.refresh(info, session_token(), force=True)
        return jsonify(job.progress())

    @app.post("/api/review/accept-above")
    @api
    def accept_above():
        """{"threshold", "label", "low", "high", "snapshot"}: accept every open proposal of the view
        (label "" for all, confidence in [low, high]) with confidence >= threshold, in the snapshot the
        page showed. Items given a human label since are left as they are."""
        body = json_body("threshold", "label", "low", "high", "snapshot")
        threshold = check_float("threshold", body["threshold"], 0.0, 1.0)
        low, high = check_float("low", body["low"], 0.0, 1.0), check_float("high", body["high"], 0.0, 1.0)
        if not isinstance(body["label"], str):
            raise InputError('label must be a string ("" for every label)')
        label = check_label(body["label"], "label filter") if body["label"] else ""
        if low > high:
            raise InputError(f"low ({low}) must not be above high ({high})")
        if isinstance(body["snapshot"], bool) or not isinstance(body["snapshot"], int):
            raise InputError("snapshot must be the number the page was given")
        snapshot = current_snapshot(body["snapshot"])
        chosen = snapshot.open_at_least(View(label, low, high), threshold)
        if not chosen:
            return jsonify(accepted=0, skipped=0, message=f"no open proposal reaches {threshold}")
        ids = [item_id for item_id, _ in chosen]
        stored = client().get(ids, ignore_missing=True)
        snapshot.reconcile(ids, stored)  # labelled elsewhere or deleted since: decided, left out
        still_open = {item.id for item in stored if not item.label}
        pairs = [(item_id, proposed) for item_id, proposed in chosen if item_id in still_open]
        accepted = 0
        for start in range(0, len(pairs), MAX_ASSIGNMENTS):
            chunk = dict(pairs[start : start + MAX_ASSIGNMENTS])
            accepted += client().set_labels(chunk)
            proposals.record_labels(chunk)
        return jsonify(accepted=accepted, skipped=len(chosen) - len(pairs))

    return app

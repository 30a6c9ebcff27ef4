"""The Flask application: pages rendered on the server, and a few JSON endpoints for the writes.

Every request goes to the gRPC service with the token of the browser session: the one given at
start-up, or the one typed into the sign-in page (kept in the signed session cookie). Whether the
token may write is asked once per session (an empty SetLabels, which a read-only token is refused):
a read-only session sees no write action, and the service refuses writes anyway.
"""

from __future__ import annotations

import functools
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import grpc
from flask import Flask, Response, abort, jsonify, redirect, render_template, request, session, url_for

from retrieval_client import RetrievalClient, RetrievalError

from .thumbnails import ThumbnailRefused, thumbnail

REVIEW_LIMIT = 500  # proposals shown on the review page


class Clients:
    """One RetrievalClient per token (gRPC channels are thread-safe and meant to be shared)."""

    def __init__(self, address: str, tls: bool | str) -> None:
        self.address, self.tls = address, tls
        self._clients: dict[str | None, RetrievalClient] = {}
        self._lock = threading.Lock()

    def get(self, token: str | None) -> RetrievalClient:
        with self._lock:
            if token not in self._clients:
                self._clients[token] = RetrievalClient(self.address, token=token, tls=self.tls, timeout=120)
            return self._clients[token]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


def create_app(address: str, token: str | None = None, image_roots: list[Path] = (), tls: bool | str = False) -> Flask:
    app = Flask(__name__)
    app.secret_key = secrets.token_bytes(32)  # sessions last as long as the process
    app.config["MAX_CONTENT_LENGTH"] = 32 * 2**20  # uploads for search
    roots = [Path(r).resolve() for r in image_roots]
    clients = Clients(address, tls)
    app.extensions["retrieval_clients"] = clients

    def client() -> RetrievalClient:
        return clients.get(token or session.get("token"))

    def can_write() -> bool | None:
        """Whether this session's token (or none) may write: asked once, with an empty SetLabels;
        None before sign-in (neither: the page shows no read-only badge then)."""
        if "can_write" not in session:
            try:
                client().set_labels({})
                session["can_write"] = True
            except RetrievalError as exc:
                if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                    return None  # not signed in (yet): asked again once a token is given
                if exc.code != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                session["can_write"] = False
        return session["can_write"]

    def page(view: Callable) -> Callable:
        """A page: signs in first when the service wants a token; service errors as a page."""

        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except RetrievalError as exc:
                if exc.code == grpc.StatusCode.UNAUTHENTICATED and not token:
                    session.clear()
                    return redirect(url_for("sign_in", next=request.full_path))
                return render_template("error.html", error=exc), 502 if exc.code == grpc.StatusCode.UNAVAILABLE else 400

        return wrapped

    def api(view: Callable) -> Callable:
        """A JSON write: the service's refusal (e.g. PERMISSION_DENIED) as a JSON error."""

        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except RetrievalError as exc:
                status = {
                    grpc.StatusCode.PERMISSION_DENIED: 403,
                    grpc.StatusCode.UNAUTHENTICATED: 401,
                    grpc.StatusCode.NOT_FOUND: 404,
                }.get(exc.code, 400)
                return jsonify(error=exc.code.name, message=str(exc)), status

        return wrapped

    @app.context_processor
    def common() -> dict:
        return {"writable": can_write()}

    @app.route("/sign-in", methods=["GET", "POST"])
    def sign_in():
        if request.method == "POST":
            session.clear()
            session["token"] = request.form.get("token", "").strip()
            return redirect(request.args.get("next") or url_for("overview"))
        return render_template("sign_in.html")

    @app.route("/")
    @page
    def overview():
        info = client().info()
        unlabelled = info.item_count - info.labelled_count
        return render_template("overview.html", info=info, unlabelled=unlabelled)

    @app.route("/search", methods=["GET", "POST"])
    @page
    def search():
        k = request.values.get("k", 24, type=int)
        if request.method == "POST":
            upload = request.files.get("image")
            if upload is None or not upload.filename:
                return render_template("search.html", hits=None, query=None, k=k, message="choose an image first")
            hits = client().search(image=upload.read(), k=k)
            return render_template("search.html", hits=hits, query=f"the uploaded {upload.filename}", k=k)
        item_id = request.args.get("id")
        if not item_id:
            return render_template("search.html", hits=None, query=None, k=k)
        return render_template("search.html", hits=client().search(id=item_id, k=k), query=item_id, k=k)

    @app.route("/label")
    @page
    def label():
        n = request.args.get("n", 12, type=int)
        info = client().info()
        unlabelled = info.item_count > info.labelled_count
        suggestions = client().suggest(n, seed=request.args.get("seed", 0, type=int)) if unlabelled else []
        return render_template("label.html", suggestions=suggestions, labels=sorted(info.label_counts), n=n)

    @app.route("/review")
    @page
    def review():
        threshold = request.args.get("threshold", 0.9, type=float)
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
        min_score = request.args.get("min_score", 0.95, type=float)
        groups = list(client().duplicates(min_score)) if 0 < min_score <= 1 else []
        return render_template("duplicates.html", groups=groups, min_score=min_score)

    @app.route("/thumb/<path:item_id>")
    @page
    def thumb(item_id: str):
        items = client().get([item_id], ignore_missing=True)
        if not items:
            abort(404)
        try:
            data = thumbnail(items[0].metadata.get("uri", ""), roots)
        except ThumbnailRefused as exc:
            app.logger.info("thumbnail of %s refused: %s", item_id, exc)
            abort(404)
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/labels")
    @api
    def set_labels():
        """{"labels": {id: label}} as human labels ("" clears)."""
        labels = request.get_json(force=True).get("labels", {})
        return jsonify(updated=client().set_labels({str(k): str(v) for k, v in labels.items()}))

    @app.post("/api/reject")
    @api
    def reject():
        """{"ids": [...]}: drop their predicted labels."""
        ids = request.get_json(force=True).get("ids", [])
        return jsonify(updated=client().set_labels({str(i): "" for i in ids}, predicted=True))

    return app

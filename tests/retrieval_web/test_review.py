"""The review page's proposals (retrieval_web/review.py) on made-up proposals: the pages of a view,
walked by cursor in both orders, cover each of its proposals once and in order, and hold when states
change between pages; the filters; the default "accept all" threshold; what the page's writes and
the store's answers do to the states; rejections carried to the next snapshot. The same code against
a real server, through the page, is in test_app.py and test_browser.py."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_client import StoredItem
from retrieval_web.review import ORDERS, Snapshot, View, cursor_text, default_threshold

LABELS = ("bird", "cat", "dog")


def make(n: int = 250, rejected: dict[str, str] | None = None, seed: int = 0) -> Snapshot:
    """n proposals in a shuffled stream order, with many equal confidences (the id breaks the ties)."""
    rng = np.random.default_rng(seed)
    ids = [f"id{i:04d}" for i in rng.permutation(n)]
    confidences = np.round(rng.random(n), 2).astype(np.float32).tolist()
    labels = [LABELS[int(i[2:]) % len(LABELS)] for i in ids]  # each id keeps its label in every snapshot
    return Snapshot(1, (ids, labels, confidences), (n, 3, ()), 0.5, rejected or {})


def expected(snapshot: Snapshot, view: View, order: str) -> list[tuple[float, str]]:
    """The view's (confidence, id) in order, from first principles (float32 bounds, as the masks)."""
    low, high = float(np.float32(view.low)), float(np.float32(view.high))
    rows = [
        (c, i)
        for i, c, lab in zip(snapshot.ids, snapshot.confidence.tolist(), (snapshot.label_of(i) for i in snapshot.ids))
        if low <= c <= high and (not view.label or lab == view.label)
    ]
    return sorted(rows, reverse=order == "highest")


def walk(snapshot: Snapshot, view: View, order: str, size: int) -> list:
    pages = [snapshot.page(view, order, size)]
    while pages[-1].after is not None:
        pages.append(snapshot.page(view, order, size, after=pages[-1].after))
    return pages


VIEWS = [View(), View(label="dog"), View(low=0.2, high=0.5), View(label="cat", low=0.9), View(low=0.5, high=0.5)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("view", VIEWS, ids=str)
def test_pages_cover_the_view_once_in_order_and_go_back(order, view):
    snapshot = make()
    pages = walk(snapshot, view, order, 17)
    want = expected(snapshot, view, order)
    assert [(r.confidence, r.id) for p in pages for r in p.rows] == want
    shown = 0
    for n, page in enumerate(pages):
        assert page.total == len(want) and page.first == (shown + 1 if want else 0)
        assert (page.before is None) == (n == 0)
        if n:
            assert snapshot.page(view, order, 17, before=page.before).rows == pages[n - 1].rows
        shown += len(page.rows)
    assert all(len(p.rows) == 17 for p in pages[:-1])


def test_an_unknown_label_lists_nothing():
    page = make().page(View(label="zebra"), "lowest", 10)
    assert (page.rows, page.total, page.after, page.before) == ([], 0, None, None)


def test_a_cursor_holds_when_states_change_between_pages():
    """Accepting the first page does not move the second: the cursor is a proposal, not an offset."""
    snapshot, untouched = make(), make()
    first = snapshot.page(View(), "lowest", 10)
    snapshot.record_labels({row.id: row.label for row in first.rows})
    second = snapshot.page(View(), "lowest", 10, after=first.after)
    assert second.rows == untouched.page(View(), "lowest", 10, after=first.after).rows
    assert second.first == 1 and second.total == len(snapshot) - 10  # the accepted ones left the open view
    decided = snapshot.page(View(show="decided"), "lowest", 20)
    assert [r.id for r in decided.rows] == [r.id for r in first.rows] and {r.state for r in decided.rows} == {
        "accepted"
    }
    # a cursor read back from its query parameter is the same cursor
    confidence, _, item_id = cursor_text(first.after).partition(" ")
    assert (float(confidence), item_id) == first.after


def test_the_states_follow_the_pages_writes_and_the_store():
    snapshot = make(20)
    a, b, c, d, e, f = snapshot.page(View(), "lowest", 6).rows
    other = next(lab for lab in LABELS if lab != b.label)
    snapshot.record_labels({a.id: a.label, b.id: other, "not-proposed": "cat"})
    snapshot.record_rejected([c.id])
    snapshot.record_deleted([d.id])
    assert [snapshot.row(r.id).state for r in (a, b, c, d)] == ["accepted", "relabelled", "rejected", "gone"]
    assert snapshot.rejected == {c.id: c.label}
    assert d.id not in [r.id for r in snapshot.page(View(show="all"), "lowest", 20).rows]
    snapshot.record_labels({a.id: ""})  # cleared (the label page's undo): open again
    assert snapshot.row(a.id).state == "open"
    # what Get says of shown proposals: deleted elsewhere, labelled elsewhere, label cleared elsewhere
    stored = [
        StoredItem(f.id, other if f.label != other else LABELS[0], "", 0.0, {}),
        StoredItem(b.id, "", "", 0.0, {}),
        StoredItem(c.id, c.label, "", 0.0, {}),
    ]
    snapshot.reconcile([e.id, f.id, b.id, c.id], stored)
    assert [snapshot.row(r.id).state for r in (e, f, b, c)] == ["gone", "relabelled", "open", "accepted"]
    assert snapshot.rejected == {}  # a human label decided the rejected one


def test_a_rejection_carries_to_the_next_snapshot_while_the_proposal_is_the_same():
    snapshot = make()
    kept, changed = snapshot.page(View(), "lowest", 2).rows
    snapshot.record_rejected([kept.id, changed.id])
    carried = dict(snapshot.rejected) | {changed.id: "zebra"}  # as if the vote had proposed zebra then
    fresh = make(rejected=carried)
    assert fresh.rejected == {kept.id: kept.label}
    assert fresh.row(kept.id).state == "rejected" and fresh.row(changed.id).state == "open"
    assert kept.id not in [r.id for p in walk(fresh, View(), "lowest", 50) for r in p.rows]


def test_the_open_proposals_at_a_threshold():
    snapshot = make()
    view = View(label="dog", low=0.1)
    chosen = snapshot.open_at_least(view, 0.6)
    assert sorted(i for i, _ in chosen) == sorted(i for c, i in expected(snapshot, View("dog", 0.6, 1.0), "lowest"))
    assert {lab for _, lab in chosen} == {"dog"}
    snapshot.record_rejected([chosen[0][0]])
    assert len(snapshot.open_at_least(view, 0.6)) == len(chosen) - 1
    assert len(snapshot.open_confidences(view)) == len(expected(snapshot, view, "lowest")) - 1


@pytest.mark.parametrize(
    "confidences",
    [
        np.random.default_rng(0).random(1000),
        np.full(50, 1 / 3),  # a vote split evenly over three labels, everywhere
        np.array([0.97]),
        np.concatenate([np.full(90, 0.2), np.full(10, 0.99)]),
    ],
    ids=["uniform", "all-equal", "one", "clustered"],
)
def test_the_default_threshold_is_reached_by_at_least_a_quarter(confidences):
    confidences = confidences.astype(np.float32)
    threshold = default_threshold(confidences)
    assert (confidences >= threshold).mean() >= 0.25
    assert threshold <= confidences.max() and threshold == round(threshold, 3)


def test_the_default_threshold_of_no_proposal_is_none_and_of_a_range_its_top_quarter():
    assert default_threshold(np.array([], np.float32)) is None
    assert default_threshold(np.linspace(0, 1, 101, dtype=np.float32)) == 0.75


def test_a_previous_page_short_of_proposals_is_the_first_page():
    """Before the 5th proposal there are only 4: "previous" shows the first full page instead."""
    snapshot = make()
    fifth = snapshot.page(View(), "highest", 5).rows[-1]
    back = snapshot.page(View(), "highest", 17, before=(fifth.confidence, fifth.id))
    assert back.rows == snapshot.page(View(), "highest", 17).rows and back.before is None

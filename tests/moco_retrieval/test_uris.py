"""An item's image from its uri: file:// URIs and paths inside the image roots (links followed), relative
ones looked up under each root in turn, everything else refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from moco_retrieval.uris import UriError, uri_path


def test_uris_inside_the_roots(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "x").mkdir(parents=True)
    (second / "y").mkdir(parents=True)
    image = second / "y" / "cat 1.png"
    image.write_bytes(b"png")
    (first / "link.png").symlink_to(image)
    roots = [first, second]
    assert uri_path(image.as_uri(), roots) == image  # file://, with an escaped space
    assert uri_path(f"file://localhost{image}", roots) == image
    assert uri_path(str(image), roots) == image  # a plain absolute path
    assert uri_path("y/cat 1.png", roots) == image  # relative: the root that holds it
    assert uri_path("x/gone.png", roots) == first / "x" / "gone.png"  # held by none: under the first (missing)
    assert uri_path(str(first / "link.png"), [first, second]) == image  # a link, followed, still inside


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("", "no uri"),
        ("http://host/a.png", "not a local file"),
        ("file://otherhost/a.png", "not a local file"),
        ("/etc/passwd", "outside the image roots"),
        ("../outside.png", "outside the image roots"),
    ],
)
def test_uris_elsewhere_are_refused(tmp_path: Path, uri: str, reason: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UriError, match=reason):
        uri_path(uri, [root])


def test_a_link_out_of_the_roots_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"png")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UriError, match="outside the image roots"):
        uri_path(str(root / "escape.png"), [root])

"""The HTML report: escaped, self-contained, and a page a real browser loads cleanly, with one card per
graded photograph and working filters (headless Chromium over the DevTools protocol)."""

import base64
import html
import os
import re

import numpy as np
import pytest

from cleaq_jax.evaluation import html_report
from tests import _browser

NASTY = '<img src=x onerror="alert(1)">&"q\'.jpg'


def _image(seed, size=24):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _cards(n=5, linked: str | None = None):
    """n cards with grades 0..4 in turn and quality cycling good/usable/reject; one nasty file name."""
    cards = []
    for i in range(n):
        grade_p = np.full(5, 0.05)
        grade_p[i % 5] = 0.8
        quality_p = np.full(3, 0.1)
        quality_p[i % 3] = 0.8
        images = [("photograph", _image(i)), ("enhanced", html_report.png_bytes(_image(100 + i)))]
        if linked and i == 0:
            images.append(("Grad-CAM", linked))
        name = NASTY if i == 1 else f"photos/eye_{i}.png"
        cards.append(html_report.Card(name, images, grade_p, quality_p, note="graded enhanced"))
    return cards


SKIPPED = [("photos/broken <1>.jpg", "unreadable image\n(truncated file)"),
           ("photos/dark.png", "no retinal disc found")]


def test_every_file_name_and_reason_is_escaped():
    page = html_report.render(_cards(), SKIPPED)
    assert NASTY not in page and "<1>" not in page
    assert html.escape(NASTY) in page
    assert "onerror=" not in page.replace(html.escape('onerror="'), "")
    assert "unreadable image (truncated file)" in page  # reasons on one line


def test_one_card_per_photograph_and_the_skipped_list():
    page = html_report.render(_cards(4), SKIPPED)
    assert len(re.findall(r'<article class="card"', page)) == 4
    assert page.count("<tr><td>photos/") == 2 and "Skipped (2)" in page


def test_inline_images_are_the_png_bytes_and_nothing_points_to_the_network():
    png = html_report.png_bytes(_image(7))
    card = html_report.Card("a.png", [("photograph", png)], [1.0, 0.0], None)
    page = html_report.render([card])
    src = re.search(r'<img src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(src) == png
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "default-src 'none'" in page


def test_image_links_must_be_relative():
    for bad in ("/abs/heat.png", "https://example.org/x.png"):
        with pytest.raises(ValueError, match="relative"):
            html_report.image_src(bad)
    assert html_report.image_src("heat maps/a&b.png") == "heat%20maps/a%26b.png"


def test_a_card_without_grader_or_quality_network_still_renders():
    page = html_report.render([html_report.Card("x.png", [("photograph", _image(0))])])
    assert 'data-grade=""' in page and "DR grade" not in page


def test_write_leaves_only_the_report(tmp_path):
    path = html_report.write(str(tmp_path / "report.html"), _cards(2))
    assert os.listdir(tmp_path) == ["report.html"] and open(path, encoding="utf-8").read().startswith("<!DOCTYPE html>")


# --------------------------------------------------------------------------- in a browser
VISIBLE = "document.querySelectorAll('.card:not([hidden])').length"


def _choose(page, select_id, value):
    page.evaluate(f"(function(){{var s=document.getElementById('{select_id}'); s.value='{value}';"
                  "s.dispatchEvent(new Event('change'));})()")


@pytest.fixture
def browser(tmp_path):
    with _browser.Page(str(tmp_path / "profile")) as page:
        yield page


def test_the_page_loads_without_errors_and_shows_one_card_per_graded_photo(tmp_path, browser):
    beside = tmp_path / "explain"
    beside.mkdir()
    (beside / "eye 0.png").write_bytes(html_report.png_bytes(_image(9)))
    path = html_report.write(str(tmp_path / "report.html"), _cards(5, linked="explain/eye 0.png"), SKIPPED)
    browser.open("file://" + path)
    assert browser.errors() == []
    assert browser.evaluate("document.querySelectorAll('.card').length") == 5
    assert browser.evaluate(VISIBLE) == 5
    assert browser.evaluate("document.getElementById('shown').textContent") == "5 of 5 shown"
    # Every image decoded, the linked one beside the report included.
    assert browser.evaluate("Array.prototype.every.call(document.images, function(i){return i.naturalWidth>0})")
    assert browser.evaluate("document.querySelectorAll('#skipped tr').length") == 3  # header + 2
    assert browser.evaluate("document.querySelector('[data-index=\"1\"] h2').textContent") == NASTY


def test_filters_and_sorting_work_in_the_browser(tmp_path, browser):
    path = html_report.write(str(tmp_path / "report.html"), _cards(7), SKIPPED)
    browser.open("file://" + path)
    _choose(browser, "grade", "1")  # cards 1 and 6
    assert browser.evaluate(VISIBLE) == 2
    _choose(browser, "quality", "usable")  # of those, card 1 (quality index 1); card 6 is good
    assert browser.evaluate(VISIBLE) == 1
    _choose(browser, "grade", "")
    _choose(browser, "quality", "")
    _choose(browser, "sort", "grade")
    order = browser.evaluate("Array.prototype.map.call(document.querySelectorAll('.card'),"
                             "function(c){return +c.dataset.grade})")
    assert order == sorted(order, reverse=True)
    assert browser.errors() == []


def test_the_filter_is_read_from_the_address(tmp_path, browser):
    path = html_report.write(str(tmp_path / "report.html"), _cards(6))
    browser.open("file://" + path + "#quality=reject")  # cards 2 and 5
    assert browser.evaluate(VISIBLE) == 2
    assert browser.errors() == []


def test_the_browser_check_reports_a_broken_page(tmp_path, browser):
    """The check can fail: a missing image and a script error are both caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>throw new Error("boom")</script></body></html>')
    browser.open("file://" + str(bad))
    errors = browser.errors()
    assert any("boom" in e for e in errors) and any("missing.png" in e for e in errors)

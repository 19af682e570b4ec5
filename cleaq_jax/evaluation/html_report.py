"""A browsable report of graded photographs: one self-contained ``report.html``.

A card per photograph shows its images (the disc crop, IQE's enhancement, Grad-CAM overlays), the DR
grade and the quality with their probabilities; a small inline script filters the cards by grade and
quality and sorts them. Photographs that could not be graded are listed with the reason.

Images are PNG bytes (inlined as data URIs: one file to mail or archive), uint8 arrays (encoded and
inlined) or paths relative to the report (linked, for folders too large to inline). Nothing is fetched
from the network: the page carries its style and script and a Content-Security-Policy that forbids any
other source. Every file name and reason is HTML-escaped. The filter is also read from the address's
fragment (``report.html#grade=2&quality=reject&sort=confidence``), so a view can be shared as a link.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import urllib.parse
from collections.abc import Sequence
from typing import Union

import cv2
import numpy as np

from cleaq_jax.data.records import QUALITY_NAMES
from cleaq_jax.evaluation import report

ImageSource = Union[bytes, str, np.ndarray]
GRADE_NAMES_5 = ("no DR", "mild", "moderate", "severe", "proliferative")  # EyeQ / EyePACS levels


@dataclasses.dataclass(frozen=True)
class Card:
    """What the report shows of one photograph.

    Attributes:
      file: the photograph's path as the user gave it (shown escaped).
      images: (caption, image) pairs in display order; image is PNG bytes, an HxWx3 (or HxW) uint8 RGB
        array, or a path relative to the report's folder.
      grade_probs: DR grade probabilities (K,), or None when the checkpoint has no grader.
      quality_probs: probabilities of good / usable / reject, or None without IQA.
      note: optional one-line remark (e.g. "graded enhanced").
    """

    file: str
    images: Sequence[tuple[str, ImageSource]] = ()
    grade_probs: Sequence[float] | None = None
    quality_probs: Sequence[float] | None = None
    note: str = ""

    @property
    def grade(self) -> int | None:
        return None if self.grade_probs is None else int(np.argmax(self.grade_probs))

    @property
    def quality(self) -> str | None:
        return None if self.quality_probs is None else QUALITY_NAMES[int(np.argmax(self.quality_probs))]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an HxWx3 RGB or HxW grey uint8 array."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"report images must be HxWx3 RGB or HxW uint8 arrays, got {image.shape} {image.dtype}")
    bgr = image if image.ndim == 2 else image[..., ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise OSError(f"could not PNG-encode an image of shape {image.shape}")
    return buf.tobytes()


def image_src(image: ImageSource) -> str:
    """The ``src`` attribute for an image (escaped for an attribute): a data URI or a relative link."""
    if isinstance(image, np.ndarray):
        image = png_bytes(image)
    if isinstance(image, bytes):
        return "data:image/png;base64," + base64.b64encode(image).decode("ascii")
    if isinstance(image, str):
        if os.path.isabs(image) or urllib.parse.urlsplit(image).scheme:
            raise ValueError(f"report image {image!r} must be a path relative to the report (no network, "
                             "no absolute paths, so the folder can move)")
        return html.escape(urllib.parse.quote(image.replace(os.sep, "/")), quote=True)
    raise TypeError(f"report images are PNG bytes, uint8 arrays or relative paths, not {type(image).__name__}")


def _probability_rows(names: Sequence[str], probs: Sequence[float], chosen: int) -> str:
    rows = []
    for i, (name, p) in enumerate(zip(names, probs)):
        cls = ' class="chosen"' if i == chosen else ""
        rows.append(f'<tr{cls}><td>{html.escape(name)}</td><td class="bar"><span style="width:{100 * p:.1f}%">'
                    f'</span></td><td class="p">{p:.3f}</td></tr>')
    return "".join(rows)


def _card_html(index: int, card: Card, grade_names: Sequence[str]) -> str:
    grade, quality = card.grade, card.quality
    p_grade = -1.0 if grade is None else float(card.grade_probs[grade])
    p_quality = -1.0 if quality is None else float(np.max(card.quality_probs))
    attrs = (f'data-index="{index}" data-file="{html.escape(card.file, quote=True)}" '
             f'data-grade="{"" if grade is None else grade}" data-quality="{quality or ""}" '
             f'data-pgrade="{p_grade:.6f}" data-pquality="{p_quality:.6f}"')
    figures = "".join(f'<figure><img src="{image_src(img)}" alt="{html.escape(caption, quote=True)}">'
                      f'<figcaption>{html.escape(caption)}</figcaption></figure>' for caption, img in card.images)
    parts = [f'<article class="card" {attrs}>', f'<h2 title="{html.escape(card.file, quote=True)}">'
             f'{html.escape(card.file)}</h2>', f'<div class="images">{figures}</div>', '<div class="scores">']
    if grade is not None:
        names = [f"{g}: {grade_names[g]}" if g < len(grade_names) else str(g) for g in range(len(card.grade_probs))]
        parts.append(f'<table class="probs"><caption>DR grade <b>{html.escape(names[grade])}</b></caption>'
                     f'{_probability_rows(names, card.grade_probs, grade)}</table>')
    if quality is not None:
        parts.append(f'<table class="probs"><caption>quality <b>{quality}</b></caption>'
                     f'{_probability_rows(QUALITY_NAMES, card.quality_probs, QUALITY_NAMES.index(quality))}</table>')
    parts.append("</div>")
    if card.note:
        parts.append(f'<p class="note">{html.escape(card.note)}</p>')
    return "".join(parts) + "</article>"


def _controls(num_grades: int, grade_names: Sequence[str]) -> str:
    grades = "".join(f'<option value="{g}">{g}{": " + html.escape(grade_names[g]) if g < len(grade_names) else ""}'
                     f'</option>' for g in range(num_grades))
    qualities = "".join(f'<option value="{q}">{q}</option>' for q in QUALITY_NAMES)
    return ('<form id="controls" onsubmit="return false">'
            f'<label>grade <select id="grade"><option value="">all</option>{grades}</select></label>'
            f'<label>quality <select id="quality"><option value="">all</option>{qualities}</select></label>'
            '<label>sort <select id="sort"><option value="file">file name</option>'
            '<option value="grade">grade, highest first</option>'
            '<option value="confidence">grade probability, lowest first</option>'
            '<option value="quality">quality, worst first</option></select></label>'
            '<output id="shown"></output></form>')


def _skipped_html(skipped: Sequence[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    rows = "".join(f"<tr><td>{html.escape(path)}</td><td>{html.escape(' '.join(reason.split()))}</td></tr>"
                   for path, reason in skipped)
    return (f'<section id="skipped"><h2>Skipped ({len(skipped)})</h2>'
            f'<table><tr><th>file</th><th>reason</th></tr>{rows}</table></section>')


def render(cards: Sequence[Card], skipped: Sequence[tuple[str, str]] = (), *, title: str = "Predictions",
           subtitle: str = "", grade_names: Sequence[str] | None = None) -> str:
    """The report as one HTML string.

    Args:
      cards: one Card per graded photograph, in the order the page first shows them.
      skipped: (file, reason) for each photograph that could not be processed.
      title, subtitle: page heading and a line under it (e.g. the checkpoint), escaped.
      grade_names: names of the DR grades; default EyeQ's five when the grader has five outputs.
    """
    num_grades = max((len(c.grade_probs) for c in cards if c.grade_probs is not None), default=0)
    if grade_names is None:
        grade_names = GRADE_NAMES_5 if num_grades == 5 else ()
    body = "".join(_card_html(i, c, grade_names) for i, c in enumerate(cards))
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>",
        f'<p>{len(cards)} graded, {len(skipped)} skipped.</p>{_controls(num_grades, grade_names)}</header>',
        f'<main id="cards">{body}</main>', _skipped_html(skipped),
        f"<script>{SCRIPT}</script></body></html>\n"])


def write(path: str, cards: Sequence[Card], skipped: Sequence[tuple[str, str]] = (), **kw) -> str:
    """Render the report and write it to ``path`` under a temporary name first; returns ``path``.

    kw: `render`'s title, subtitle, grade_names.
    """
    text = render(cards, skipped, **kw)

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    report.atomic_file(path, dump)
    return path


# Images may be inline (data:) or beside the report ('self'; file: when opened from disk); nothing else loads.
CSP = ("default-src 'none'; img-src data: 'self' file:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f2;color:#222}
header{padding:12px 20px;background:#fff;border-bottom:1px solid #ddd;position:sticky;top:0;z-index:1}
h1{font-size:20px;margin:0 0 4px}header p{margin:2px 0;color:#555}
#controls{display:flex;gap:16px;flex-wrap:wrap;align-items:center;margin-top:6px}
#cards{display:flex;flex-wrap:wrap;gap:14px;padding:16px 20px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;width:min(100%,560px)}
.card[hidden]{display:none}
.card h2{font-size:13px;margin:0 0 8px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.images{display:flex;gap:6px;flex-wrap:wrap}
figure{margin:0;width:128px}figure img{width:128px;height:128px;object-fit:contain;background:#000;
image-rendering:pixelated;display:block}
figcaption{font-size:11px;color:#555;text-align:center}
.scores{display:flex;gap:18px;margin-top:8px;flex-wrap:wrap;align-items:flex-start}
table.probs{border-collapse:collapse;font-size:12px}table.probs caption{text-align:left;padding-bottom:2px}
table.probs td{padding:0 4px}tr.chosen td{font-weight:bold}
td.bar{width:90px}td.bar span{display:block;height:8px;background:#4a7bd0}td.p{text-align:right}
.note{font-size:12px;color:#555;margin:6px 0 0}
#skipped{padding:0 20px 20px}#skipped table{border-collapse:collapse;background:#fff}
#skipped td,#skipped th{border:1px solid #ddd;padding:3px 8px;text-align:left}
"""

SCRIPT = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var box = document.getElementById('cards');
  var controls = {grade: document.getElementById('grade'), quality: document.getElementById('quality'),
                  sort: document.getElementById('sort')};
  var worst = {good: 0, usable: 1, reject: 2};
  var keys = {
    file: function (c) { return c.dataset.file; },
    grade: function (c) { return -(c.dataset.grade === '' ? -1 : +c.dataset.grade); },
    confidence: function (c) { return +c.dataset.pgrade; },
    quality: function (c) { return -(c.dataset.quality in worst ? worst[c.dataset.quality] : -1); }
  };
  function update() {
    var grade = controls.grade.value, quality = controls.quality.value, key = keys[controls.sort.value];
    var shown = 0;
    cards.forEach(function (c) {
      c.hidden = (grade !== '' && c.dataset.grade !== grade) || (quality !== '' && c.dataset.quality !== quality);
      if (!c.hidden) { shown += 1; }
    });
    cards.slice().sort(function (a, b) {
      var ka = key(a), kb = key(b);
      return ka < kb ? -1 : ka > kb ? 1 : (+a.dataset.index) - (+b.dataset.index);
    }).forEach(function (c) { box.appendChild(c); });
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' shown';
    var state = ['grade', 'quality', 'sort'].filter(function (k) { return controls[k].value !== '' &&
      !(k === 'sort' && controls[k].value === 'file'); }).map(function (k) { return k + '=' + controls[k].value; });
    history.replaceState(null, '', state.length ? '#' + state.join('&') : location.pathname + location.search);
  }
  location.hash.slice(1).split('&').forEach(function (pair) {
    var kv = pair.split('='), el = controls[kv[0]];
    if (el && Array.prototype.some.call(el.options, function (o) { return o.value === kv[1]; })) { el.value = kv[1]; }
  });
  ['grade', 'quality', 'sort'].forEach(function (k) { controls[k].addEventListener('change', update); });
  update();
})();
"""

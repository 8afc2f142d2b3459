"""A flame graph as a standalone, interactive SVG (after Brendan Gregg's flamegraph.pl), and the
same tree as folded stacks or as a speedscope profile: stdlib only.

The SVG carries a small script of its own (:data:`SCRIPT`): click a frame to zoom
to it (its callers stay, full width, at the bottom), click "Reset zoom" or press
Escape to zoom out, click "Search" (or press Ctrl-F or /) to highlight the frames
whose name matches a regular expression and see their share of the whole.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from html import escape
from typing import Any, Iterator


@dataclass
class Frame:
    """A node of the stack tree: one function called from one stack."""

    label: str  # shown in the box
    title: str  # shown on hover, before the time
    value: float = 0.0  # time, callees included
    calls: int = 0
    children: list["Frame"] = field(default_factory=list)
    #: For the speedscope output: the function's name and file.
    name: str = ""
    file: str = ""


def color(label: str) -> str:
    """flamegraph.pl's "hot" palette, with the hue fixed by the name."""
    h = zlib.crc32(label.encode())
    r, g, b = 205 + h % 50, (h >> 8) % 230, (h >> 16) % 55
    return f"rgb({r},{g},{b})"


def fit(label: str, width: float) -> str:
    """The part of ``label`` that fits in a box ``width`` pixels wide (the script does the same)."""
    fits = int((width - 6) / 7.2)
    if fits < 3:
        return ""
    return label if len(label) <= fits else label[: fits - 2] + ".."


#: The script of the SVG. The layout functions (zoomLayout, searchShare, fit) are pure, so that
#: the tests run them outside a browser; init() ties them to the document.
SCRIPT = r"""
"use strict";
var PAD = 10, WIDTH = 0, frames = [], zoomed = null;

function fit(label, width) {
  var fits = Math.floor((width - 6) / 7.2);
  if (fits < 3) return "";
  return label.length <= fits ? label : label.slice(0, fits - 2) + "..";
}

// Where each frame goes when `target` fills the width: [x, w] for the frames shown (the
// target, what it called, and its callers, stretched), null for the others.
function zoomLayout(all, target, width) {
  var full = width - 2 * PAD, scale = full / target.w, eps = 1e-6;
  return all.map(function (f) {
    var inside = f.x >= target.x - eps && f.x + f.w <= target.x + target.w + eps;
    if (f.level >= target.level && inside) return [PAD + (f.x - target.x) * scale, f.w * scale];
    var below = f.x <= target.x + eps && f.x + f.w >= target.x + target.w - eps;
    if (f.level < target.level && below) return [PAD, full];
    return null;
  });
}

// The share of the whole (0 to 100) spent in frames whose label matches `pattern`, counting a
// match inside another match once; and which frames match.
function searchShare(all, pattern, total) {
  var hits = all.map(function (f) { return pattern.test(f.label); });
  var spans = [];
  all.forEach(function (f, i) { if (hits[i]) spans.push([f.x, f.x + f.w]); });
  spans.sort(function (a, b) { return a[0] - b[0] || b[1] - a[1]; });
  var covered = 0, end = -Infinity;
  spans.forEach(function (s) {
    if (s[0] >= end) { covered += s[1] - s[0]; end = s[1]; }
    else if (s[1] > end) { covered += s[1] - end; end = s[1]; }
  });
  return { share: total > 0 ? 100 * covered / total : 0, hits: hits };
}

function place(f, box) {
  if (box === null) { f.g.style.display = "none"; return; }
  f.g.style.display = "";
  f.rect.setAttribute("x", box[0].toFixed(1));
  f.rect.setAttribute("width", box[1].toFixed(1));
  f.text.setAttribute("x", (box[0] + 3).toFixed(1));
  f.text.textContent = fit(f.label, box[1]);
}

function zoom(target) {
  zoomed = target;
  var boxes = zoomLayout(frames, target, WIDTH);
  frames.forEach(function (f, i) {
    place(f, boxes[i]);
    f.g.style.opacity = boxes[i] !== null && f.level < target.level ? "0.6" : "";
  });
  document.getElementById("reset").style.display = "";
}

function reset() {
  zoomed = null;
  frames.forEach(function (f) { place(f, [f.x, f.w]); f.g.style.opacity = ""; });
  document.getElementById("reset").style.display = "none";
}

function search(term) {
  var matched = document.getElementById("matched");
  if (term === null || term === "") {
    frames.forEach(function (f) { f.rect.setAttribute("fill", f.fill); });
    matched.textContent = "";
    document.getElementById("search").textContent = "Search";
    return;
  }
  var pattern;
  try { pattern = new RegExp(term); } catch (e) { matched.textContent = "bad pattern: " + term; return; }
  var total = WIDTH - 2 * PAD, result = searchShare(frames, pattern, total);
  frames.forEach(function (f, i) { f.rect.setAttribute("fill", result.hits[i] ? "rgb(230,0,230)" : f.fill); });
  matched.textContent = "Matched: " + result.share.toFixed(1) + "%";
  document.getElementById("search").textContent = "Clear search";
}

function askSearch() {
  if (document.getElementById("search").textContent !== "Search") { search(null); return; }
  search(window.prompt("Highlight the frames whose name matches (a regular expression):", ""));
}

function init() {
  WIDTH = +document.documentElement.getAttribute("width");
  var groups = document.getElementsByClassName("frame");
  for (var i = 0; i < groups.length; i++) {
    var g = groups[i], rect = g.getElementsByTagName("rect")[0];
    var f = { g: g, rect: rect, text: g.getElementsByTagName("text")[0], label: g.getAttribute("data-label"),
              x: +rect.getAttribute("x"), w: +rect.getAttribute("width"), level: +g.getAttribute("data-level"),
              fill: rect.getAttribute("fill") };
    frames.push(f);
    g.addEventListener("click", (function (f) { return function () { zoom(f); }; })(f));
  }
  document.getElementById("reset").addEventListener("click", reset);
  document.getElementById("search").addEventListener("click", askSearch);
  window.addEventListener("keydown", function (e) {
    if (e.key === "Escape") { reset(); search(null); }
    else if ((e.key === "f" && (e.ctrlKey || e.metaKey)) || e.key === "/") { e.preventDefault(); askSearch(); }
  });
}

if (typeof window !== "undefined") window.addEventListener("load", init);
if (typeof module !== "undefined") module.exports = { fit: fit, zoomLayout: zoomLayout, searchShare: searchShare };
"""


def levels(root: Frame) -> int:
    deepest, todo = 0, [(root, 1)]
    while todo:
        frame, level = todo.pop()
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in frame.children)
    return deepest


def svg(root: Frame, title: str, subtitle: str = "", unit: str = "ns", width: int = 1200,
        frame_height: int = 16) -> str:
    """The SVG of the tree under ``root`` (whose value is the total); the root is the bottom bar."""
    pad_top, pad_bottom, pad_side = 52 if subtitle else 36, 24, 10
    height = pad_top + levels(root) * frame_height + pad_bottom
    scale = (width - 2 * pad_side) / root.value if root.value else 0
    out = [
        '<?xml version="1.0" standalone="no"?>',
        f'<svg version="1.1" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg">',
        "<style>text { font-family: monospace; font-size: 12px; } g.frame:hover rect { stroke: black; } "
        "g.frame { cursor: pointer; } .button { cursor: pointer; fill: #333; } .button:hover { fill: #c00; }"
        "</style>",
        f"<script type=\"text/ecmascript\"><![CDATA[{SCRIPT}]]></script>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f8f8e8"/>',
        f'<text x="{width // 2}" y="22" text-anchor="middle" style="font-size: 16px">{escape(title)}</text>',
    ]
    if subtitle:
        out.append(f'<text x="{width // 2}" y="40" text-anchor="middle" style="fill: #555">{escape(subtitle)}</text>')
    out += [
        f'<text id="reset" class="button" x="{pad_side}" y="22" style="display: none">Reset zoom</text>',
        f'<text id="search" class="button" x="{width - pad_side}" y="22" text-anchor="end">Search</text>',
        f'<text id="matched" x="{width - pad_side}" y="{height - 8}" text-anchor="end"></text>',
    ]

    todo = [(root, float(pad_side), 0)]
    while todo:
        frame, x, level = todo.pop()
        w = frame.value * scale
        if w < 0.1:
            continue
        y = height - pad_bottom - (level + 1) * frame_height
        share = 100 * frame.value / root.value
        calls = f", {frame.calls} calls" if frame.calls else ""
        tip = (f"{frame.title}: {frame.value / 1e6:.3f} ms ({share:.2f}%){calls}" if unit == "ns"
               else f"{frame.title}: {frame.value:.0f} {unit} ({share:.2f}%)")
        out.append(f'<g class="frame" data-label="{escape(frame.label)}" data-level="{level}">'
                   f"<title>{escape(tip)}</title>")
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{frame_height - 1}" '
                   f'fill="{color(frame.label)}" rx="2"/>')
        out.append(f'<text x="{x + 3:.1f}" y="{y + frame_height - 4}">{escape(fit(frame.label, w))}</text>')
        out.append("</g>")
        for child in sorted(frame.children, key=lambda c: c.label):
            todo.append((child, x, level + 1))
            x += child.value * scale
    out.append("</svg>")
    return "\n".join(out) + "\n"


def own_time(frame: Frame) -> float:
    """A frame's time less its callees'."""
    return frame.value - sum(child.value for child in frame.children)


def stacks(root: Frame) -> Iterator[tuple[list[Frame], float]]:
    """Every stack below ``root`` (outermost frame first) with time of its own, and that time."""
    todo = [(child, [child]) for child in root.children]
    while todo:
        frame, path = todo.pop()
        own = own_time(frame)
        if own > 0:
            yield path, own
        todo.extend((child, path + [child]) for child in frame.children)


def folded(root: Frame) -> list[str]:
    """Folded stacks: ``frame;frame;frame SELF_NANOSECONDS``, one line per stack with time of its own."""
    return sorted(f"{';'.join(f.title for f in path)} {own:.0f}" for path, own in stacks(root))


def speedscope(root: Frame, name: str, unit: str = "nanoseconds") -> dict[str, Any]:
    """The tree as a speedscope profile (https://www.speedscope.app/file-format-schema.json): a
    "sampled" profile whose samples are the stacks and whose weights are their own time in
    nanoseconds, as speedscope imports folded stacks."""
    index: dict[tuple[str, str], int] = {}
    frames: list[dict[str, str]] = []
    samples, weights = [], []
    for path, own in sorted(stacks(root), key=lambda item: [f.title for f in item[0]]):
        sample = []
        for frame in path:
            key = (frame.name or frame.label, frame.file)
            if key not in index:
                index[key] = len(frames)
                frames.append({"name": key[0], **({"file": key[1]} if key[1] else {})})
            sample.append(index[key])
        samples.append(sample)
        weights.append(round(own))
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": [{
            "type": "sampled",
            "name": name,
            "unit": unit,
            "startValue": 0,
            "endValue": sum(weights),
            "samples": samples,
            "weights": weights,
        }],
        "name": name,
        "activeProfileIndex": 0,
        "exporter": "pydtrace-rs",
    }


def speedscope_json(root: Frame, name: str, unit: str = "nanoseconds") -> str:
    return json.dumps(speedscope(root, name, unit), indent=None, separators=(",", ":")) + "\n"

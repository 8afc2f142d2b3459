"""A flame graph as a standalone SVG, after Brendan Gregg's flamegraph.pl: stdlib only."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from html import escape


@dataclass
class Frame:
    """A node of the stack tree: one function called from one stack."""

    label: str  # shown in the box
    title: str  # shown on hover, before the time
    value: float = 0.0  # time, callees included
    calls: int = 0
    children: list["Frame"] = field(default_factory=list)


def color(label: str) -> str:
    """flamegraph.pl's "hot" palette, with the hue fixed by the name."""
    h = zlib.crc32(label.encode())
    r, g, b = 205 + h % 50, (h >> 8) % 230, (h >> 16) % 55
    return f"rgb({r},{g},{b})"


def svg(root: Frame, title: str, unit: str = "ns", width: int = 1200, frame_height: int = 16) -> str:
    """The SVG of the tree under ``root`` (whose value is the total); the root is the bottom bar."""

    levels, todo = 0, [(root, 1)]
    while todo:
        frame, level = todo.pop()
        levels = max(levels, level)
        todo.extend((child, level + 1) for child in frame.children)
    pad_top, pad_bottom, pad_side = 36, 10, 10
    height = pad_top + levels * frame_height + pad_bottom
    scale = (width - 2 * pad_side) / root.value if root.value else 0
    out = [
        '<?xml version="1.0" standalone="no"?>',
        f'<svg version="1.1" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg">',
        "<style>text { font-family: monospace; font-size: 12px; } g:hover rect { stroke: black; }</style>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f8f8e8"/>',
        f'<text x="{width // 2}" y="22" text-anchor="middle" style="font-size: 16px">{escape(title)}</text>',
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
        tip = f"{frame.title}: {frame.value / 1e6:.3f} ms ({share:.2f}%){calls}" if unit == "ns" else frame.title
        out.append(f"<g><title>{escape(tip)}</title>")
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{frame_height - 1}" '
                   f'fill="{color(frame.label)}" rx="2"/>')
        fits = int((w - 6) / 7.2)
        if fits >= 3:
            text = frame.label if len(frame.label) <= fits else frame.label[: fits - 2] + ".."
            out.append(f'<text x="{x + 3:.1f}" y="{y + frame_height - 4}">{escape(text)}</text>')
        out.append("</g>")
        for child in sorted(frame.children, key=lambda c: c.label):
            todo.append((child, x, level + 1))
            x += child.value * scale
    out.append("</svg>")
    return "\n".join(out) + "\n"

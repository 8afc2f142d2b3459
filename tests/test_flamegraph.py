"""The flame graph's outputs from a known tree, without a tracer: the SVG (its frames, and its
script's zoom and search run by node where node is installed), folded stacks, and speedscope's
file format."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest

from dtrace.tools.render import flamegraph
from dtrace.tools.render.flamegraph import Frame

SVG = "{http://www.w3.org/2000/svg}"


def tree() -> Frame:
    """main (1000 ns, 100 of its own) calls emit (300 ns, 200 of its own), which calls emit again
    (100 ns), and parse (600 ns, 100 of its own), which calls token (500 ns)."""
    token = Frame("token", "token (a.py)", 500, 5, name="token", file="a.py")
    parse = Frame("parse", "parse (a.py)", 600, 1, [token], name="parse", file="a.py")
    inner = Frame("emit", "emit (b.py)", 100, 1, name="emit", file="b.py")
    emit = Frame("emit", "emit (b.py)", 300, 1, [inner], name="emit", file="b.py")
    main = Frame("main", "main (a.py)", 1000, 1, [parse, emit], name="main", file="a.py")
    return Frame("all", "all", 1000, 0, [main])


def frames_of(svg_text: str) -> list[dict]:
    root = ElementTree.fromstring(svg_text)
    frames = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") != "frame":
            continue
        rect = g.find(f"{SVG}rect")
        frames.append({"label": g.get("data-label"), "level": int(g.get("data-level")),
                       "x": float(rect.get("x")), "w": float(rect.get("width")),
                       "title": g.find(f"{SVG}title").text, "text": g.find(f"{SVG}text").text or ""})
    return frames


def test_svg_frames_are_laid_out_by_time_and_named():
    text = flamegraph.svg(tree(), "Python time", "wall time from entry to return", width=1020)
    frames = {(f["label"], f["level"], round(f["x"])): f for f in frames_of(text)}
    # 1000 px for 1000 ns, from x=10: the bottom bar is "all", then main, then its callees by name.
    assert sorted(frames) == [("all", 0, 10), ("emit", 2, 10), ("emit", 3, 10), ("main", 1, 10),
                              ("parse", 2, 310), ("token", 3, 310)]
    assert [frames[k]["w"] for k in sorted(frames)] == [1000.0, 300.0, 100.0, 1000.0, 600.0, 500.0]
    assert frames[("token", 3, 310)]["title"] == "token (a.py): 0.001 ms (50.00%), 5 calls"
    assert frames[("parse", 2, 310)]["text"] == "parse"
    root = ElementTree.fromstring(text)
    ids = {e.get("id") for e in root.iter() if e.get("id")}
    assert {"reset", "search", "matched"} <= ids
    assert "wall time from entry to return" in "".join(root.itertext())
    script = root.find(f"{SVG}script").text
    assert "function zoomLayout" in script and "function searchShare" in script


def test_labels_are_cut_to_fit_their_box():
    assert flamegraph.fit("parse_expression", 100) == "parse_expre.."  # 13 characters of 7.2 px
    assert flamegraph.fit("parse", 100) == "parse"
    assert flamegraph.fit("parse", 20) == ""


def test_folded_stacks_carry_each_stacks_own_time():
    assert flamegraph.folded(tree()) == [
        "main (a.py) 100",
        "main (a.py);emit (b.py) 200",
        "main (a.py);emit (b.py);emit (b.py) 100",
        "main (a.py);parse (a.py) 100",
        "main (a.py);parse (a.py);token (a.py) 500",
    ]


def test_speedscope_is_a_sampled_profile_of_the_stacks():
    profile = flamegraph.speedscope(tree(), "Python time")
    assert profile["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = profile["shared"]["frames"]
    assert frames == [{"name": "main", "file": "a.py"}, {"name": "emit", "file": "b.py"},
                      {"name": "parse", "file": "a.py"}, {"name": "token", "file": "a.py"}]
    (only,) = profile["profiles"]
    assert only["type"] == "sampled" and only["unit"] == "nanoseconds"
    stacks = [[frames[i]["name"] for i in sample] for sample in only["samples"]]
    assert list(zip(stacks, only["weights"])) == [
        (["main"], 100), (["main", "emit"], 200), (["main", "emit", "emit"], 100), (["main", "parse"], 100),
        (["main", "parse", "token"], 500)]
    assert only["startValue"] == 0 and only["endValue"] == 1000
    assert json.loads(flamegraph.speedscope_json(tree(), "Python time")) == profile


def run_script(expression: str, svg_text: str):
    """Evaluate ``expression`` in node with the SVG's script loaded and ``frames`` set to its frames."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the SVG's script is not run here")
    script = ElementTree.fromstring(svg_text).find(f"{SVG}script").text
    frames = [{k: f[k] for k in ("label", "level", "x", "w")} for f in frames_of(svg_text)]
    program = (f"const module = {{exports: {{}}}};\n{script}\nconst api = module.exports;\n"
               f"const testFrames = {json.dumps(frames)};\n"
               f"console.log(JSON.stringify({expression}));\n")
    done = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return frames, json.loads(done.stdout)


def test_the_svgs_zoom_fills_the_width_with_a_frame_and_keeps_its_callers():
    text = flamegraph.svg(tree(), "t", width=1020)
    frames, boxes = run_script(
        "api.zoomLayout(testFrames, testFrames.find(f => f.label === 'parse'), 1020)", text)
    placed = {(f["label"], f["level"]): box for f, box in zip(frames, boxes)}
    assert placed[("parse", 2)] == [10, 1000]  # the frame fills the width
    assert placed[("token", 3)] == [10, pytest.approx(1000 * 500 / 600)]  # its callee, scaled
    assert placed[("main", 1)] == [10, 1000] and placed[("all", 0)] == [10, 1000]  # its callers
    assert placed[("emit", 2)] is None and placed[("emit", 3)] is None  # the rest is hidden


def test_the_svgs_search_counts_nested_matches_once():
    text = flamegraph.svg(tree(), "t", width=1020)
    frames, result = run_script("api.searchShare(testFrames, /^emit$/, 1000)", text)
    # emit (300) and the emit inside it (100): 30% of the whole, not 40%
    assert result["share"] == pytest.approx(30.0)
    assert [f["label"] for f, hit in zip(frames, result["hits"]) if hit] == ["emit", "emit"]
    frames, result = run_script("api.searchShare(testFrames, /a/, 1000)", text)
    assert result["share"] == pytest.approx(100.0)  # "all" and "main" and "parse" match: the whole
    frames, result = run_script("api.fit('parse_expression', 100)", text)
    assert result == flamegraph.fit("parse_expression", 100)

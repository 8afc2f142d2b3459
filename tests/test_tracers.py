"""The tracers' output as events, from canned output: bpftrace's JSON lines (with 0.17's escaped
bytes) and the lines our D scripts print through DTrace (which cannot run here). No tracer needed."""

from __future__ import annotations

import json

import pytest

from dtrace.tools.command.tracers import Bpftrace, DTrace, Event, decode_json_line

KEYS = {"@calls": 2, "@instances": 0, "@pause_us": 1, "@deletion_ns": 0, "@stats": 0}
HISTS = frozenset({"@pause_us", "@deletion_ns"})


def bpftrace_events(*lines: str) -> list[Event]:
    tracer = Bpftrace()
    return [event for line in lines for event in tracer.events(line, KEYS, HISTS)]


# --- bpftrace -f json ----------------------------------------------------------------------------


def test_printf_and_time():
    assert bpftrace_events('{"type": "printf", "data": "Tracing x... Hit Ctrl-C to end.\\n"}') == [
        Event("printf", data="Tracing x... Hit Ctrl-C to end.\n")]
    assert bpftrace_events('{"type": "time", "data": "12:34:56\\n"}') == [Event("time", data="12:34:56")]


def test_maps_by_key_tuple_split_from_the_right():
    line = json.dumps({"type": "map", "data": {"@calls": {"/tmp/a,b.py,f": 3, "<frozen x>,Cls.m": 1}}})
    assert bpftrace_events(line) == [Event("map", "@calls", {("/tmp/a,b.py", "f"): 3, ("<frozen x>", "Cls.m"): 1})]


def test_bpftrace_027_output():
    # Lines as bpftrace 0.27 prints them: map keys without their spaces, lost events as "count",
    # a read of an absent key reported under -k.
    frozen = '{"type": "map", "data": {"@calls": {"<frozenimportlib._bootstrap>,_call_with_frames_removed": 3}}}'
    assert bpftrace_events(frozen) == [
        Event("map", "@calls", {("<frozen importlib._bootstrap>", "_call_with_frames_removed"): 3})]
    assert decode_json_line('{"type": "map", "data": {"@": {"<frozen>": 1, "<frozenzipimport>": 2}}}') == {
        "type": "map", "data": {"@": {"<frozen>": 1, "<frozen zipimport>": 2}}}
    assert bpftrace_events('{"type":"lost_events", "count":35710}') == [Event("lost", data=35710)]
    assert bpftrace_events('{"type": "lost_events", "data": {"events": 12}}') == [Event("lost", data=12)]
    lookup = ('{"type": "helper_error", "msg": "Success", "helper": "map_lookup_elem", "retcode": 0, '
              '"filename": "stdin", "line": 1, "col": 23}')
    assert bpftrace_events(lookup) == []
    full = ('{"type": "helper_error", "msg": "Argument list too long", "helper": "map_update_elem", '
            '"retcode": -7, "filename": "stdin", "line": 1, "col": 48}')
    assert bpftrace_events(full) == [Event("map_full", data=1)]


def test_bpftrace_environment_names_both_releases_variables(monkeypatch):
    monkeypatch.delenv("BPFTRACE_PERF_RB_PAGES", raising=False)
    tracer = Bpftrace()
    tracer._version = (0, 27)
    env = tracer.environment(160, 5000, streaming=True)
    assert env["BPFTRACE_STRLEN"] == env["BPFTRACE_MAX_STRLEN"] == "160"
    assert env["BPFTRACE_MAP_KEYS_MAX"] == env["BPFTRACE_MAX_MAP_KEYS"] == "5000"
    assert env["BPFTRACE_PERF_RB_PAGES"] == "4096"  # one ring buffer for all CPUs
    tracer._version = (0, 17)
    assert tracer.environment(160, 5000, streaming=True)["BPFTRACE_PERF_RB_PAGES"] == "1024"  # per CPU


def test_a_tracer_path_from_the_option_or_the_environment(monkeypatch, tmp_path):
    from dtrace.tools.errors import ToolError
    from dtrace.tools.command.tracers import choose_tracer

    monkeypatch.setenv("PYDTRACE_BPFTRACE", "/bin/true")
    assert choose_tracer("bpftrace").executable() == "/bin/true"
    assert choose_tracer("bpftrace", "/bin/false").executable() == "/bin/false"
    with pytest.raises(ToolError, match="--tracer-path names .*missing.*not an executable"):
        choose_tracer("bpftrace", str(tmp_path / "missing")).executable()
    monkeypatch.setenv("PYDTRACE_BPFTRACE", str(tmp_path / "missing"))
    with pytest.raises(ToolError, match="PYDTRACE_BPFTRACE names"):
        choose_tracer("bpftrace").executable()


def test_a_map_without_a_key():
    assert bpftrace_events('{"type": "map", "data": {"@instances": 160}}') == [Event("map", "@instances", {(): 160})]


def test_histograms_with_and_without_a_key():
    buckets = [{"min": 256, "max": 511, "count": 30}, {"min": 1024, "count": 1}]
    assert bpftrace_events(json.dumps({"type": "hist", "data": {"@deletion_ns": buckets}})) == [
        Event("map", "@deletion_ns", {(): buckets})]
    assert bpftrace_events(json.dumps({"type": "hist", "data": {"@pause_us": {"0": buckets, "2": []}}})) == [
        Event("map", "@pause_us", {("0",): buckets, ("2",): []})]


def test_stats():
    value = {"count": 3, "average": 5, "total": 15}
    assert bpftrace_events(json.dumps({"type": "stats", "data": {"@stats": value}})) == [
        Event("map", "@stats", {(): value})]


def test_lost_events_full_maps_and_helper_errors():
    assert bpftrace_events('{"type": "lost_events", "data": {"events": 42}}') == [Event("lost", data=42)]
    assert bpftrace_events('{"type": "helper_error", "helper": "map_update_elem", "retcode": -7, "line": 3, '
                           '"col": 5}') == [Event("map_full", data=1)]
    assert bpftrace_events('{"type": "helper_error", "helper": "probe_read_user_str", "retcode": -14}') == [
        Event("helper_error", data="probe_read_user_str returned -14")]


def test_what_is_not_an_event():
    assert bpftrace_events('{"type": "attached_probes", "data": {"probes": 3}}') == []
    assert bpftrace_events("", "   ") == []
    # Text that is not JSON (a tracer's own warning on stdout) is passed on as printed.
    assert bpftrace_events("Attaching 3 probes...") == [Event("printf", data="Attaching 3 probes...\n")]
    assert bpftrace_events("[1, 2]") == [Event("printf", data="[1, 2]\n")]


def test_escaped_bytes_are_decoded_as_utf8():
    # bpftrace 0.17 writes "café" and "naïve.py" byte by byte, sign-extended.
    line = r'{"type": "map", "data": {"@calls": {"na\uffffffc3\uffffffafve.py,caf\uffffffc3\uffffffa9": 1}}}'
    assert bpftrace_events(line) == [Event("map", "@calls", {("naïve.py", "café"): 1})]
    assert decode_json_line(r'{"type": "printf", "data": "\uffffffe2\uffffff82\uffffffac\n"}') == {
        "type": "printf", "data": "€\n"}


def test_a_name_cut_inside_a_character_gets_a_replacement_character():
    # BPFTRACE_STRLEN cut "é" after its first byte.
    assert decode_json_line(r'{"data": "caf\uffffffc3"}') == {"data": "caf\ufffd"}


def test_plain_json_is_left_as_it_is():
    assert decode_json_line('{"data": "caf\\u00e9"}') == {"data": "café"}
    with pytest.raises(json.JSONDecodeError):
        decode_json_line("not json")


def test_bpftrace_leaves_its_loop_with_blank_lines():
    tracer = Bpftrace()
    assert tracer.leaving("", signalled=False) and tracer.leaving("  ", signalled=True)
    assert not tracer.leaving('{"type": "printf", "data": "\\n"}', signalled=True)


# --- dtrace: our D scripts' printa lines and DTrace's quantize tables -----------------------------


def dtrace_events(text: str) -> list[Event]:
    tracer = DTrace()
    events = [event for line in text.splitlines() for event in tracer.events(line, KEYS, HISTS)]
    return events + list(tracer.finish())


def test_dtrace_map_lines():
    text = "@calls\t/tmp/a.py\tf\t3\n@calls\t<frozen x>\tCls.m\t12\n@instances\t160\n"
    assert dtrace_events(text) == [
        Event("map", "@calls", {("/tmp/a.py", "f"): 3}),
        Event("map", "@calls", {("<frozen x>", "Cls.m"): 12}),
        Event("map", "@instances", {(): 160}),
    ]


def test_dtrace_quantize_tables_become_buckets():
    text = """\
@pause_us\t2

           value  ------------- Distribution ------------- count
               4 |                                         0
               8 |@@@@@@@@@@@@@@@@@@@@                     5
              16 |@@@@@@@@@@@@@@@@@@@@                     5
              32 |                                         0

@pause_us\t0
           value  ------------- Distribution ------------- count
               1 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@ 7
               2 |                                         0
Tracing done
"""
    assert dtrace_events(text) == [
        Event("map", "@pause_us", {("2",): [{"min": 8, "max": 15, "count": 5}, {"min": 16, "max": 31, "count": 5}]}),
        Event("map", "@pause_us", {("0",): [{"min": 1, "max": 1, "count": 7}]}),
        Event("printf", data="Tracing done\n"),
    ]


def test_dtrace_a_table_at_the_end_of_the_output_is_flushed():
    text = "@deletion_ns\n           value  ---- Distribution ---- count\n             256 |@@@@ 30\n             512 | 0\n"
    assert dtrace_events(text) == [Event("map", "@deletion_ns", {(): [{"min": 256, "max": 511, "count": 30}]})]


def test_dtrace_intervals_and_printf():
    assert dtrace_events("@time\t2025 Jan  1 12:00:00\nhello\n@unknown\tx\t1\n") == [
        Event("time", data="2025 Jan  1 12:00:00"),
        Event("printf", data="hello\n"),
        Event("printf", data="@unknown\tx\t1\n"),  # not one of the tool's maps: printed as is
    ]


def test_dtrace_leaves_when_it_prints_after_the_signal():
    assert DTrace().leaving("anything", signalled=True)
    assert not DTrace().leaving("anything", signalled=False)

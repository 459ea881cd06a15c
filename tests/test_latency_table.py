"""benchmarks/latency.py's markdown table: a merged results file holds the rows of several device calls, so a ratio is
formed only between rows of one call (diffrt and its peer timed on one host; rows from before rows named their call
stand for their commit's), every line names the commit(s) of its rows, and end to end is set against its components
only when they come from one call."""

from benchmarks.latency import markdown, merged


def row(impl: str, what: str, ms: float, commit: str, call: str | None = None) -> dict:
    cell = {"arch": "sd21", "impl": impl, "batch": 1, "height": 512, "width": 512, "what": what, "median_ms": ms}
    named = {"call": call} if call else {}  # rows written before 2026-12-03's evening name no call
    return {"gpu": "NVIDIA H200", "torch": "2.11.0", "commit": commit, "date": "2026-12-03T00:00:00+00:00", **cell,
            **named}  # fmt: skip


def line(text: str, *cells: str) -> str:
    found = [ln for ln in text.splitlines() if all(f"| {c} |" in ln for c in cells)]
    assert len(found) == 1, (cells, found)
    return found[0]


def test_a_ratio_only_between_rows_of_one_commit_and_each_line_names_its_commits():
    text = markdown([
        row("diffrt", "unet_step", 4.0, "aaaaaaa111"),
        row("diffusers compile", "unet_step", 6.0, "aaaaaaa111"),
        row("diffrt", "decode", 5.0, "bbbbbbb222"),
        row("diffusers compile", "decode", 7.5, "aaaaaaa111"),
    ])  # fmt: skip
    same = line(text, "unet_step")
    assert "| 1.50x |" in same and same.endswith("| aaaaaaa |")
    mixed = line(text, "decode")
    assert "x |" not in mixed and mixed.endswith("| bbbbbbb / aaaaaaa |")
    assert "commit aaaaaaa111 (2026-12-03); commit bbbbbbb222 (2026-12-03)" in text.splitlines()[0]


def test_two_calls_of_one_commit_give_no_ratio_and_no_overhead_line():
    text = markdown([
        row("diffrt", "unet_step", 4.0, "c1", call="call-a"),
        row("diffusers compile", "unet_step", 6.0, "c1", call="call-b"),  # a resumed call on another machine
        row("diffrt", "decode", 5.0, "c1", call="call-a"),
        row("diffusers compile", "decode", 7.5, "c1", call="call-a"),
    ])  # fmt: skip
    assert "x |" not in line(text, "unet_step") and "| 1.50x |" in line(text, "decode")
    parts = [("text_encoder", 1.0, "call-a"), ("unet_step", 4.0, "call-a"), ("decode", 5.0, "call-b")]
    rows = [row("diffrt", what, ms, "c1", call=c) for what, ms, c in parts]
    assert not [ln for ln in markdown(rows + [row("diffrt", "e2e 1 step", 10.5, "c1", call="call-a")]).splitlines()
                if "| 1 step |" in ln]  # fmt: skip


def test_end_to_end_is_set_against_its_components_only_within_one_call():
    parts = [("text_encoder", 1.0), ("unet_step", 4.0), ("decode", 5.0)]
    one = [row("diffrt", what, ms, "c1") for what, ms in parts] + [row("diffrt", "e2e 1 step", 10.5, "c1")]
    assert line(markdown(one), "1 step").endswith("| 10.50 | 10.00 | +0.50 ms (+5.0%) |")
    taesd = [row("diffrt", "decode taesd", 0.8, "c1"), row("diffrt", "e2e 1 step taesd", 6.0, "c1")]
    assert line(markdown(one + taesd), "1 step taesd").endswith("| 6.00 | 5.80 | +0.20 ms (+3.4%) |")
    two = [row("diffrt", what, ms, "c1") for what, ms in parts] + [row("diffrt", "e2e 1 step", 10.5, "c2")]
    assert not [ln for ln in markdown(two).splitlines() if "| 1 step |" in ln]


def test_a_merge_replaces_the_cells_a_later_call_measured_and_keeps_the_rest():
    old = [
        row("diffrt", "unet_step", 4.5, "c1"),
        row("diffrt", "decode", 6.0, "c1"),
        row("diffusers compile", "decode", 7.5, "c1"),
    ]
    new = [row("diffrt", "decode", 5.5, "c2")]
    got = {(r["impl"], r["what"]): (r["median_ms"], r["commit"]) for r in merged(old, new)}
    assert got == {("diffrt", "unet_step"): (4.5, "c1"), ("diffrt", "decode"): (5.5, "c2"),
                   ("diffusers compile", "decode"): (7.5, "c1")}  # fmt: skip

"""benchmarks/latency.py's markdown table: a merged results file holds the rows of several device calls, so a ratio is
formed only between rows of one commit (diffrt and its peer timed in the same call), every line names the commit(s)
of its rows, and end to end is set against its components only when they are one call's code."""

from benchmarks.latency import markdown, merged


def row(impl: str, what: str, ms: float, commit: str) -> dict:
    cell = {"arch": "sd21", "impl": impl, "batch": 1, "height": 512, "width": 512, "what": what, "median_ms": ms}
    return {"gpu": "NVIDIA H200", "torch": "2.11.0", "commit": commit, "date": "2026-12-03T00:00:00+00:00", **cell}


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

"""benchmarks/latency.py's markdown table: a merged results file holds the rows of several device calls, so a ratio is
formed only between rows of one call (diffrt and its peer timed on one host; rows from before rows named their call
stand for their commit's), every line names the commit(s) of its rows, and end to end is set against its components
only when they come from one call. And the compile peer's order within a call: its components on its first run's
graphs, no run started that the time box would cut, each row's compiles counted. Sizes are squares or HEIGHTxWIDTH."""

import types

import pytest

from benchmarks.latency import markdown, merged
from diffrt.latency import parse_sizes


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


def test_sizes_are_squares_or_height_by_width_and_a_bad_one_says_how_to_write_it():
    assert parse_sizes("512, 768x1344,1024X576") == [(512, 512), (768, 1344), (1024, 576)]
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_sizes("512,wide")


def test_a_non_square_size_has_its_own_lines_apart_from_the_square_of_its_height():
    def sized(impl, what, ms, width):
        return {**row(impl, what, ms, "c1"), "height": 768, "width": width}

    parts = [("text_encoder", 1.0), ("unet_step", 8.0), ("decode", 9.0)]
    rows = [sized("diffrt", what, ms, 1344) for what, ms in parts] + [sized("diffrt", "e2e 1 step", 18.5, 1344)]
    rows += [sized("diffrt", "unet_step", 5.0, 768), sized("diffusers compile", "unet_step", 10.0, 768)]
    text = markdown(rows)
    assert "| 8.00 |" in line(text, "unet_step", "768x1344") and "| 5.00 |" in line(text, "unet_step", "768²")
    assert "| 2.00x |" in line(text, "unet_step", "768²") and "x |" not in line(text, "unet_step", "768x1344")
    assert line(text, "768x1344", "1 step").endswith("| 18.50 | 18.00 | +0.50 ms (+2.8%) |")


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


def fake_peers(monkeypatch, compile_s: float = 0.0, first_call_s: float | None = None) -> list[str]:
    """benchmarks.peers with its pipelines replaced by a log of what was measured; each measurement compiles one graph
    (a counter the rows must carry) and advances the clock by compile_s."""
    from benchmarks import latency, peers

    log, clock = [], [1000.0]
    monkeypatch.setattr(latency.time, "time", lambda: clock[0])
    monkeypatch.setattr(latency.Pipeline, "from_pretrained", staticmethod(lambda *a, **k: None))
    vae = types.SimpleNamespace(config=types.SimpleNamespace(force_upcast=False))
    monkeypatch.setattr(peers, "diffusers_pipeline", lambda ours, arch, vae_upcast: types.SimpleNamespace(vae=vae))
    monkeypatch.setattr(peers, "compile_pipeline", lambda pipe: log.append("compile"))
    monkeypatch.setattr(peers, "inductor_cache", lambda: "cold")

    def measured(name: str, result):
        log.append(name)
        clock[0] += compile_s
        return result

    monkeypatch.setattr(peers, "compiled_graphs", lambda: len(log))
    first = {} if first_call_s is None else {"first_call_s": first_call_s}
    monkeypatch.setattr(peers, "end_to_end", lambda pipe, run, *a: measured(run, {"median_ms": 1.0, **first}))
    names = ("text_encoder", "unet_step", "decode")
    monkeypatch.setattr(
        peers, "components", lambda *a, **k: measured("components", {n: {"median_ms": 1.0} for n in names})
    )
    return log


def test_the_compile_peer_times_its_components_right_after_its_first_run_and_names_its_compiles(tmp_path, monkeypatch):
    from benchmarks.latency import Results, measure_peers

    log = fake_peers(monkeypatch)
    res = Results(str(tmp_path / "rows.json"), {"commit": "c1"})
    measure_peers(res, "sd21", [(512, 512)], [1], ["1 step", "LCM 4 steps"], ["diffusers compile"], deadline=5000.0)
    assert log == ["compile", "1 step", "components", "LCM 4 steps"]
    assert [r["what"] for r in res.rows] == ["e2e 1 step", "text_encoder", "unet_step", "decode", "e2e LCM 4 steps"]
    assert all(r["graphs_compiled"] == 1 for r in res.rows)  # each measurement's own compile, nothing else's
    assert all(r["inductor_cache_at_start"] == "cold" and r["peer_vae_upcast"] is False for r in res.rows)


def test_the_eager_peer_times_its_components_too_at_each_batch(tmp_path, monkeypatch):
    from benchmarks.latency import Results, measure_peers

    log = fake_peers(monkeypatch)
    res = Results(str(tmp_path / "rows.json"), {"commit": "c1"})
    measure_peers(res, "sd21", [(512, 512)], [1, 2], ["1 step"], ["diffusers eager"], deadline=5000.0)
    assert log == ["1 step", "components"] * 2  # no compile, and each batch its own cells
    rows = [(r["batch"], r["what"]) for r in res.rows]
    assert rows == [(b, w) for b in (1, 2) for w in ("e2e 1 step", "text_encoder", "unet_step", "decode")]


def test_the_compile_peer_starts_no_run_the_time_box_would_cut_and_says_so(tmp_path, monkeypatch, capsys):
    from benchmarks.latency import COMPILE_RESERVE_S, Results, measure_peers

    log = fake_peers(monkeypatch, compile_s=COMPILE_RESERVE_S)  # each run takes one compile's reserve
    res = Results(str(tmp_path / "rows.json"), {"commit": "c1"})
    runs = ["1 step", "LCM 4 steps"]
    measure_peers(
        res, "sd21", [(512, 512)], [1], runs, ["diffusers compile"], deadline=1000.0 + 1.5 * COMPILE_RESERVE_S
    )
    assert log == ["compile", "1 step"]  # 0.5 of a reserve left after it: neither the components nor LCM start
    out = capsys.readouterr().out
    assert "e2e LCM 4 steps not started" in out and "components not started" in out
    assert [r["what"] for r in res.rows] == ["e2e 1 step"]


def test_after_a_quick_first_call_a_later_run_needs_less_than_a_cold_compile(tmp_path, monkeypatch):
    from benchmarks.latency import COMPILE_RESERVE_S, LATER_RUN_RESERVE_S, Results, measure_peers

    # each measurement takes 80 s; the first run's first call took 40 s (a warm cache): 60 s kept for the next
    log = fake_peers(monkeypatch, compile_s=80.0, first_call_s=40.0)
    res = Results(str(tmp_path / "rows.json"), {"commit": "c1"})
    runs = ["1 step", "LCM 4 steps"]
    measure_peers(res, "sd21", [(512, 512)], [1], runs, ["diffusers compile"], deadline=1000.0 + COMPILE_RESERVE_S + 10)
    assert LATER_RUN_RESERVE_S == 60
    # after the first run 130 s are left (a cold reserve would stop there): the components start, then 50 s: not LCM
    assert log == ["compile", "1 step", "components"]

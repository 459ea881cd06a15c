"""Latency per resolution: diffrt's fast path against diffusers eager and diffusers + torch.compile, in one call.

For each architecture (sd15, sd21 = SD-Turbo's, sdxl; random weights, fp16), size and batch: the components as
CUDA-graph replays (text encoder, UNet step, VAE decode, TAESD decode) and end to end (1 step with the full VAE and
with TAESD, LCM 4 steps, 25 steps with CFG), diffrt beside its peers on the same weights; peak GPU memory; for the
compile peer the first call's time (its compile time). Rows are appended to --out as they are measured and a cell
already there is skipped, so a time-limited call can stop anywhere and the next one resumes; --budget-s stops
cleanly before a device limit. `--report` turns the JSON into a markdown table and a PNG plot.

    python benchmarks/latency.py --archs sd21 --sizes 512,1024 --peers eager,compile --out results/latency_h200.json
    python benchmarks/latency.py --archs sdxl --sizes 768x1344,1024 --peers eager --out results/latency_h200.json
    python benchmarks/latency.py --report results/latency_h200.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from diffrt import latency  # noqa: E402
from diffrt.latency import parse_sizes, size_label  # noqa: E402
from diffrt.pipeline import Pipeline  # noqa: E402
from diffrt.request import GenerationRequest  # noqa: E402

TAESD = {"sd15": "taesd", "sd21": "taesd", "sdxl": "taesdxl"}
IMPLS = ("diffrt", "diffusers eager", "diffusers compile")
# Time kept for the compile peer's first run at a size: torch.compile took 50 s (UNet) + 19 s (VAE) at 512² and 182 s
# + 42 s at 1024² on an H200 (dynamic=None; static at 1024²: 103 s for both, SDXL 137 s). A later run at that size
# recompiles at most the UNet: 1.25x the first run's first call, at least LATER_RUN_RESERVE_S (with a warm on-disk
# cache the first call took 14 s and LCM's UNet 46).
COMPILE_RESERVE_S = 200
LATER_RUN_RESERVE_S = 60


def row_id(row: dict) -> tuple:
    return (row["arch"], row["impl"], row["what"], row["batch"], row["height"], row["width"])


class Results:
    """The JSON file of rows, rewritten atomically after each new row (a killed call keeps what it measured)."""

    def __init__(self, path: str, env: dict) -> None:
        self.path, self.env = path, env
        self.rows = json.loads(Path(path).read_text())["rows"] if os.path.exists(path) else []
        self.done = {row_id(r) for r in self.rows}

    def has(self, **key) -> bool:
        return row_id(key) in self.done

    def add(self, **row) -> None:
        row = {**self.env, **row}
        self.rows.append(row)
        self.done.add(row_id(row))
        write_json(self.path, {"rows": self.rows})
        ms = row.get("median_ms")
        print(f"{row['arch']:5s} {row['impl']:18s} {row['what']:22s} b{row['batch']} {row['height']}x{row['width']}"
              f"  {ms if ms is None else round(ms, 3)} ms", flush=True)  # fmt: skip


def diffrt_pipeline(arch: str, tiny_vae: bool, backend: str, prediction_type: str | None = None) -> Pipeline:
    from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

    pipe = Pipeline.from_pretrained(arch, device="cuda", dtype=torch.float16, backend=backend,
                                    prediction_type=prediction_type)  # fmt: skip
    if tiny_vae:  # the same UNet and text encoders with TAESD as the image codec
        components = pipe.components
        with torch.device("cuda"):
            components.vae = AutoencoderTiny(TAESDConfig.preset(TAESD[arch]))
        pipe = Pipeline.from_components(components, device="cuda", dtype=torch.float16, backend=backend)
    return pipe


def measure_diffrt(res: Results, arch: str, sizes, batches, runs, backend: str, deadline: float) -> None:
    for tiny in (False, True):
        pipe = None
        for height, width in sizes:
            for batch in batches:
                if time.time() > deadline:
                    print(f"budget spent: {arch} diffrt b{batch} {size_label(height, width)} and later cells not"
                          " measured", flush=True)  # fmt: skip
                    return
                cell = {"arch": arch, "impl": "diffrt", "batch": batch, "height": height, "width": width}
                todo = [r for r in runs if not (tiny and r != "1 step")]  # TAESD: the 1-step row
                names = [f"e2e {r}" + (" taesd" if tiny else "") for r in todo]
                parts = ["decode taesd"] if tiny else ["text_encoder", "unet_step", "decode"]
                if all(res.has(**cell, what=n) for n in names + parts):
                    continue
                pipe = pipe or diffrt_pipeline(arch, tiny, backend)
                try:
                    if not all(res.has(**cell, what=p) for p in parts):
                        times = latency.component_times(pipe, batch, height, width, cfg=False)
                        for name, t in times.items():
                            what = "decode taesd" if (tiny and name == "decode") else name
                            if what in parts:
                                res.add(**cell, what=what, **t)
                    for run, name in zip(todo, names, strict=True):
                        if res.has(**cell, what=name):
                            continue
                        sampler, steps, guidance = latency.RUNS[run]
                        request = GenerationRequest(latency.PROMPT, height=height, width=width, batch=batch,
                                                    sampler=sampler, steps=steps, guidance_scale=guidance)  # fmt: skip
                        t0 = time.perf_counter()
                        out = latency.end_to_end(pipe, request)
                        res.add(**cell, what=name, steps=steps, **out, measure_s=time.perf_counter() - t0,
                                backend=pipe.backend.name)  # fmt: skip
                except torch.OutOfMemoryError:
                    res.add(**cell, what="out of memory", median_ms=None)
                    torch.cuda.empty_cache()
        del pipe
        torch.cuda.empty_cache()


def measure_peers(res: Results, arch: str, sizes, batches, runs, peers, deadline: float) -> None:
    from benchmarks import peers as peer_lib

    ours = Pipeline.from_pretrained(arch, device="cuda", dtype=torch.float16, backend="torch")
    for impl in peers:
        # the stronger peer: SDXL's VAE in fp16 as with an fp16-safe VAE, not moved to fp32 and back every call
        pipe = peer_lib.diffusers_pipeline(ours, arch, vae_upcast=False)
        compiled = impl == "diffusers compile"
        extra = {"peer_vae_upcast": pipe.vae.config.force_upcast}
        if compiled:
            # a warm on-disk cache (an earlier process on this machine compiled into it) makes first_call_s no cold
            # compile time: the rows say which it was
            extra["inductor_cache_at_start"] = peer_lib.inductor_cache()
            peer_lib.compile_pipeline(pipe)
        for height, width in sizes:
            size = size_label(height, width)
            for batch in batches:
                cell = {"arch": arch, "impl": impl, "batch": batch, "height": height, "width": width, **extra}
                first_call_s = None  # this size's first run's, once measured
                for what in peer_cells(runs):
                    if time.time() > deadline:
                        print(f"budget spent: {arch} {impl} b{batch} {size} {what} and later cells not measured",
                              flush=True)  # fmt: skip
                        return
                    row = "unet_step" if what == "components" else what  # the components' rows: one stands for all
                    if res.has(**cell, what=row):
                        continue
                    left = deadline - time.time()
                    reserve = later_run_reserve_s(first_call_s) if first_call_s is not None else COMPILE_RESERVE_S
                    if compiled and left < reserve:
                        # A new size recompiles for minutes, and so can a new run at a size (LCM's integer
                        # timesteps are a new guard for the UNet): do not start what the time box would kill.
                        print(f"budget: {arch} {impl} b{batch} {size} {what} not started ({left:.0f} s left, a"
                              f" compile needs ~{reserve:.0f} s)", flush=True)  # fmt: skip
                        continue
                    graphs = peer_lib.compiled_graphs()
                    try:
                        if what == "components":
                            times = peer_lib.components(pipe, batch, height, width, cfg=False)
                            for name, t in times.items():
                                res.add(**cell, what=name, **t, graphs_compiled=peer_lib.compiled_graphs() - graphs)
                        else:
                            run = what.removeprefix("e2e ")
                            out = peer_lib.end_to_end(pipe, run, batch, height, width)
                            res.add(**cell, what=what, steps=latency.RUNS[run][1], **out,
                                    graphs_compiled=peer_lib.compiled_graphs() - graphs)  # fmt: skip
                            first_call_s = out.get("first_call_s") if first_call_s is None else first_call_s
                    except torch.OutOfMemoryError:
                        res.add(**cell, what=row, median_ms=None, note="out of memory")
                        torch.cuda.empty_cache()
        del pipe
        torch.cuda.empty_cache()


def later_run_reserve_s(first_call_s: float) -> float:
    return min(COMPILE_RESERVE_S, max(LATER_RUN_RESERVE_S, 1.25 * first_call_s))


def peer_cells(runs) -> list[str]:
    """What to measure of a peer at one size, in order. The components come right after the first run: the compile
    peer's are meant to replay that run's graphs (the same shapes and arguments; their rows' graphs_compiled, counted
    over all three, says whether they did), before a later run's recompile can use up the call."""
    cells = [f"e2e {run}" for run in runs]
    return cells[:1] + ["components"] + cells[1:]


def call_of(row: dict) -> str | None:
    """The device call a row came from; rows written before rows named their call stand for their commit's."""
    return row.get("call") or row.get("commit")


def merged(rows: list[dict], newer: list[dict]) -> list[dict]:
    """rows with each cell that `newer` measured replaced by newer's row (a later device call's code and peers)."""
    replaced = {row_id(r) for r in newer}
    return [r for r in rows if row_id(r) not in replaced] + newer


def markdown(rows: list[dict]) -> str:
    """The table of diffrt beside its peers (ratios only within one call) and end to end against its components
    (within one call too: the host's speed shows in end to end). A merged file holds several calls, so each line
    names the commit of its rows."""
    table, commit, call = {}, {}, {}
    for r in rows:
        size = (r["height"], r["width"])
        table.setdefault((r["arch"], r["what"], r["batch"], size), {})[r["impl"]] = r.get("median_ms")
        commit[(r["arch"], r["what"], r["batch"], size, r["impl"])] = r.get("commit")
        call[(r["arch"], r["what"], r["batch"], size, r["impl"])] = call_of(r)
    lines = ["| arch | what | batch | size | diffrt ms | diffusers eager ms | diffusers compile ms | vs compile"
             " | commit |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (arch, what, batch, size), by in sorted(table.items()):
        d, e, c = (by.get(i) for i in IMPLS)
        commits = [commit.get((arch, what, batch, size, i)) for i in IMPLS if i in by]
        one_call = call.get((arch, what, batch, size, IMPLS[0])) == call.get((arch, what, batch, size, IMPLS[2]))
        ratio = f"{c / d:.2f}x" if d and c and one_call else ""
        cells = [f"{v:.2f}" if v else "" for v in (d, e, c)]
        made = " / ".join(str(sha)[:7] for sha in dict.fromkeys(commits))  # one commit, or each of its rows' in order
        lines.append(f"| {arch} | {what} | {batch} | {size_label(*size)} | {' | '.join(cells)} | {ratio} | {made} |")
    lines += [
        "",
        "End to end against the sum of its components' graph replays (issue 10: within 5% or 0.3 ms):",
        "",
        "| arch | batch | size | run | e2e ms | components ms | over |",
        "|---|---|---|---|---|---|---|",
    ]
    for (arch, what, batch, size), by in sorted(table.items()):
        steps = {"e2e 1 step": 1, "e2e LCM 4 steps": 4, "e2e 1 step taesd": 1}.get(what)
        decoder = "decode taesd" if what.endswith("taesd") else "decode"
        names = ("text_encoder", "unet_step", decoder)
        parts = {w: table.get((arch, w, batch, size), {}).get("diffrt") for w in names}
        one_call = len({call.get((arch, w, batch, size, "diffrt")) for w in (what, *names)}) == 1
        if steps and by.get("diffrt") and all(parts.values()) and one_call:
            total = parts["text_encoder"] + steps * parts["unet_step"] + parts[decoder]
            over = by["diffrt"] - total
            lines.append(f"| {arch} | {batch} | {size_label(*size)} | {what[4:]} | {by['diffrt']:.2f} | {total:.2f} | "
                         f"{over:+.2f} ms ({100 * over / total:+.1f}%) |")  # fmt: skip
    env = rows[-1] if rows else {}
    calls = sorted({(r.get("date", "")[:10], r.get("commit")) for r in rows})  # a file merges several device calls
    made = "; ".join(f"commit {c} ({d})" for d, c in calls)
    head = f"{env.get('gpu')}, torch {env.get('torch')}; rows from {made} (each row's own in the JSON)\n\n"
    return head + "\n".join(lines) + "\n"


def report(path: str) -> None:
    """The markdown table and a PNG plot of 1-step latency against resolution, beside the JSON."""
    rows = json.loads(Path(path).read_text())["rows"]
    text = markdown(rows)
    Path(path).with_suffix(".md").write_text(text)
    head = text.split("\n", 1)[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in rows})
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for impl in IMPLS:
            pts = sorted((r["height"], r["median_ms"]) for r in rows if r["arch"] == arch and r["impl"] == impl
                         and r["what"] == "e2e 1 step" and r["batch"] == 1 and r.get("median_ms")
                         and r["height"] == r["width"])  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set(title=f"{arch}, 1 step, batch 1, fp16", xlabel="resolution (px, square)", ylabel="ms", yscale="log")
        ax.legend()
    fig.suptitle(head.strip(), fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)
    print(Path(path).with_suffix(".md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="sd21")
    ap.add_argument("--sizes", default="512,1024", help="squares' sides and HEIGHTxWIDTH, e.g. 512,768x1344")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--runs", default="1 step,LCM 4 steps,25 steps CFG")
    ap.add_argument("--peers", default="eager,compile", help="eager, compile, both (eager,compile) or none")
    ap.add_argument("--peer-sizes", default=None, help="sizes for the peers (default: --sizes)")
    ap.add_argument("--peer-batches", default="1", help="batches for the peers (the compile peer recompiles each)")
    ap.add_argument("--backend", default="cuda-graph")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new cells after this many seconds")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--report", default=None, help="write the table and plot of this JSON and exit")
    ap.add_argument("--merge", nargs="*", default=[], help="with --report: first merge these JSONs' rows into it")
    args = ap.parse_args()
    if args.report:
        rows = json.loads(Path(args.report).read_text())["rows"]
        for path in args.merge:
            rows = merged(rows, json.loads(Path(path).read_text())["rows"])
        if args.merge:
            write_json(args.report, {"rows": rows})
        return report(args.report)
    deadline = time.time() + args.budget_s
    res = Results(args.out, environment(args.commit))
    sizes = parse_sizes(args.sizes)
    peer_sizes = parse_sizes(args.peer_sizes or args.sizes)
    batches = [int(b) for b in args.batches.split(",")]
    peer_batches = [int(b) for b in args.peer_batches.split(",")]
    runs = args.runs.split(",")
    # The compile peer first: it takes minutes per size, and a call that runs out of time should lose eager rows.
    peers = [f"diffusers {p}" for p in ("compile", "eager") if p in args.peers.split(",")]
    for arch in args.archs.split(","):
        measure_diffrt(res, arch, sizes, batches, runs, args.backend, deadline)
        if peers:
            measure_peers(res, arch, peer_sizes, peer_batches, runs, peers, deadline)
    report(args.out)


if __name__ == "__main__":
    main()

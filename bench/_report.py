"""The one report module of the benchmark: tables, findings in words, markdown, PNGs.

For both workloads: `table`, `findings`, `markdown`, `plot` (DynamicNet) and
`sequence_markdown`, `sequence_findings`, `sequence_plot` (the sequence workload);
`Progress`, the cells' progress on stderr while a run goes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

__all__ = [
    "Progress",
    "findings",
    "markdown",
    "plot",
    "sequence_findings",
    "sequence_markdown",
    "sequence_plot",
    "table",
]

STATIC_NAMES = (
    "static",
    "static-specialized",
    "static-scan",
    "static-masked",
    "fused",
    "fused-specialized",
    "plain-jax",
)
COLORS = {
    "dynamic": "#d62728",
    "dynamic-nocache": "#ff9896",
    "static-scan": "#1f77b4",
    "static-masked": "#9edae5",
    "static": "#2ca02c",
    "fused": "#17becf",
    "fused-specialized": "#bcbd22",
    "static-specialized": "#98df8a",
    "torch-eager": "#ff7f0e",
    "torch-eager-inprocess": "#ffbb78",
    "torch-compile": "#8c564b",
    "torch-compile-dynamic": "#c49c94",
    "tf-function-int": "#9467bd",
    "tf-function-tensor": "#e377c2",
    "tf-function-int-xla": "#c5b0d5",
    "tf-function-tensor-xla": "#f7b6d2",
    "plain-jax": "#7f7f7f",
}
OWN_PROCESS = "*"  # marks a peer measured alone in its own fresh process


class Progress:
    """The benchmark's cells as they finish, on stderr.

    On a terminal: a tqdm bar over the cells, each finished cell's figures
    written above it. When stderr is not a terminal (a log file, CI), or with
    `quiet`: nothing; the figures are in the table on stdout and the files.
    """

    def __init__(self, total: int | None, quiet: bool) -> None:
        self.total, self.done = total, 0
        self.start = time.perf_counter()
        self.bar = None  # None: nothing is shown
        if not quiet and sys.stderr.isatty():
            self.bar = tqdm(
                total=total, unit="cell", file=sys.stderr, dynamic_ncols=True,
                leave=False,
            )  # fmt: skip

    def line(self, text: str, *, advance: bool = True) -> None:
        if advance:
            self.done += 1
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self.start
        width = len(str(self.total or self.done))
        of = f"/{self.total}" if self.total else ""
        count = f"[{self.done:>{width}}{of}]" if advance else " " * (2 * width + 3)
        self.bar.write(f"{count} {elapsed:7.1f}s  {text}", file=sys.stderr)
        if advance:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _label(results: dict, name: str) -> str:
    return name + OWN_PROCESS if name in results["config"].get("peers", ()) else name


def _framework_versions(env: dict) -> str:
    versions = dict(env.get("peer_versions") or {})
    if env.get("torch") and "torch" not in versions:
        versions["torch"] = env["torch"]
    return "  ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "no peers"


def loss_agreement(results: dict, reference: str = "static") -> dict:
    """Per max_depth, each run's largest relative loss deviation from `reference`.

    Every strategy and peer trains the same model from the same weights on the
    same data and depths, so the recorded losses must agree (float32 rounding
    apart): a peer doing less work would show here.
    """
    out: dict = {}
    for d in results["config"]["depths"]:
        runs = {
            r["strategy"]: r["losses"]
            for r in results["runs"]
            if r["max_depth"] == d and r["status"] == "ok" and r["losses"]
        }
        ref = runs.get(reference)
        if not ref:
            continue
        out[d] = {}
        for name, losses in runs.items():
            n = min(len(ref), len(losses))
            dev = max(
                abs(a - b) / max(abs(b), 1e-12)
                for a, b in zip(losses[:n], ref[:n], strict=True)
            )
            out[d][name] = {"steps": n, "max_rel_dev": dev}
    return out


# ------------------------------------------------------------------- lookups


def _cell(results: dict, strategy: str, max_depth: int, steps: int) -> dict | None:
    for c in results["cells"]:
        if (c["strategy"], c["max_depth"], c["steps"]) == (strategy, max_depth, steps):
            return c
    return None


def _ok(results: dict, strategy: str, max_depth: int) -> dict | None:
    """The cell at the largest step count, if the strategy ran."""
    c = _cell(results, strategy, max_depth, max(results["config"]["steps"]))
    return c if c and c["status"] == "ok" else None


def _crossover(
    results: dict, strategy: str, max_depth: int, versus: str = "dynamic"
) -> dict | None:
    for x in results["crossover"]:
        if (x["strategy"], x["max_depth"], x["versus"]) == (
            strategy,
            max_depth,
            versus,
        ):
            return x
    return None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 10:
        return f"{seconds:.1f}"
    return f"{seconds:.3g}" if seconds >= 0.01 else f"{seconds:.2g}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _wins(x: dict | None) -> str:
    if x is None:
        return ""
    first, again = x["static_wins_from"], x["dynamic_wins_again_from"]
    if first is None:
        return "never"
    if again is None:
        return f"from step {first}"
    return f"steps {first}-{again - 1}"


# --------------------------------------------------------------------- table


def _rows(results: dict, max_depth: int) -> tuple[list[str], list[list[str]]]:
    steps = results["config"]["steps"]
    header = [
        "strategy",
        "compiles",
        "compile s",
        "1st call s",
        "steady ms/step [min-max]",
    ]
    header += [f"total s @{s}" for s in steps]
    header += ["GFLOP/s", "% peak", "ahead of dynamic", "ahead of torch"]
    rows = []
    for name in results["strategies"]:
        last = _cell(results, name, max_depth, max(steps))
        if last is None:
            continue
        if last["status"] != "ok":
            rows.append(
                [_label(results, name), last["status"]] + [""] * (len(header) - 2)
            )
            continue
        st = last["steady_seconds"]
        approx = "~" if last["total_kind"] == "extrapolated" else ""
        compiles = last["compiles"]
        row = [
            _label(results, name),
            f"{approx}{compiles if compiles is not None else '-'}",
            f"{approx}{_s(last['compile_seconds'])}" if compiles is not None else "-",
            _s(last["first_call_seconds"]),
            f"{_ms(st['median'])} [{_ms(st['min'])}-{_ms(st['max'])}]",
        ]
        for s in steps:
            c = _cell(results, name, max_depth, s)
            mark = "~" if c["total_kind"] == "extrapolated" else ""
            row.append(f"{mark}{_s(c['total_seconds'])}")
        peak = last["peak_fraction"]
        row += [
            f"{last['gflops']:.3g}",
            f"{100 * peak:.2g}" if peak is not None else "",
        ]
        for versus in ("dynamic", "torch-eager"):
            x = _crossover(results, name, max_depth, versus)
            row.append(_wins(x) if name in STATIC_NAMES else "")
        rows.append(row)
    return header, rows


def _xla_threads_note(env: dict, peers: bool) -> str:
    threads = env.get("xla_cpu_threads")
    if not threads:
        return ""
    return (
        f" JAX's CPU runtime ran {threads} thread(s) (`--xla-threads {threads}`, "
        "bench/_xla_threads.py) instead of one per core"
        + ("; the peers had every core." if peers else ".")
    )


def table(results: dict) -> str:
    """A plain-text table per max_depth, for stdout."""
    env, peak = results["env"], results["peak"]
    lines = [
        f"retrace_vs_scan  jax {env['jax']}  optax {env['optax']}  "
        f"{_framework_versions(env)}  {env['backend']}: {env['device_kind']} "
        f"({env['cpu_count']} cores)",
        f"matmul peak ({peak['size']}^2 float32): {peak['gflops']:.1f} GFLOP/s.  "
        "'~' = extrapolated.  'ahead of dynamic/torch': the steps at which a "
        "one-compile strategy's total time (compile included) is below that "
        "strategy's (analytic).  '*' = a peer run alone in its own fresh process "
        "with its framework's defaults (the others share this process).",
    ]
    for max_depth in results["config"]["depths"]:
        header, rows = _rows(results, max_depth)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        lines.append(f"max_depth = {max_depth}")

        def fmt(r: list[str], widths: list[int] = widths) -> str:
            return "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )

        lines.append(fmt(header))
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            if len(r) > 1 and r[1].startswith("skipped"):
                lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
            else:
                lines.append(fmt(r))
    return "\n".join(lines)


# ------------------------------------------------------------------ findings


def findings(results: dict) -> list[str]:
    """What the figures show, in words, with ratios (one sentence per point)."""
    out = []
    steps = results["config"]["steps"]
    small, large = min(steps), max(steps)
    for d in results["config"]["depths"]:
        dyn = _ok(results, "dynamic", d)
        sta = _ok(results, "static", d)
        parts = []
        if dyn and sta:
            t_dyn = dyn["steady_seconds"]["median"]
            t_sta = sta["steady_seconds"]["median"]
            faster = "static" if t_sta < t_dyn else "dynamic"
            parts.append(
                f"steady step {_ms(t_sta)} ms (`static`) vs {_ms(t_dyn)} ms "
                f"(`dynamic`): `{faster}` is "
                f"{max(t_sta, t_dyn) / min(t_sta, t_dyn):.2f}x faster per step"
            )
            parts.append(
                f"`dynamic` compiled {dyn['compiles']} programs in "
                f"{_s(dyn['compile_seconds'])} s over {large} steps, `static` 1 in "
                f"{_s(sta['compile_seconds'])} s "
                f"({_ratio(dyn['compile_seconds'], sta['compile_seconds'])})"
            )
            x = _crossover(results, "static", d)
            if x is not None:
                if x["static_wins_from"] is None:
                    parts.append("`static` never beats `dynamic` in total time")
                else:
                    text = (
                        f"`static` beats `dynamic` in total time from step "
                        f"{x['static_wins_from']}"
                    )
                    if x["dynamic_wins_again_from"] is not None:
                        text += (
                            f" until `dynamic`'s faster steps repay its compiles "
                            f"at step {x['dynamic_wins_again_from']}"
                        )
                    parts.append(text)
            for s in (small, large):
                a = _cell(results, "static", d, s)["total_seconds"]
                b = _cell(results, "dynamic", d, s)["total_seconds"]
                parts.append(
                    f"total at {s} steps {_s(a)} s vs {_s(b)} s "
                    f"(`dynamic`/`static` = {_ratio(b, a)})"
                )
        others = []
        if dyn:
            t_dyn = dyn["steady_seconds"]["median"]
            for name in (
                "static-specialized",
                "static-scan",
                "static-masked",
                "fused",
                "fused-specialized",
            ):
                c = _ok(results, name, d)
                if c:
                    others.append(
                        f"`{name}` {_ratio(t_dyn, c['steady_seconds']['median'])}"
                    )
        if others:
            parts.append(
                "steady speed relative to `dynamic` (>1 = faster): " + ", ".join(others)
            )
        nocache = _ok(results, "dynamic-nocache", d)
        if nocache and dyn:
            t = nocache["steady_seconds"]["median"]
            parts.append(
                f"`dynamic-nocache` pays {_s(t)} s per step (a trace and compile each "
                f"time), {t / dyn['steady_seconds']['median']:.0f}x `dynamic`'s step"
            )
        torch = _ok(results, "torch-eager", d)
        if torch and sta:
            t = torch["steady_seconds"]["median"]
            text = (
                f"`torch-eager` {_ms(t)} ms/step: `static` is "
                f"{_ratio(t, sta['steady_seconds']['median'])} its speed"
            )
            x = _crossover(results, "static", d, "torch-eager")
            if x is not None and x["static_wins_from"] is not None:
                text += (
                    f", and having no compile to pay, torch is ahead in total time "
                    f"until step {x['static_wins_from'] - 1}"
                    if x["static_wins_from"] > 1
                    else ", and `static` is ahead in total time from the first step"
                )
            parts.append(text)
        plain, scan = _ok(results, "plain-jax", d), _ok(results, "static-scan", d)
        if plain and scan:
            t_plain = plain["steady_seconds"]["median"]
            t_scan = scan["steady_seconds"]["median"]
            parts.append(
                f"`plain-jax` (the same scan loop without the library) "
                f"{_ms(t_plain)} ms/step vs `static-scan` {_ms(t_scan)} ms "
                f"(`static-scan`/`plain-jax` = {_ratio(t_scan, t_plain)})"
            )
        best = max(
            (c for c in (_ok(results, n, d) for n in results["strategies"]) if c),
            key=lambda c: c["gflops"],
            default=None,
        )
        if best is not None and best["peak_fraction"] is not None:
            parts.append(
                f"best throughput {best['gflops']:.3g} GFLOP/s (`{best['strategy']}`), "
                f"{100 * best['peak_fraction']:.2g}% of the measured matmul peak"
            )
        agree = loss_agreement(results).get(d)
        if agree and len(agree) > 1:
            worst = max(agree.items(), key=lambda kv: kv[1]["max_rel_dev"])
            parts.append(
                f"the first {worst[1]['steps']} losses of all {len(agree)} runs "
                f"agree with `static`'s within {worst[1]['max_rel_dev']:.1e} "
                f"relative (largest: `{worst[0]}`)"
            )
        if parts:
            out.append(f"max_depth={d}: " + "; ".join(parts) + ".")
    return out


# ------------------------------------------------------------------ markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown(results: dict) -> str:
    """A markdown summary: command, machine, findings, tables, method, plot."""
    env, peak, cfg = results["env"], results["peak"], results["config"]
    lines = [
        f"# retrace_vs_scan: {results['name']}",
        "",
        f"Command: `{results['command']}` ({cfg['preset']} preset), "
        + (
            f"{results['wall_seconds']:.0f} s wall for the DynamicNet workload"
            f" and {results['sequence']['wall_seconds']:.0f} s for the sequence "
            "workload."
            if (results.get("sequence") or {}).get("wall_seconds")
            else f"{results['wall_seconds']:.0f} s wall."
        ),
        "",
        f"Machine: {env['backend']} `{env['device_kind']}` "
        f"({env.get('cpu_model') or 'unknown CPU'}), {env['cpu_count']} cores, "
        f"{env['platform']}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in env['load_average_at_start'] or [])}.",
        f"Versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
        f"optax {env['optax']}, numpy {env['numpy']}, {_framework_versions(env)}, "
        f"functorch_lite {env['functorch_lite']}. Peers marked * ran alone, each in "
        "its own fresh process, with their frameworks' default threads."
        + _xla_threads_note(env, bool(cfg.get("peers"))),
        "",
        f"Workload: DynamicNet N={cfg['n']}, D_in={cfg['d_in']}, H={cfg['d_hidden']}, "
        f"D_out={cfg['d_out']}, {cfg['loss']}, {cfg['optimizer']}; depth uniform in "
        f"[0, max_depth] per step, one seeded sequence per max_depth shared by every "
        f"strategy. Steady figures: median [min-max] of {cfg['repeats']} blocks of "
        f"{cfg['block_steps']} steps; `fused` runs K={cfg['fuse_k']} steps per call.",
        "",
        f"Matmul peak, measured in the same run: {peak['gflops']:.1f} GFLOP/s "
        f"({peak['size']}x{peak['size']} float32, median of {peak['repeats']}; best "
        f"{peak['gflops_best']:.1f}).",
    ]
    check = results.get("flops_check") or {}
    if "xla_flops" in check:
        lines.append(
            f"FLOPs are counted (matmuls). Check: XLA's cost analysis of a `dynamic` "
            f"step at depth {check['depth']} gives {check['xla_flops']:.4g} vs "
            f"{check['counted_matmul_flops']:.4g} counted "
            f"({check['ratio_xla_to_counted']:.3f}x; the rest is elementwise work)."
        )
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in findings(results)]
    for d in cfg["depths"]:
        header, rows = _rows(results, d)
        lines += ["", f"## max_depth = {d}", ""]
        lines += _md_table(header, rows)
    lines += ["", "## Crossover (analytic)", ""]
    xrows = []
    for x in results["crossover"]:
        measured = ", ".join(
            f"{s}: {x['strategy'] if m['static_wins'] else x['versus']}"
            for s, m in x["measured"].items()
        )
        xrows.append(
            [
                str(x["max_depth"]),
                x["strategy"],
                x["versus"],
                str(x["static_wins_from"]),
                str(x["dynamic_wins_again_from"] or "-"),
                measured,
            ]
        )
    lines += _md_table(
        [
            "max_depth",
            "strategy",
            "versus",
            "ahead from step",
            "behind again from step",
            "measured winner at step counts",
        ],
        xrows,
    )
    lines += [
        "",
        "`~`: extrapolated (`dynamic-nocache` is measured over "
        f"{cfg['nocache_steps']} steps, each a new trace and compile). Totals are "
        "measured directly: one fresh run per strategy and max_depth, clock read "
        "(after `block_until_ready`) at each step count, compiles included. The "
        "crossover is analytic: total(s) = compile seconds up to step s + s x steady "
        "median, with `dynamic`'s compile seconds growing as new depths appear in "
        "the sequence.",
    ]
    plot = results.get("plot")
    if results.get("outputs", {}).get("png"):
        lines += ["", f"![total, compile and steady time]({results['outputs']['png']})"]
    elif plot:
        lines += ["", f"Plot {plot}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plot


def plot(results: dict, path: Path) -> str | None:
    """Write the three-panel PNG; return None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "skipped: matplotlib not installed (pip install 'functorch-lite[bench]')"

    cfg = results["config"]
    depths, steps = cfg["depths"], cfg["steps"]
    d_plot = max(depths)
    names = results["strategies"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))

    # Panel 1: total time vs steps at the largest max_depth, as measured.
    ax = axes[0]
    for name in names:
        c = _ok(results, name, d_plot)
        run = next(
            (
                r
                for r in results["runs"]
                if (r["strategy"], r["max_depth"]) == (name, d_plot)
            ),
            None,
        )
        if c is None or run is None or not run.get("total_curve"):
            continue
        xs, ys = zip(*run["total_curve"], strict=True)
        ax.plot(xs, ys, color=COLORS[name], lw=1.6)
        if xs[-1] < max(steps):  # dynamic-nocache: extrapolated past its few steps
            t = c["steady_seconds"]["median"]
            ax.plot(
                [xs[-1], max(steps)],
                [ys[-1], ys[-1] + (max(steps) - xs[-1]) * t],
                color=COLORS[name],
                lw=1.6,
                ls="--",
            )
    x = _crossover(results, "static", d_plot)
    if x is not None and x["static_wins_from"] is not None:
        k = x["static_wins_from"]
        ax.axvline(k, color=COLORS["static"], ls=":", lw=1.2)
        ax.annotate(
            f"static beats dynamic\nfrom step {k}",
            xy=(k, 0.97),
            xycoords=("data", "axes fraction"),
            va="top",
            ha="left",
            fontsize=8,
            color=COLORS["static"],
            xytext=(4, 0),
            textcoords="offset points",
        )
        again = x["dynamic_wins_again_from"]
        if again is not None and again <= max(steps):
            ax.axvline(again, color=COLORS["dynamic"], ls=":", lw=1.2)
            ax.annotate(
                f"dynamic ahead\nagain from {again}",
                xy=(again, 0.97),
                xycoords=("data", "axes fraction"),
                va="top",
                ha="right",
                fontsize=8,
                color=COLORS["dynamic"],
                xytext=(-4, 0),
                textcoords="offset points",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training steps",
        ylabel="total seconds (compile included)",
        title=f"Total time vs steps (max_depth={d_plot})",
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.text(
        0.99,
        0.01,
        "measured, one fresh run each\ndashed: extrapolated\n"
        "dotted: crossover (analytic)",
        transform=ax.transAxes,
        ha="right",
        fontsize=7,
        color="0.4",
    )

    # Panel 2: compile seconds vs max_depth (the longest run).
    ax = axes[1]
    for name in names:
        ys, xs, approx = [], [], False
        for d in depths:
            c = _ok(results, name, d)
            if c is None or c["compiles"] == 0:
                continue
            xs.append(d)
            ys.append(c["compile_seconds"])
            approx = approx or c["total_kind"] == "extrapolated"
        if xs:
            ax.plot(xs, ys, marker="o", color=COLORS[name], ls="--" if approx else "-")
    ax.set(
        yscale="log",
        xlabel="max_depth",
        ylabel=f"compile seconds over {max(steps)} steps",
        title="Compile time vs max_depth",
    )
    ax.set_xticks(depths)
    ax.grid(True, which="both", alpha=0.25)
    ax.text(
        0.01,
        0.01,
        "dashed: extrapolated; torch-eager does not compile",
        transform=ax.transAxes,
        fontsize=7,
        color="0.4",
    )

    # Panel 3: steady per-step time vs max_depth, min-max bars. dynamic-nocache
    # (a compile per step, hundreds of times slower) would squash the rest.
    ax = axes[2]
    for name in names:
        if name == "dynamic-nocache":
            continue
        xs, med, lo, hi = [], [], [], []
        for d in depths:
            c = _ok(results, name, d)
            if c is None:
                continue
            st = c["steady_seconds"]
            xs.append(d)
            med.append(st["median"] * 1e3)
            lo.append((st["median"] - st["min"]) * 1e3)
            hi.append((st["max"] - st["median"]) * 1e3)
        if xs:
            ax.errorbar(
                xs,
                med,
                yerr=[lo, hi],
                marker="o",
                color=COLORS[name],
                capsize=3,
                ms=4,
                ls="--" if name == "dynamic-nocache" else "-",
            )
    ax.set(
        yscale="log",
        xlabel="max_depth",
        ylabel="ms per step (median, min-max)",
        title="Steady per-step time vs max_depth",
    )
    ax.set_xticks(depths)
    ax.grid(True, which="both", alpha=0.25)
    plain = matplotlib.ticker.FormatStrFormatter("%g")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    nocache = [_ok(results, "dynamic-nocache", d) for d in depths]
    nocache_ms = [c["steady_seconds"]["median"] * 1e3 for c in nocache if c]
    if nocache_ms:
        ax.text(
            0.01,
            0.99,
            f"dynamic-nocache, off the scale: {min(nocache_ms):.0f}-"
            f"{max(nocache_ms):.0f} ms/step",
            transform=ax.transAxes,
            va="top",
            fontsize=7,
            color="0.4",
        )

    # One legend for the three panels: a strategy has one colour throughout.
    handles = [
        plt.Line2D([], [], color=COLORS[n], marker="o", ms=4, lw=1.6) for n in names
    ]
    fig.legend(
        handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False
    )
    env = results["env"]
    fig.suptitle(
        f"functorch_lite retrace vs scan: {env['backend']} "
        f"{env.get('cpu_model') if env['backend'] == 'cpu' else env['device_kind']}, "
        f"{env['cpu_count']} cores, jax {env['jax']}; matmul peak "
        f"{results['peak']['gflops']:.0f} GFLOP/s",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------- the sequence workload


def sequence_markdown(result: dict) -> str:
    """The sequence workload's table, sweep and findings."""
    cfg, runs = result["config"], result["runs"]
    ok = {n: r for n, r in runs.items() if r.get("status", "ok") == "ok"}
    static = ok.get("static")
    marks = sorted({int(m) for r in ok.values() for m in r["totals"]})
    lines = [
        "## Sequence workload: a character LSTM over lines of varied length",
        "",
        f"{result['text']['lines']} docstring lines (median length "
        f"{result['text']['length_median']:.0f}), cut at {cfg['max_len']} "
        f"characters; batches of {cfg['batch']} lines, {cfg['steps_data']} "
        f"distinct batches ({result['text']['distinct_batch_lengths']} distinct "
        f"longest lines); CharLSTM vocab {cfg['vocab']}, embedding "
        f"{cfg['d_embed']}, hidden {cfg['d_hidden']}; SGD lr {cfg['lr']} momentum "
        f"{cfg['momentum']}. `*`: a peer run alone in its own fresh process.",
        "",
        "| strategy | compiles | compile s | first call s | steady ms/step "
        "[min-max] | us / real token | us / padded token | "
        + " | ".join(f"total s @{m}" for m in marks)
        + " | steady vs `static` |",
        "|" + "---|" * (8 + len(marks)),
    ]
    for name, res in runs.items():
        label = name + ("*" if res.get("process") == "own" else "")
        if res.get("status", "ok") != "ok":
            lines.append(f"| {label} | {res['status']} |" + " |" * (7 + len(marks)))
            continue
        st = res["steady"]
        ratio = f"{st['median'] / static['steady']['median']:.2f}x" if static else "-"
        compiles = res.get("compiles")
        cs = res.get("compile_seconds")
        lines.append(
            f"| {label} | {compiles if compiles is not None else '-'} | "
            f"{f'{cs:.2f}' if cs is not None else '-'} | {res['first_call_s']:.2f} | "
            f"{st['median'] * 1e3:.3g} [{st['min'] * 1e3:.3g}-{st['max'] * 1e3:.3g}] | "
            f"{res['us_per_real_token']:.3g} | {res['us_per_padded_token']:.3g} | "
            + " | ".join(
                f"{res['totals'][str(m)]:.2f}" if str(m) in res["totals"] else "-"
                for m in marks
            )
            + f" | {ratio} |"
        )
    if result.get("sweep"):
        names = list(result["sweep"][0]["strategies"])
        lines += [
            "",
            "Steady time per real token (us) against the number of distinct "
            "padded lengths (batch i's lines cut to the i % k-th of k widths "
            "spread up to the longest):",
            "",
            "| cut widths | distinct lengths | "
            + " | ".join(f"{n} (compiles)" for n in names)
            + " |",
            "|" + "---|" * (2 + len(names)),
        ]
        for row in result["sweep"]:
            lines.append(
                f"| {', '.join(map(str, row.get('widths', [row['max_len']])))} "
                f"| {row['distinct_lengths']} | "
                + " | ".join(
                    f"{v['us_per_real_token']:.3g} ({v['compiles']})"
                    for v in row["strategies"].values()
                )
                + " |"
            )
    lines += ["", *("- " + f for f in sequence_findings(result))]
    return "\n".join(lines) + "\n"


def sequence_findings(result: dict) -> list[str]:
    """What the figures show, in words."""
    out = []
    ok = {n: r for n, r in result["runs"].items() if r.get("status", "ok") == "ok"}
    if ok:
        fastest = min(ok, key=lambda n: ok[n]["us_per_real_token"])
        out.append(
            f"fastest steady step per real token: `{fastest}` "
            f"({ok[fastest]['us_per_real_token']:.3g} us)"
        )
    for name in ("dynamic", "bucketed", "static-padded", "plain-jax"):
        if name in ok and "static" in ok:
            a, b = ok[name], ok["static"]
            out.append(
                f"`{name}`: {a.get('compiles')} compiles against `static`'s "
                f"{b.get('compiles')}; steady step `{name}`/`static` = "
                f"{a['steady']['median'] / b['steady']['median']:.2f}x"
            )
    for peer in ("torch-padded", "torch-packed", "tf-keras-lstm"):
        if peer in ok and "static" in ok:
            t_peer = ok[peer]["steady"]["median"]
            t_static = ok["static"]["steady"]["median"]
            out.append(
                f"`{peer}` (own process) {t_peer * 1e3:.3g} ms/step: `static` is "
                f"{t_peer / t_static:.2f}x its speed"
            )
    for x in result.get("crossovers", []):
        if x["versus"] in ("dynamic", "torch-padded") or x["strategy"] == "static":
            out.append(
                f"`{x['strategy']}` overtakes `{x['versus']}` in total time from "
                f"step {x['from_step']} (analytic)"
            )
    agree = result.get("agreement", {})
    if agree:
        worst = max(agree.items(), key=lambda kv: kv[1]["max_rel_dev"])
        out.append(
            f"the first {worst[1]['steps']} losses of all {len(agree)} runs agree "
            f"with `static`'s within {worst[1]['max_rel_dev']:.1e} relative "
            f"(largest: `{worst[0]}`)"
        )
    return out


def sequence_plot(result: dict, path: Path) -> str | None:
    """Total time vs steps (crossovers visible) and us/token vs distinct lengths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib not installed"
    ok = {n: r for n, r in result["runs"].items() if r.get("status", "ok") == "ok"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res in ok.items():
        pts = sorted((int(m), t) for m, t in res["totals"].items())
        ax1.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            ls="--" if res.get("process") == "own" else "-",
            label=name + ("*" if res.get("process") == "own" else ""),
        )
    for x in result.get("crossovers", []):
        if x["strategy"] == "static" and x["versus"] == "dynamic":
            ax1.axvline(x["from_step"], color="k", ls=":", lw=1)
            ax1.annotate(
                f"static ahead of dynamic\nfrom step {x['from_step']}",
                (x["from_step"], ax1.get_ylim()[0]),
                fontsize=8,
            )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="steps",
        ylabel="total seconds (compiles included)",
        title="Total time vs steps (* own process)",
    )
    ax1.legend(fontsize=7)
    sweep = result.get("sweep") or []
    if sweep:
        for name in sweep[0]["strategies"]:
            ax2.plot(
                [r["distinct_lengths"] for r in sweep],
                [r["strategies"][name]["us_per_real_token"] for r in sweep],
                marker="o",
                label=name,
            )
        ax2.set(
            xlabel="distinct padded lengths in the timed block",
            ylabel="steady us per real token",
            title="Steady time per token vs distinct lengths",
        )
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

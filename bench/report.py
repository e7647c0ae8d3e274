"""The ratio table and the plots, from one sitting's ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The peers as they serve out of the box (TorchScript), and given the bundle's model.onnx.
TORCHSCRIPT_PEERS = ("litserve", "torchserve")
ONNX_PEERS = ("litserve-onnx", "torchserve-onnx")
PEERS = TORCHSCRIPT_PEERS + ONNX_PEERS


def _best(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The load point with the highest throughput (the server's saturation)."""
    return max(points, key=lambda p: p["texts_per_s"])


def _at(points: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    return next(p for p in points if p["connections"] == clients)


def _quotient(a: float, b: float, suffix: str = "x") -> tuple[float, str]:
    """``a / b`` and its table text, e.g. ``90 / 40 = 2.25x``."""
    q = a / max(b, 1e-9)
    return q, f"{a:.0f} / {b:.0f} = {q:.2f}{suffix}"


def _verdict(ok: bool, stretch: bool = False) -> str:
    return ("met" if ok else "MISSED") + (" (stretch met)" if stretch else "")


def ratios(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows of (measure, value, target, verdict)."""
    rows: list[tuple[str, str, str, str]] = []
    runs = results["servers"]
    sat = _best(runs["ours"]["single"])
    rate = sat["texts_per_s"]
    for order, label, target in (
        (
            "random",
            "ours at saturation ({c} clients) / in-process limit (batch {b}, arrival order)",
            ">= 0.85",
        ),
        (
            "grouped",
            "ours at saturation / in-process limit sorted by length (batch {b})",
            "(reference)",
        ),
    ):
        lim = max(
            (r for r in results["limit"] if r["order"] == order), key=lambda r: r["reviews_per_s"]
        )
        share, text = _quotient(rate, lim["reviews_per_s"], "")
        measure = label.format(c=sat["connections"], b=lim["batch_size"])
        verdict = _verdict(share >= 0.85) if order == "random" else ""
        rows.append((measure, text, target, verdict))
    if "ours-unbatched" in runs:
        gain, text = _quotient(rate, _best(runs["ours-unbatched"]["single"])["texts_per_s"])
        rows.append(
            (
                "ours / ours with max batch 1 (each at its saturation)",
                text,
                ">= 2x",
                _verdict(gain >= 2),
            )
        )
    if "ours-1thread" in runs:
        _, text = _quotient(_best(runs["ours-1thread"]["single"])["texts_per_s"], rate)
        rows.append(
            (
                "lever: ours with 1 torch thread / ours with torch's default threads",
                text,
                "(kept if > 1)",
                "",
            )
        )
    short = runs["ours"].get("short_c1")
    if short:
        rows.append(
            (
                "p50 latency, one short review, 1 client",
                f"{short['p50_ms']:.1f} ms",
                "<= 15 ms",
                _verdict(short["p50_ms"] <= 15),
            )
        )
    batched = runs["ours"].get("batched")
    if batched:
        rows.append(
            (
                f"ours, {batched['connections']} clients x {batched['texts_per_request']} texts "
                "per request",
                f"{batched['texts_per_s']:.0f} texts/s, p99 {batched['p99_ms']:.0f} ms",
                "(reference)",
                "",
            )
        )
    # Peers ran with the workers and torch threads of our better configuration: compare with
    # that one (older results name only its threads).
    mine = results.get("peers_like") or (
        "ours-1thread" if results.get("peer_threads") == 1 else "ours"
    )
    ours = runs[mine]["single"]
    best_peer = None
    for peer in PEERS:
        if peer not in runs:
            continue
        theirs = _best(runs[peer]["single"])
        if theirs["texts_per_s"] == 0:
            rows.append((f"{mine} / {peer}", f"{peer} answered nothing", "", "n/a"))
            continue
        same = _at(ours, theirs["connections"])
        gain, text = _quotient(same["texts_per_s"], theirs["texts_per_s"])
        rows.append(
            (
                f"{mine} / {peer} at {peer}'s saturation ({theirs['connections']} clients); "
                f"p99 ours vs theirs",
                f"{text}; {same['p99_ms']:.0f} vs {theirs['p99_ms']:.0f} ms",
                ">= 1x at <= p99 (stretch 1.3x)",
                _verdict(gain >= 1 and same["p99_ms"] <= theirs["p99_ms"], gain >= 1.3),
            )
        )
        if best_peer is None or theirs["texts_per_s"] > best_peer[1]["texts_per_s"]:
            best_peer = (peer, theirs)
    if best_peer:
        peer, theirs = best_peer
        gain, text = _quotient(_best(ours)["texts_per_s"], theirs["texts_per_s"])
        rows.append(
            (
                f"{mine} at saturation / best peer ({peer}) at saturation",
                text,
                ">= 1x (stretch 1.3x)",
                _verdict(gain >= 1, gain >= 1.3),
            )
        )
    return rows


def markdown_table(header: list[str], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(results: dict[str, Any]) -> str:
    rows = []
    for name, measured in results["servers"].items():
        for p in measured["single"]:
            bad = {k: v for k, v in p["statuses"].items() if k != "2xx"}
            rows.append(
                (
                    name,
                    p["connections"],
                    f"{p['texts_per_s']:.1f}",
                    f"{p['p50_ms']:.1f}",
                    f"{p['p95_ms']:.1f}",
                    f"{p['p99_ms']:.1f}",
                    p["requests"],
                    ", ".join(f"{k}: {v}" for k, v in bad.items()) or "-",
                )
            )
    header = ["server", "clients", "texts/s", "p50 ms", "p95 ms", "p99 ms", "requests", "not 200"]
    return markdown_table(header, rows)


def levers_table(results: dict[str, Any]) -> str:
    rows: list[tuple[Any, ...]] = [
        ("limit", f"batch {r['batch_size']}, {r['order']} order", r["reviews_per_s"])
        for r in results["limit"]
    ]
    rows += [
        ("threads", f"{r['threads']} thread(s), batch {r['batch_size']}", r["reviews_per_s"])
        for r in results.get("threads", [])
    ]
    int8 = results.get("int8")  # a CPU lever: absent from a GPU sitting
    if int8 is None:
        return markdown_table(["measure", "setting", "reviews/s"], rows)
    rows += [
        ("int8", f"{r['model']}, batch {r['batch_size']}", r["reviews_per_s"])
        for r in int8["throughput"]
    ]
    acc = int8["accuracy"]
    table = markdown_table(["measure", "setting", "reviews/s"], rows)
    return (
        f"{table}\n\nint8 accuracy change on {int8['reviews']} test reviews: "
        f"float32 {acc['float32']:.4f}, int8 {acc['int8']:.4f} "
        f"({100 * (acc['int8'] - acc['float32']):+.2f} points)."
    )


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, measured in results["servers"].items():
        points = measured["single"]
        ax.plot(
            [p["connections"] for p in points],
            [p["texts_per_s"] for p in points],
            marker="o",
            label=name,
        )
    best = max(r["reviews_per_s"] for r in results["limit"] if r["order"] == "random")
    ax.axhline(best, linestyle="--", color="grey", label="in-process limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (single-review requests)")
    ax.set_ylabel("reviews per second")
    where = results.get("device", {}).get("gpu") or f"{results['machine']['cores']} CPU cores"
    ax.set_title(f"Throughput vs concurrency ({where})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    names.append("throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sweep = [p["connections"] for p in results["servers"]["ours"]["single"]]
    clients = 64 if 64 in sweep else max(sweep)
    for name, measured in results["servers"].items():
        point = next((p for p in measured["single"] if p["connections"] == clients), None)
        if point is None:
            continue
        cdf = sorted((float(k), v) for k, v in point["latency_percentiles_ms"].items())
        ax.plot([v for _, v in cdf], [k for k, _ in cdf], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("percentile")
    ax.set_title(f"Latency CDF at {clients} clients")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    names.append("latency_cdf.png")
    plt.close(fig)
    return names


def _cuda_memory_line(results: dict[str, Any]) -> str:
    """GPU memory of a GPU sitting: the in-process peak, and what each of our servers held."""
    limit = results.get("limit_cuda_memory")
    if not limit:
        return ""
    mib = 2**20
    held = ", ".join(
        f"{name} {m['cuda_memory']['reserved'] / mib:.0f} MiB reserved"
        for name, m in results["servers"].items()
        if m.get("cuda_memory")
    )
    peak = f"in-process peak {limit['peak'] / mib:.0f} MiB"
    return f"  \nCUDA memory: {peak}; {held or 'servers: none'}."


def write(results: dict[str, Any], out: Path) -> str:
    """Write ``report.md`` and the plots into ``out``; return the ratio table."""
    table = markdown_table(["measure", "value", "target", "verdict"], ratios(results))
    images = plots(results, out)
    m, w = results["machine"], results["workload"]
    text = "\n\n".join(
        [
            f"# Benchmark results ({m['date']})",
            f"Command: `{results['command']}`  \n"
            f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']} "
            f"({m['torch_threads']} threads), commit {m['commit']}; peers: "
            + (", ".join(results["peers"].values()) or "none")
            + f" (model workers: {results.get('peer_workers', 1)}, torch threads: "
            f"{results.get('peer_threads') or 'default'}, the settings of our better "
            "configuration)" + f"; {results['minutes']} minutes.  \n"
            f"Workload: {w['reviews']} IMDb test reviews, tokens mean {w['tokens_mean']}, "
            f"p50/p90/max {w['tokens_p50_p90_max']}; model {w['model']} "
            f"({w['parameters']} parameters)."
            + (f"  \nDevice: {results['device']}." if "device" in results else "")
            + _cuda_memory_line(results),
            "## Ratios",
            table,
            "## Concurrency sweep (closed loop, wrk, single-review requests)",
            sweep_table(results),
            "## In-process limit and CPU levers",
            levers_table(results),
            "\n".join(f"![{name}]({name})" for name in images),
        ]
    )
    (out / "report.md").write_text(text + "\n")
    return table


# Issue 33's targets, judged on the medians of several sittings: ours against the best peer on
# TorchScript and against the best peer on the same ONNX model at each load (x at least, and a
# p99 no higher), saturation against the faster in-process limit (TorchScript or ONNX Runtime,
# sorted by length, at the servers' batch size), and a short review's p50 at 1 client.
PEER_TARGETS = {1: 2.0, 4: 2.0, 16: 2.0, 64: 1.3, 256: 1.3}
ONNX_PEER_TARGETS = {4: 1.3, 16: 1.3, 64: 1.3}
SATURATION_TARGET = 0.8
SHORT_P50_TARGET_MS = 2.5


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _each(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def verdicts(sittings: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Rows of (measure, median value [per sitting], target, verdict) over ``sittings``."""
    rows = _against_peers(sittings, TORCHSCRIPT_PEERS, PEER_TARGETS, "best peer on TorchScript")
    rows += _against_peers(sittings, ONNX_PEERS, ONNX_PEER_TARGETS, "best peer on model.onnx")
    return rows + _own_rows(sittings)


def _against_peers(
    sittings: list[dict[str, Any]], peers: tuple[str, ...], targets: dict[int, float], who: str
) -> list[tuple[str, str, str, str]]:
    rows = []
    for clients, target in targets.items():
        if not all(any(p in s["servers"] for p in peers) for s in sittings):
            break
        ours = [_at(s["servers"]["ours"]["single"], clients) for s in sittings]
        # The best peer at this load, in each sitting: the one answering most.
        theirs = [
            max(
                ((_at(s["servers"][p]["single"], clients), p) for p in peers if p in s["servers"]),
                key=lambda pair: pair[0]["texts_per_s"],
            )
            for s in sittings
        ]
        ours_rate = _median([p["texts_per_s"] for p in ours])
        peer_rate = _median([p["texts_per_s"] for p, _ in theirs])
        ours_p99 = _median([p["p99_ms"] for p in ours])
        peer_p99 = _median([p["p99_ms"] for p, _ in theirs])
        ratio = ours_rate / max(peer_rate, 1e-9)
        rows.append(
            (
                f"{clients} clients: ours / {who} (texts/s); p99 ours vs theirs",
                f"{ours_rate:.0f} / {peer_rate:.0f} = **{ratio:.2f}x**; {ours_p99:.0f} vs "
                f"{peer_p99:.0f} ms (ours {_each([p['texts_per_s'] for p in ours])}; best peer "
                + " / ".join(f"{p['texts_per_s']:.0f} {name}" for p, name in theirs)
                + ")",
                f">= {target}x at <= p99",
                _verdict(ratio >= target and ours_p99 <= peer_p99),
            )
        )
    return rows


def _own_rows(sittings: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    rows = []
    batch = sittings[0]["plan"]["max_batch_size"]
    saturation = [_best(s["servers"]["ours"]["single"])["texts_per_s"] for s in sittings]
    # The faster runtime at that batch, in each sitting.
    limits = [
        max(
            r["reviews_per_s"]
            for r in s["limit"] + s.get("limit_onnx", [])
            if r["order"] == "grouped" and r["batch_size"] == batch
        )
        for s in sittings
    ]
    share = _median(saturation) / _median(limits)
    rows.append(
        (
            f"ours at saturation / faster in-process limit sorted by length (batch {batch})",
            f"{_median(saturation):.0f} / {_median(limits):.0f} = **{share:.2f}** "
            f"(ours {_each(saturation)}; limit {_each(limits)})",
            f">= {SATURATION_TARGET}",
            _verdict(share >= SATURATION_TARGET),
        )
    )
    short = [s["servers"]["ours"]["short_c1"]["p50_ms"] for s in sittings]
    rows.append(
        (
            "p50 latency, one short review, 1 client",
            f"**{_median(short):.1f} ms** ({_each(short, '{:.1f}')})",
            f"<= {SHORT_P50_TARGET_MS:g} ms",
            _verdict(_median(short) <= SHORT_P50_TARGET_MS),
        )
    )
    return rows


def write_verdicts(sittings: list[dict[str, Any]], out: Path, command: str) -> str:
    """``verdicts.md`` in ``out``: the targets judged on the sittings' medians."""
    table = markdown_table(
        ["measure", "median (per sitting)", "target", "verdict"], verdicts(sittings)
    )
    dates = ", ".join(s["machine"]["date"] for s in sittings)
    precision = sittings[0].get("device", {}).get("dtype", "?")
    text = "\n\n".join(
        [
            f"# Targets over {len(sittings)} sittings",
            f"Command: `{command}`  \nSittings: {dates}; every server served the bundle in "
            f"{precision}; each sitting's report is in `sitting-N/report.md`.",
            table,
        ]
    )
    (out / "verdicts.md").write_text(text + "\n")
    return table

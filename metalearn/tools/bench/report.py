"""`metalearn bench`'s report: speed-ups over the references and bench.md's tables."""

from __future__ import annotations

from metalearn.tools.bench.pipeline import markdown as pipeline_markdown


def describe_result(result: dict) -> str:
    what = result.get("algo") or result.get("variant")
    extra = (
        f" {result['shape']} {result['steps']} steps {_code(result)}" if "shape" in result else ""
    )
    return f"{result['kind']:>11} {what}{extra}: {result['seconds']:.4f} s"


def add_ratios(report: dict) -> None:
    """Speed-up of each of our cases over its reference, and rates as fractions of peak."""
    results, peak = report["results"], report.get("peak", {})
    for r in results:
        # learn2learn has MAML and FOMAML: only those are compared with it
        if r["group"] == "family" and r["kind"] == "ours" and r["algo"] in ("maml", "fomaml"):
            base = r["algo"]
            ref = next(
                (
                    x
                    for x in results
                    if x["kind"] == "learn2learn"
                    and x["algo"] == base
                    and x["shape"] == r["shape"]
                    and x["steps"] == r["steps"]
                ),
                None,
            )
            if ref:
                r["speedup_vs_learn2learn"] = ref["seconds"] / r["seconds"]
        if r["group"] in ("protonet", "eval") and r["variant"] != "straightforward":
            ref = next(
                x
                for x in results
                if x["group"] == r["group"]
                and x["variant"] == "straightforward"
                and x.get("algo") == r.get("algo")
            )
            r["speedup_vs_straightforward"] = ref["seconds"] / r["seconds"]
        if r["group"] == "sampler" and r["variant"] == "ours":
            ref = next(
                (x for x in results if x["group"] == "sampler" and x["variant"] == "learn2learn"),
                None,
            )
            if ref:
                r["speedup_vs_learn2learn"] = ref["seconds"] / r["seconds"]
        if "gflops" in r and peak:
            r["fraction_of_matmul_peak"] = r["gflops"] / peak["matmul_gflops"]
            conv = peak.get(f"conv_{r.get('shape', 'omniglot')}_gflops")
            if conv:
                r["fraction_of_conv_rate"] = r["gflops"] / conv


def markdown(report: dict) -> str:
    """The README's bench tables."""
    hw = report["hardware"]
    lines = [
        f"Hardware: {hw.get('gpu') or hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}"
        + (f", learn2learn {report['learn2learn']}" if report.get("learn2learn") else ""),
        "",
    ]
    peak = report.get("peak")
    if peak:
        lines += [
            "Peak: "
            + ", ".join(f"{k.removesuffix('_gflops')} {v:.1f} GFLOP/s" for k, v in peak.items()),
            "",
        ]
    lines += _family_table(report)
    proto = [r for r in report["results"] if r["group"] == "protonet"]
    if proto:
        lines += [
            "| ProtoNet 60-way 5-shot 5-query episode | s / episode | GFLOP/s | speed-up |",
            "| --- | --- | --- | --- |",
        ]
        for r in proto:
            lines.append(
                f"| {r['variant']} | {r['seconds']:.3f} | {r.get('gflops', 0):.1f} "
                f"| {_ratio(r.get('speedup_vs_straightforward'))} |"
            )
        lines.append("")
    lines += _eval_table(report)
    sampler = [r for r in report["results"] if r["group"] == "sampler"]
    if sampler:
        cfg = report["config"]
        lines += [
            f"| sampler: {cfg['meta_batch']} tasks, {cfg['ways']}-way "
            f"{cfg['shots'] + cfg['query']} examples | ms / meta-batch | speed-up |",
            "| --- | --- | --- |",
        ]
        for r in sampler:
            lines.append(
                f"| {r['variant']} | {1000 * r['seconds']:.1f} "
                f"| {_ratio(r.get('speedup_vs_learn2learn'))} |"
            )
        lines.append("")
    if report.get("pipeline"):
        lines += [pipeline_markdown(report["pipeline"]), ""]
    return "\n".join(lines)


def _eval_table(report: dict) -> list[str]:
    """Test episodes per second: metalearn's evaluation against a plain per-episode loop."""
    from metalearn.tools.bench.evaluation import EPISODES

    rows = [r for r in report["results"] if r["group"] == "eval"]
    if not rows:
        return []
    lines = [
        "| evaluation (Omniglot, 15 queries per class) | code | test episodes / s | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    tasks = report["config"]["meta_batch"]
    for r in rows:
        ways, shots, _, steps = EPISODES[r["algo"]]
        setting = f"{r['algo']} {ways}-way {shots}-shot" + (f", {steps} steps" if steps else "")
        lines.append(
            f"| {setting} | {r['variant']} | {tasks / r['seconds']:.1f} "
            f"| {_ratio(r.get('speedup_vs_straightforward'))} |"
        )
    return [*lines, ""]


def _measured(value: float | None, form: str) -> str:
    """A measured value, or "-" for one the bench did not measure (not a misleading 0)."""
    return "-" if value is None else form.format(value)


def _family_table(report: dict) -> list[str]:
    """The bilevel family against learn2learn: time, throughput, memory and arithmetic rate."""
    family = [r for r in report["results"] if r["group"] == "family"]
    if not family:
        return []
    lines: list[str] = []
    lines += [
        "| algorithm | code | input | inner steps | tasks | s / iteration | tasks / s "
        "| peak MiB | GFLOP/s | of matmul peak | speed-up vs learn2learn |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    tasks = report["config"]["meta_batch"]
    for r in family:
        lines.append(
            f"| {r['algo']} | {_code(r)} | {r['shape']} | {r['steps']} | {tasks} "
            f"| {r['seconds']:.3f} | {tasks / r['seconds']:.1f} | {r['peak_memory_mib']:.0f} "
            f"| {_measured(r.get('gflops'), '{:.1f}')} "
            f"| {_measured(r.get('fraction_of_matmul_peak'), '{:.0%}')} "
            f"| {_ratio(r.get('speedup_vs_learn2learn'))} |"
        )
    lines.append("")
    first_calls = [
        f"{r['algo']} {r['shape']} {r['steps']} step(s) {r['first_call_seconds']:.0f} s"
        for r in family
        if r.get("compile")
    ]
    if first_calls:
        lines += ["First call of the compiled cases (compilation): " + "; ".join(first_calls)]
        lines.append("")
    return lines


def _code(result: dict) -> str:
    """Which implementation a family case timed, as the tables name it."""
    if result["kind"] == "learn2learn":
        return "learn2learn"
    compiled = ", compiled" if result.get("compile") else ""
    chunk = f", chunks of {result['task_chunk']}" if result.get("task_chunk") else ""
    return f"metalearn ({result['batching']}{compiled}{chunk})"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"

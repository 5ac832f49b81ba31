"""Printing the whole-model benchmark: one line per measured row, and the markdown table with
each number's physical limit (prefill: matmul FLOPs / measured matmul rate; decode: bytes a step
moves / measured copy bandwidth)."""

from __future__ import annotations

__all__ = ["gib", "print_rows", "table"]


def gib(b) -> str:
    """Bytes as GiB with two decimals ("?" for None)."""
    return "?" if b is None else f"{b / 2**30:.2f} GiB"


def print_rows(rows):
    """One line per prefill or decode row, as measured."""
    for r in rows:
        if r["kind"] == "prefill":
            extra = f", overhead {r['overhead_pct']:+.2f}%" if "overhead_pct" in r else ""
            print(f"{r['arch']} prefill {r['method']:9s} L={r['length']:>6}: "
                  f"{r['tokens_per_s']:>10,.0f} tok/s ({1e3 * r['median_s']:.1f} ms), compile "
                  f"{r['compile_s']:.1f} s, program {gib(r['program_bytes'])}{extra}",
                  flush=True)
        else:
            print(f"{r['arch']} decode {r['impl']:8s} b={r['batch']}: {r['tokens_per_s']:>8,.0f} "
                  f"tok/s, {r['step_ms']:.3f} ms/step, compile {r['compile_s']:.1f} s "
                  f"{r.get('xla_flags', '')}", flush=True)


def table(result: dict) -> str:
    """The markdown summary: each number with its physical limit (the official stack's rows
    use our model's costs: same shapes)."""
    secs = result.get("sections", {})
    ceil = secs.get("ceilings", {})
    bw, mm = ceil.get("copy_bytes_per_s"), ceil.get("matmul_flops_per_s")
    costs_by_arch = {k.split(":")[1]: v["costs"] for k, v in secs.items()
                     if ":" in k and "@" not in k and "costs" in v}
    lines = ["| arch | what | variant | batch | length | tokens/s | ms | limit tok/s | % of limit "
             "| compile s | program mem |", "|" + "---|" * 11]
    for key, sec in secs.items():
        kind, _, rest = key.partition(":")
        if kind not in ("prefill", "decode", "mamba_ssm") or "rows" not in sec:
            continue
        for r in sec["rows"]:
            if "tokens_per_s" not in r:
                continue
            costs = sec.get("costs") or costs_by_arch.get(r["arch"])
            limit = None
            if costs and r["kind"] == "prefill" and mm:
                limit = mm / costs["flops_per_token"]
            elif costs and r["kind"] == "decode" and bw:
                step_bytes = costs["weight_bytes"] + 2 * r["batch"] * costs["cache_bytes_per_seq"]
                limit = r["batch"] * bw / step_bytes
            if kind == "mamba_ssm":
                variant = "mamba_ssm" + (" (cuda graphs)" if r["kind"] == "decode" else "")
            else:
                variant = r.get("method") or (r["impl"] + (f" [{key.split('@')[1]}]"
                                                           if "@" in key else ""))
            ms = 1e3 * r["median_s"] if r["kind"] == "prefill" else r["step_ms"]
            length = r.get("length", f"{r.get('prompt_len')}+{r.get('new_tokens')}")
            lim = f"{limit:,.0f}" if limit else ""
            pct = f"{100 * r['tokens_per_s'] / limit:.0f}%" if limit else ""
            extra = f" ({r['overhead_pct']:+.2f}%)" if "overhead_pct" in r else ""
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
            lines.append(f"| {r['arch']} | {r['kind']} | {variant}{extra} | {r['batch']} | "
                         f"{length} | {r['tokens_per_s']:,.0f} | {ms:.2f} | {lim} | {pct} | "
                         f"{comp} | {gib(r.get('program_bytes'))} |")
    return "\n".join(lines)

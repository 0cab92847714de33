"""Self-hosting against a cloud API: cost per million output tokens at a traffic level, and
the traffic at which the device-hour pays for itself (`peregrine estimate --compare-api`).

A device-hour costs its price whether it is busy or not, so at a traffic of T output
tokens/s (at most the device's capacity C) self-hosting costs
`price_per_hour / (T x 3600) x 1e6` dollars per million output tokens; the API costs its
list price whatever the traffic. They meet at T* = price_per_hour x 1e6 / (3600 x API
price); above T* (and below C) self-hosting is cheaper. When T* > C one device never
catches up with the API."""

from __future__ import annotations

from typing import Any

LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)  # fractions of capacity the table shows


def usd_per_mtok(price_per_hour: float, tok_s: float) -> float:
    """Dollars per million tokens of a device-hour price at `tok_s` tokens/s."""
    return price_per_hour / (tok_s * 3600) * 1e6


def break_even_tok_s(price_per_hour: float, api_usd_per_mtok: float) -> float:
    """Output tokens/s at which the device-hour costs what the API charges for them."""
    return price_per_hour * 1e6 / (3600 * api_usd_per_mtok)


def output_capacity(decode_tok_s: float, prefill_tok_s: float, prompt_len: int,
                    output_len: int) -> float:
    """Output tokens/s of a device that prefills each request's prompt at prefill_tok_s and
    decodes its output at decode_tok_s (batched), the two not overlapping."""
    return 1.0 / (1.0 / decode_tok_s + prompt_len / (output_len * prefill_tok_s))


def compare_api(api_usd_per_mtok: float, price_per_hour: float, capacity_tok_s: float,
                output_len: int, capacity_source: str,
                levels: tuple[float, ...] = LEVELS) -> dict[str, Any]:
    """The comparison at each fraction of capacity in `levels` and at break-even."""
    if api_usd_per_mtok <= 0:
        raise ValueError(f"--compare-api must be > 0 USD per million tokens, got "
                         f"{api_usd_per_mtok}")
    if price_per_hour <= 0:
        raise ValueError("--compare-api needs the device-hour price: --price-per-hour")
    if capacity_tok_s <= 0:
        raise ValueError(f"capacity must be > 0 tokens/s, got {capacity_tok_s}")
    even = break_even_tok_s(price_per_hour, api_usd_per_mtok)
    per_day = 86400 / output_len

    def row(tok_s: float, label: str) -> dict[str, Any]:
        own = usd_per_mtok(price_per_hour, tok_s)
        return {"traffic": label, "output_tok_s": round(tok_s, 3),
                "requests_per_day": round(tok_s * per_day, 1),
                "self_hosted_usd_per_mtok": round(own, 4),
                "api_usd_per_mtok": api_usd_per_mtok,
                "cheaper": ("same" if abs(own - api_usd_per_mtok) <= 1e-9 * api_usd_per_mtok
                            else "self-hosted" if own < api_usd_per_mtok else "api")}

    rows = [row(f * capacity_tok_s, f"{100 * f:g}% of capacity") for f in levels]
    if even <= capacity_tok_s:
        rows.append(row(even, "break-even"))
        rows.sort(key=lambda r: r["output_tok_s"])
    return {"api_usd_per_mtok": api_usd_per_mtok, "price_per_hour": price_per_hour,
            "output_len": output_len, "capacity_output_tok_s": round(capacity_tok_s, 3),
            "capacity_source": capacity_source,
            "full_load_usd_per_mtok": round(usd_per_mtok(price_per_hour, capacity_tok_s), 4),
            "break_even_output_tok_s": round(even, 3),
            "break_even_requests_per_day": round(even * per_day, 1),
            "self_hosting_can_win": even < capacity_tok_s, "rows": rows}


def render_comparison(name: str, c: dict[str, Any]) -> list[str]:
    """Lines of the human report of one comparison."""
    lines = [f"{name}: ${c['price_per_hour']:g}/hour, capacity "
             f"{c['capacity_output_tok_s']:,.1f} output tok/s ({c['capacity_source']}), "
             f"${c['full_load_usd_per_mtok']:,.4f}/Mtok at full load vs API "
             f"${c['api_usd_per_mtok']:g}/Mtok",
             f"  break-even: {c['break_even_output_tok_s']:,.2f} output tok/s = "
             f"{c['break_even_requests_per_day']:,.0f} requests/day of {c['output_len']} "
             "output tokens"
             + ("" if c["self_hosting_can_win"] else
                " -- beyond this device's capacity: the API is always cheaper"),
             f"  {'traffic':<22} {'output tok/s':>13} {'requests/day':>14} "
             f"{'self-hosted $/Mtok':>19} {'API $/Mtok':>11} {'cheaper':>12}"]
    for r in c["rows"]:
        lines.append(f"  {r['traffic']:<22} {r['output_tok_s']:>13,.2f} "
                     f"{r['requests_per_day']:>14,.0f} {r['self_hosted_usd_per_mtok']:>19,.4f} "
                     f"{r['api_usd_per_mtok']:>11g} {r['cheaper']:>12}")
    return lines

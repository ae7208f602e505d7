"""The model card's account of strategy auto: what each rung of the ladder reached, which were
skipped and why, and why the winner won (metrics.json's `strategy_search`, formatted)."""

from __future__ import annotations

from typing import Any


def _score(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _result(rung: dict[str, Any]) -> str:
    if rung["status"] != "trained":  # an error's message on one line, its pipes escaped: one table cell
        return f"{rung['status']}: " + " ".join(str(rung["reason"]).split()).replace("|", "\\|")
    notes = ["stopped early" if rung["stopped_early"] else "",
             "stopped by the time budget" if rung["stopped_by_budget"] and not rung.get("halted") else "",
             rung.get("halted") or ""]
    return ", ".join(["trained", *filter(None, notes)])


def search_section(summary: dict[str, Any]) -> dict[str, Any] | None:
    """What the card's "How the strategy was chosen" section shows, or None for a run of a named strategy."""
    search = summary.get("strategy_search")
    if not search:
        return None
    budget = f"a time budget of {search['time_budget']:g} s" if search["time_budget"] is not None else "no time budget"
    intro = (
        f"`strategy.name: auto` tried the ladder {', '.join(search['rules']['order'])} (cheapest first) with {budget} "
        f"and early stopping ({search['rules']['patience']}), "
        f"in {search['seconds']:.1f} s{'; the budget was exceeded' if search['budget_exceeded'] else ''}. "
        f"{search['rules']['halving'][0].upper()}{search['rules']['halving'][1:]}. The winner: {search['rules']['tie']}."
    )
    rows = [
        {"strategy": rung["strategy"], "result": _result(rung), "accuracy": _score(rung["accuracy"]),
         "f1_macro": _score(rung["f1_macro"]),
         "epochs": f"{rung['best_epoch']} of {rung['epochs']}" if rung["status"] == "trained" else "-",
         "seconds": f"{rung['seconds']:.1f}" if rung["seconds"] is not None else "-"}
        for rung in search["rungs"]
    ]
    return {"intro": intro, "rows": rows, "why": f"Chosen: {search['why']}."}

"""strategy auto: a ladder of strategies, cheapest first, within a time budget; the best is saved.

rules.py decides (the rungs, skips, the budget estimate, the winner); search.py runs the rungs with
run.py's pieces and writes the winner's output folder.
"""

from hf_transfer.ladder.search import run_ladder

__all__ = ["run_ladder"]

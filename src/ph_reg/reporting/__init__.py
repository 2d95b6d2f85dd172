"""Reporting: Markdown tables (:mod:`.tables`) and figures (:mod:`.figures`) of the evaluation's results."""

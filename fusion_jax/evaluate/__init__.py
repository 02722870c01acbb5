"""Evaluation: checkpoint evaluation, results files, plots, comparisons and analysis."""

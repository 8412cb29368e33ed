"""Evaluation: every method at a budget or a sweep (harness), baselines, the max-drop guarantee study, the report
format and summary line, the demo story, plots."""

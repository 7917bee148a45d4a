"""Scoring runs: metrics (ranx), seen / unseen query groups, seed statistics and paired significance
tests, the one report object that renders tables, and the evaluate job that searches a split and writes
its scores.
"""

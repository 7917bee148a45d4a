"""Experiments across grids of backbones, collections, heads, experts and seeds: the grid runner, the
document-prior controls, results read back, the report (tables, significance, figures) and the demo.
"""

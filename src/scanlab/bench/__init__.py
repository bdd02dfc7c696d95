"""Benchmarks: scanlab against what users would pick instead, and against the machine's limits.

Every workload times compilation apart from running, waits for results with
`block_until_ready`, and reports medians; ratios measured side by side in one run are the figures
that count.
"""

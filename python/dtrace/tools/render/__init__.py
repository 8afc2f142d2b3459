"""Output: tables and histograms (``report``), and flame graphs as SVG, speedscope JSON or folded
stacks (``flamegraph``).

May import nothing of ``dtrace.tools``: text in, text out.
"""

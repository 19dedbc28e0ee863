"""Benchmarks for santa_cupy: decode latency side by side with FlashInfer and PyTorch SDPA.

``python -m bench.decode --help`` runs the sweep; :mod:`bench.timing` holds the GPU timing helpers
and :mod:`bench.report` the byte counts, tables, JSON and plot (CPU only, no GPU import).
"""

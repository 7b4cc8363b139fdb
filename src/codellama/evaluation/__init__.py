"""Evaluation: a sandboxed executor, pass@k and friends, HumanEval / MBPP / infilling / long-context benchmarks.

Importing this package is cheap (no torch); the benchmark runners import the model stack only when they run."""

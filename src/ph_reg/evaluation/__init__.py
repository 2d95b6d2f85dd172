"""Dense-task evaluation: diagnostics, zero-shot, probes, the planted benchmark, benchmark datasets."""

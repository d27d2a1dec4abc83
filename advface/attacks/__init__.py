"""Attacks on protected templates, one module each (used by the benchmarks and the audit)."""

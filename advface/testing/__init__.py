"""Helpers for tests and benchmarks (throwaway local services); nothing here is used by the sidecar itself."""

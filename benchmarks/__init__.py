"""jaxcomp benchmarks: ``python -m benchmarks`` (``make bench``). Ratios measured side by side."""

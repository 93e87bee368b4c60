"""Speed and memory benchmarks (outputs in docs/benchmarks/)."""

"""Speed benchmarks; each prints its throughput beside the machine's float32 matmul rate."""

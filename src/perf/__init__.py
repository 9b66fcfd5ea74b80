"""Performance tools: the benchmark (round phases, roofline) and the GPU check."""

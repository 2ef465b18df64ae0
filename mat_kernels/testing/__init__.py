"""Float64 oracles and the tolerances the tests and benchmarks use."""

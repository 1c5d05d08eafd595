"""Cost models: symbolic (sympy) per-layer costs, collectives, compilation, and timing."""

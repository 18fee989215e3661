"""What the engines' and the router's Prometheus metrics share."""

# Latency histogram buckets (seconds): from a fast decode step to a long queued request.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

"""`microserve bench`: workloads, an open-loop load driver, latency metrics and plots for any
OpenAI-compatible endpoint, and sweeps over router strategies and request rates."""

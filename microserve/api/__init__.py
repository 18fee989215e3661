"""What both HTTP fronts (the engine's server/ and the router/) share: request and response
schemas, response rendering, errors and auth. Nothing here imports torch or the engine."""

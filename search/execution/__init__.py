"""The execution room: Ray's lifecycle, the worker pool that turns every failure into an Outcome, the candidate
worker (sources resident, one in-memory merge and one lm-eval pass per job) and the preflight checks."""

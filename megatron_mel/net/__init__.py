"""Network plumbing shared by the run's clients (health probes, retry backoff)."""

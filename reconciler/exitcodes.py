"""The exit codes of ``dora-reconciler``: public interface, relied on by CronJobs and scripts."""

OK = 0
RETRY = 1
"""Some work failed (delivery, GitHub, a cluster, the state store) and the next run retries it."""
CONFIG = 2
"""A configuration or usage error; for ``check``, a dependency that cannot be reached."""
LOCKED = 3
"""Another run holds the lock."""
NOT_FOUND = 1
"""``explain``: no run reads the Application (not found, or hidden by the config's selectors)."""

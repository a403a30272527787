"""The optimizer algebra: direction laws, estimators (coefficient rules), update rules, presets; the
in-place path's parameter passes, forward-hook probes and optimizer."""

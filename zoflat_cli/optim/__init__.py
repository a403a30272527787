"""The optimizer algebra: direction laws, estimators (coefficient rules), update rules, presets."""

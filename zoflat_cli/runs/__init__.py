"""The run-folder format: a run's settings and columns (spec), the folder and its integrity, the update
log a ZO run is replayed from, and trackers that copy metrics.csv's rows."""

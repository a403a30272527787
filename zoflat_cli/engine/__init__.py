"""The training engine: one step-driving loop (loop.py) for the batched runner (batched.py: toy,
convex, many runs as one tensor program) and the model runner (model.py: one model at a time, in
place); the live view (live.py) and data-parallel runs under torchrun (distributed.py)."""

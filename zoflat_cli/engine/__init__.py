"""The training engine: one run-loop contract (loop.py) for the batched runner (batched.py: toy,
convex, many runs as one tensor program) and the model runner (model.py: one model at a time, in
place), and the run folder they write (runfolder.py) and show (live.py)."""

"""The names the problems accept, as options of the command line. No torch here: the commands'
options are built from these at start-up, before any problem is imported."""

CONVEX_MODELS = ("svm", "logreg")  # problems/convex.py: squared hinge; logistic
HEADS = ("auto", "prompt", "linear")  # problems/encoder.py: an encoder's classifier
SCORING = ("sum", "mean")  # problems/decoder.py: an option's score from its tokens' log-probabilities
TRAINABLE = ("all", "lora", "prefix", "bias", "head")  # problems/pretrained.py: what the optimizer moves
DEVICE_MAPS = ("auto", "balanced", "sequential")  # accelerate's placements of a model across devices

"""Flatness measures of a model's loss: Hessian trace and top eigenvalue estimators."""

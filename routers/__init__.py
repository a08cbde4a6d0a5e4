"""Routers: per-layer predictors of the attention groups and MLP neurons each token needs.

Collection of training data, Optax training and MLP top-k calibration land here (issue 5).
"""

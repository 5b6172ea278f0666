"""The Hydra app behind ``python -m freezeft.run``: config checks, source pretraining,
training and testing, results. It speaks to a task only through :mod:`freezeft.app.task`."""

"""The speech task's Hydra configs (``pkg://freezeft.speech.conf``), on the app's search path."""

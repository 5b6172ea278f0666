"""freezeft's Hydra configs, shipped inside the wheel as ``pkg://freezeft.conf``."""

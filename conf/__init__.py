"""freezeft's Hydra configs, shipped inside the wheel as ``pkg://freezeft.conf``.

Importing this package (Hydra does, to read the configs) registers the resolvers they use.
"""

import os

from omegaconf import OmegaConf

# hydra/default.yaml names run dirs with the process id: two runs started in the same
# second never share one.
OmegaConf.register_new_resolver("freezeft.pid", lambda: str(os.getpid()), replace=True)
# hparams_search/*.yaml: the sweeper's direction follows monitor_mode
OmegaConf.register_new_resolver(
    "freezeft.direction", lambda mode: {"max": "maximize"}.get(mode, "minimize"), replace=True
)

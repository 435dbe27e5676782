"""Train: `python train.py [--config configs/X.py] [--workdir DIR] [--config.key=value ...]`.

A thin shim over the package's entry point, `python -m mmjax.main` (same flags, same exit
codes): everything else lives in `mmjax/`, which tests and other tools import.
"""

from mmjax import main

if __name__ == "__main__":
    main.entry()

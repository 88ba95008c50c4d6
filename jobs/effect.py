"""Does BPO make the model more grounded? Base vs aligned over several seeds, with ablations (``make effect``).

    python jobs/effect.py --config configs/tiny.yaml [--seeds 0,1,2] [--variants both,injection,...] [key=value ...]

The sweep lives in ``bpo_ray.pipeline.effect``; ``--help`` describes it.
"""

import sys
from pathlib import Path

try:
    import bpo_ray  # noqa: F401
except ImportError:  # submitted with --working-dir and not installed on the cluster: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpo_ray.pipeline.effect import main

if __name__ == "__main__":
    sys.exit(main())

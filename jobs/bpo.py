"""BPO end to end, as one Ray job: the entrypoint ``ray job submit`` runs (``bpo run`` is the same job).

    python jobs/bpo.py --config configs/tiny.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/bpo.py --config ...

The stages and the loop that runs them live in ``bpo_ray.pipeline``; ``--help`` lists them.
"""

import sys
from pathlib import Path

try:
    import bpo_ray  # noqa: F401
except ImportError:  # submitted with --working-dir and not installed on the cluster: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpo_ray.pipeline import main

if __name__ == "__main__":
    sys.exit(main(prog="jobs/bpo.py"))

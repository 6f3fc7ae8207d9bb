"""Compare every temperature controller on ``metactl/TokenSearch-v0`` over many seeds.

Usage::

    python examples/gym_study.py                     # full default study (30 seeds, 200 steps)
    python examples/gym_study.py --seeds 5 --controllers tampo,fixed-1.0,linear --out runs/quick

Same as ``metactl gym-study``; see ``metactl.adapters.lab.gym_study`` for the options.
"""

import sys

from metactl.adapters.lab.gym_study import main

if __name__ == "__main__":
    sys.exit(main())

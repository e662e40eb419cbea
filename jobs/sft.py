"""Entry script for `ray job submit ... -- python jobs/sft.py --config FILE [overrides]` and local runs.

Same arguments as `sft-ray train`.
"""

import sys

from sft_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

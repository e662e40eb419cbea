"""Entry script for `ray job submit ... -- python jobs/tune.py --config FILE [overrides]` and local runs.

Same arguments as `sft-ray tune`.
"""

import sys

from sft_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

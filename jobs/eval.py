"""Entry script for `ray job submit ... -- python jobs/eval.py --config FILE [--data PATH] [overrides]`.

Same arguments as `sft-ray eval`.
"""

import sys

from sft_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

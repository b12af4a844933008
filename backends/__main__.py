"""`uv run python -m backends [--recalibrate]`: print this machine's hardware, backend, peak FLOPS
and default configuration. --recalibrate forgets cached CPU/GPU matmul measurements first (take
them on an otherwise idle machine). A backend or profile that cannot be used ends with its fix."""

import argparse

from backends import BackendUnavailable, print_summary
from backends.flops import forget_calibration

parser = argparse.ArgumentParser(prog="python -m backends",
                                 description="Print the hardware, backend, peak FLOPS and default configuration.")
parser.add_argument("--recalibrate", action="store_true", help="measure the matmul peak again")
args = parser.parse_args()
if args.recalibrate:
    forget_calibration()
try:
    print_summary()
except (BackendUnavailable, ValueError) as error:
    raise SystemExit(f"error: {error}")

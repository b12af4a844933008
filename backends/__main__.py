"""`uv run python -m backends [--recalibrate]`: print this machine's hardware, backend, peak FLOPS
and default configuration. --recalibrate measures the CPU/GPU matmul peak again (best on an
otherwise idle machine); the cache keeps the best measurement, so a busy machine cannot lower it.
A backend or profile that cannot be used ends with its fix."""

import argparse

from backends import BackendUnavailable, print_summary

parser = argparse.ArgumentParser(prog="python -m backends",
                                 description="Print the hardware, backend, peak FLOPS and default configuration.")
parser.add_argument("--recalibrate", action="store_true",
                    help="measure the matmul peak again (the cache keeps the best measurement)")
args = parser.parse_args()
try:
    print_summary(recalibrate=args.recalibrate)
except (BackendUnavailable, ValueError) as error:
    raise SystemExit(f"error: {error}")

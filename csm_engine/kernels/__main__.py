"""Build the native kernels ahead of time: ``python -m csm_engine.kernels``."""

import sys

from csm_engine import kernels

if kernels.load(verbose="-v" in sys.argv):
    print(f"csm-chat kernels ready in {kernels.build_dir()}")
else:
    print(f"csm-chat kernels unavailable ({kernels.unavailable_reason()}); torch's kernels will be used")

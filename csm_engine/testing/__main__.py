"""``python -m csm_engine.testing make-checkpoint OUT_DIR --flavor tiny|1B``: a random-weight checkpoint."""

import sys

from csm_engine.testing.checkpoints import main

sys.exit(main())

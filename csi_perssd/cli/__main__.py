"""`python -m csi_perssd.cli ...`, the same as the `csi-perssd` entry point."""
import sys

from . import main

sys.exit(main())

"""``python -m imbssl.bench.validate {run,prep}``."""
import sys

from imbssl.bench.validate.cli import main

sys.exit(main())

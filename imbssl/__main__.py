import sys

from imbssl.cli import main

sys.exit(main())

import sys

from lmslice.cli import main

sys.exit(main())

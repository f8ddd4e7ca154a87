import sys

from eyed.cli import main

sys.exit(main())

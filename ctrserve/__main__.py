import sys

from ctrserve.cli import main

sys.exit(main())

import sys

from pqjax.tools.cli import main

sys.exit(main())

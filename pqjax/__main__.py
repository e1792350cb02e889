import sys

from pqjax.cli import main

sys.exit(main())

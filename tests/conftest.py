import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The command line keeps compiled programs in the user's cache folder; tests that
# call it (in this process or in subprocesses) must leave that folder alone.
os.environ['PQJAX_NO_COMPILE_CACHE'] = '1'

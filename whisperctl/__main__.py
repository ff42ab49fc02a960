import sys

from whisperctl.cli import main

sys.exit(main())

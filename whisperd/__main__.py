import sys

from whisperd.cli import main

sys.exit(main())

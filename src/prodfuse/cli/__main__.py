import sys

from prodfuse.cli import main

sys.exit(main())

import sys

from dydit.cli import main

sys.exit(main())

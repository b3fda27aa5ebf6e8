import sys

from ringlet.cli import main

sys.exit(main())

import sys

from rlfuse.cli import main

sys.exit(main())

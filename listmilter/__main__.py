import sys

from listmilter.cli import main

sys.exit(main())

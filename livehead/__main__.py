import sys

from livehead.cli import main

sys.exit(main())

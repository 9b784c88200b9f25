import sys

from proximal.cli import main

sys.exit(main())

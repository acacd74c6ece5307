import sys

from expertmesh.cli import main

sys.exit(main())

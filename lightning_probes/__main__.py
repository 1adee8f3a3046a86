import sys

from lightning_probes.cli import main

sys.exit(main())

import sys

from deltatune.cli.main import main

sys.exit(main())

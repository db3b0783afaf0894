import sys

from relaykern.train import main

sys.exit(main())

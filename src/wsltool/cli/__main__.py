import sys

from wsltool.cli import main

sys.exit(main())

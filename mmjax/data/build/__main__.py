"""`python -m mmjax.data.build --help`: see `mmjax.data.build.dataset`."""

import sys

from mmjax.data.build.dataset import main

sys.exit(main())

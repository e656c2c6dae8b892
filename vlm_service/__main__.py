import sys

from vlm_service.cli import main

sys.exit(main())

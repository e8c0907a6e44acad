"""`python -m service ...`"""

from .cli import main

raise SystemExit(main())
